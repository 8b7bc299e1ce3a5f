"""CIFAR ResNet v1 of depth 6n+2 (He et al. 2016, as in the Keras example the paper used).

The paper's "ResNet50" is depth 50 (n = 8), not ImageNet ResNet-50. Convs keep Keras's default
``use_bias=True`` (biases start at 0), kernels are he-uniform, BatchNorm uses Keras settings, and
the 1x1 stride-2 projection shortcut has no BatchNorm. With n = 8 this gives exactly 760,266
trainable parameters. Inputs are float N x 3 x 32 x 32; outputs are logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Conv2dSame, KerasModelMixin, keras_batch_norm


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU.

    When the block changes resolution or width, the shortcut is a 1x1 strided conv without BN.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = Conv2dSame(in_channels, out_channels, 3, stride=stride)
        self.bn1 = keras_batch_norm(out_channels)
        self.conv2 = Conv2dSame(out_channels, out_channels, 3)
        self.bn2 = keras_batch_norm(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = Conv2dSame(in_channels, out_channels, 1, stride=stride) if needs_projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(self.shortcut(x) + y)


class ResNetV1(KerasModelMixin, nn.Module):
    """CIFAR ResNet v1, depth = 6n + 2: stem conv16, three stages of n blocks (16/32/64 filters,
    stride 2 at the start of stages 2 and 3), global average pool, Linear. L2 on conv kernels."""

    bias_init = "zeros"

    def __init__(self, depth: int, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet v1 depth must be 6n+2 with n >= 1 (20, 32, 44, 50, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv = Conv2dSame(3, 16, 3)
        self.bn = keras_batch_norm(16)
        stages, cin = [], 16
        for s, width in enumerate((16, 32, 64)):
            blocks = [
                BasicBlock(cin if b == 0 else width, width, stride=2 if s > 0 and b == 0 else 1) for b in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)  # = Keras AveragePooling2D(8) on 32x32 inputs
        self.fc = nn.Linear(64, num_classes)
        self.reset_parameters(generator)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def l2_parameters(self) -> list[nn.Parameter]:
        # Every conv kernel, projections included; not the dense layer.
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]
