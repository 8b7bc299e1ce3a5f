"""Building blocks shared by the model zoo: Keras 'same' convolution, Keras BatchNorm, base mixin."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laperm.init import keras_init_, prunable_parameters

# Keras BatchNormalization defaults. Keras momentum 0.99 weights the *old* running value;
# PyTorch's momentum weights the new batch statistic, hence 1 - 0.99.
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01


def keras_batch_norm(num_features: int, dims: int = 2) -> nn.Module:
    """BatchNorm1d/2d with the Keras defaults (eps 1e-3, momentum 0.99 in Keras terms)."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    return cls(num_features, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow/Keras 'same' padding of one spatial dim as (before, after).

    The output has ceil(size / stride) positions; when the total padding is odd the extra row or
    column goes after (bottom/right), which PyTorch's symmetric ``padding=`` cannot express.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with Keras ``padding='same'`` for any stride (zero padding).

    The padding depends on the input size, so it is computed in ``forward``; symmetric cases go
    straight to the convolution's own padding, asymmetric ones pad explicitly first. Parameters and
    state-dict keys are those of ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            dilation=dilation,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top == bottom and left == right:
            padding = (top, left)
        else:
            x = F.pad(x, (left, right, top, bottom))
            padding = (0, 0)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=same (Keras)"


class KerasModelMixin:
    """Mixin for the zoo's ``nn.Module`` classes: Keras init and the L2-penalised parameters.

    ``bias_init`` is the Keras ``bias_initializer`` of the original model ("he_uniform" or "zeros").
    """

    bias_init: ClassVar[str] = "zeros"

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise like the Keras original (see :func:`laperm.init.keras_init_`)."""
        keras_init_(self, bias=self.bias_init, generator=generator)

    def l2_parameters(self) -> list[nn.Parameter]:
        """Parameters carrying the paper's coupled L2 penalty (coefficient in the registry)."""
        return []

    def kernels(self) -> list[nn.Parameter]:
        """All Linear/Conv weights in module order."""
        return [p for _, p in prunable_parameters(self)]
