"""The paper's models, layer by layer as in the reference notebooks (docs/algorithm.md §4).

``build(name, seed=...)`` returns a Keras-initialised model; ``MODELS`` describes each one.
"""

from .cifar import Conv2, Conv4, Conv13
from .layers import (
    KERAS_BN_EPS,
    KERAS_BN_MOMENTUM,
    Conv2dSame,
    KerasModelMixin,
    keras_batch_norm,
    same_padding,
)
from .mnist import F1, F2, Conv7, LeNet300
from .registry import (
    MAX_VOCAB,
    MODELS,
    ModelOptionError,
    ModelSpec,
    UnknownModelError,
    build,
    check_options,
    check_trainable,
    get_spec,
    state_numel,
)
from .resnet import BasicBlock, ResNetV1
from .transformer import CharGPT, ViTTiny

__all__ = [
    "MODELS",
    "ModelSpec",
    "UnknownModelError",
    "ModelOptionError",
    "MAX_VOCAB",
    "check_options",
    "state_numel",
    "build",
    "get_spec",
    "check_trainable",
    "F1",
    "F2",
    "LeNet300",
    "Conv7",
    "Conv2",
    "Conv4",
    "Conv13",
    "ResNetV1",
    "BasicBlock",
    "CharGPT",
    "ViTTiny",
    "Conv2dSame",
    "KerasModelMixin",
    "keras_batch_norm",
    "same_padding",
    "KERAS_BN_EPS",
    "KERAS_BN_MOMENTUM",
]
