"""CIFAR-10 VGG-style models of the paper: Conv2, Conv4 and Conv13 (docs/algorithm.md §4).

Every conv is 3x3 'same' followed by ReLU then BatchNorm (the reference's order); kernels and
biases are he-uniform; L2 goes on every kernel except the output layer's. Inputs are float
N x 3 x 32 x 32; outputs are logits.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .layers import Conv2dSame, KerasModelMixin, keras_batch_norm


class _Layers:
    """Collects named layers, numbering each kind (conv1, bn1, conv2, ...) for readable names."""

    def __init__(self) -> None:
        self.modules: OrderedDict[str, nn.Module] = OrderedDict()
        self._counts: dict[str, int] = {}

    def add(self, kind: str, module: nn.Module) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self.modules[f"{kind}{self._counts[kind]}"] = module

    def conv(self, cin: int, cout: int, dropout: float | None = None) -> None:
        self.add("conv", Conv2dSame(cin, cout, 3))
        self.add("relu", nn.ReLU())
        self.add("bn", keras_batch_norm(cout))
        if dropout:
            self.add("drop", nn.Dropout(dropout))

    def dense(self, fin: int, fout: int) -> None:
        self.add("fc", nn.Linear(fin, fout))
        self.add("relu", nn.ReLU())


def _conv_front(layers: _Layers, groups: list[tuple[int, ...]], first_dropout: float) -> int:
    """Conv groups, each followed by MaxPool 2. Dropout after every conv but a group's last.

    Returns the channel count of the last group.
    """
    cin = 3
    for g, channels in enumerate(groups):
        for i, cout in enumerate(channels):
            last = i == len(channels) - 1
            dropout = None if last else (first_dropout if g == 0 and i == 0 else 0.4)
            layers.conv(cin, cout, dropout)
            cin = cout
        layers.add("pool", nn.MaxPool2d(2))
    return cin


class _CifarConvNet(KerasModelMixin, nn.Sequential):
    bias_init = "he_uniform"

    def l2_parameters(self) -> list[nn.Parameter]:
        # Every conv/dense kernel except the output layer's.
        return self.kernels()[:-1]


def _small_head(layers: _Layers, flat: int, num_classes: int) -> None:
    """Conv2/Conv4 head: Linear256 ReLU, Dropout .5, BN, Linear256 ReLU, BN, Dropout .5, Linear."""
    layers.add("flatten", nn.Flatten())
    layers.dense(flat, 256)
    layers.add("drop", nn.Dropout(0.5))
    layers.add("bn", keras_batch_norm(256, dims=1))
    layers.dense(256, 256)
    layers.add("bn", keras_batch_norm(256, dims=1))
    layers.add("drop", nn.Dropout(0.5))
    layers.add("fc", nn.Linear(256, num_classes))


class Conv2(_CifarConvNet):
    """Conv64 x2, MaxPool, dense head from 16,384 features. 4,302,922 trainable params."""

    def __init__(self, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        layers = _Layers()
        _conv_front(layers, [(64, 64)], first_dropout=0.3)
        _small_head(layers, 64 * 16 * 16, num_classes)
        super().__init__(layers.modules)
        self.reset_parameters(generator)


class Conv4(_CifarConvNet):
    """Conv64 x2, MaxPool, Conv128 x2, MaxPool, dense head from 8,192. 2,427,722 trainable."""

    def __init__(self, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        layers = _Layers()
        _conv_front(layers, [(64, 64), (128, 128)], first_dropout=0.3)
        _small_head(layers, 128 * 8 * 8, num_classes)
        super().__init__(layers.modules)
        self.reset_parameters(generator)


class Conv13(_CifarConvNet):
    """VGG-16-style: 13 convs in groups 64x2 | 128x2 | 256x3 | 512x3 | 512x3. 14,991,946 trainable.

    Head: Dropout .5, Flatten(512), Linear512 ReLU, BN, Dropout .5, Linear.
    """

    def __init__(self, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        layers = _Layers()
        groups = [(64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3]
        channels = _conv_front(layers, groups, first_dropout=0.3)
        layers.add("drop", nn.Dropout(0.5))
        layers.add("flatten", nn.Flatten())
        layers.dense(channels, 512)
        layers.add("bn", keras_batch_norm(512, dims=1))
        layers.add("drop", nn.Dropout(0.5))
        layers.add("fc", nn.Linear(512, num_classes))
        super().__init__(layers.modules)
        self.reset_parameters(generator)
