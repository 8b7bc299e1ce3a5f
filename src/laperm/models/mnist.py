"""MNIST models of the paper: F1, F2, LeNet-300-100 and Conv7 (docs/algorithm.md §4).

Inputs are float N x 1 x 28 x 28 (N x 784 also works for the dense nets); outputs are logits.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .layers import Conv2dSame, KerasModelMixin


class F1(KerasModelMixin, nn.Sequential):
    """Flatten(784) -> Linear(10), no bias: 7,840 weights."""

    def __init__(self, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc=nn.Linear(784, num_classes, bias=False),
            )
        )
        self.reset_parameters(generator)


class F2(KerasModelMixin, nn.Sequential):
    """784 -> 128 ReLU -> 64 ReLU -> 10, no biases; L2 on the two hidden layers. 109,184 weights."""

    def __init__(self, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(784, 128, bias=False),
                relu1=nn.ReLU(),
                fc2=nn.Linear(128, 64, bias=False),
                relu2=nn.ReLU(),
                fc3=nn.Linear(64, num_classes, bias=False),
            )
        )
        self.reset_parameters(generator)

    def l2_parameters(self) -> list[nn.Parameter]:
        return [self.fc1.weight, self.fc2.weight]


class LeNet300(KerasModelMixin, nn.Sequential):
    """LeNet-300-100: 784-300 ReLU-100 ReLU-10 with (zero-initialised) biases. 266,610 params."""

    def __init__(self, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(784, 300),
                relu1=nn.ReLU(),
                fc2=nn.Linear(300, 100),
                relu2=nn.ReLU(),
                fc3=nn.Linear(100, num_classes),
            )
        )
        self.reset_parameters(generator)


class Conv7(KerasModelMixin, nn.Sequential):
    """Seven conv layers + dense, no BatchNorm; he-uniform biases. 325,578 params.

    Spatial sizes 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4 -> 1. The two 5x5 stride-2 'same' convs pad
    (1, 2) per dimension, as Keras does. Every conv, the last included, is followed by ReLU, as in
    the reference notebook.
    """

    bias_init = "he_uniform"

    def __init__(self, num_classes: int = 10, generator: torch.Generator | None = None) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(1, 32, 3),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(32, 32, 3),
                relu2=nn.ReLU(),
                conv3=Conv2dSame(32, 32, 5, stride=2),
                relu3=nn.ReLU(),
                drop1=nn.Dropout(0.4),
                conv4=nn.Conv2d(32, 64, 3),
                relu4=nn.ReLU(),
                conv5=nn.Conv2d(64, 64, 3),
                relu5=nn.ReLU(),
                conv6=Conv2dSame(64, 64, 5, stride=2),
                relu6=nn.ReLU(),
                drop2=nn.Dropout(0.4),
                conv7=nn.Conv2d(64, 128, 4),
                relu7=nn.ReLU(),
                flatten=nn.Flatten(),
                drop3=nn.Dropout(0.4),
                fc=nn.Linear(128, num_classes),
            )
        )
        self.reset_parameters(generator)
