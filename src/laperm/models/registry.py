"""Model registry: ``MODELS[name]`` describes a model, ``build(name)`` makes a Keras-initialised one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .cifar import Conv2, Conv4, Conv13
from .mnist import F1, F2, Conv7, LeNet300
from .resnet import ResNetV1
from .transformer import CharGPT, ViTTiny, _vit_cifar


class UnknownModelError(ValueError):
    """Raised by :func:`build` / :func:`get_spec` for a name not in :data:`MODELS`."""


@dataclass(frozen=True)
class ModelSpec:
    """What the paper's runs need to know about a model besides its layers.

    ``l2`` is the coefficient c of the coupled Keras-style penalty c * sum(w**2) over the model's
    ``l2_parameters()`` (0 if none). ``permute_biases`` says whether the paper's LaPerm permuted the
    biases too (Conv7, F1, F2).
    """

    name: str
    builder: Callable[..., nn.Module]
    dataset: str  # "mnist", "cifar10" or "text"
    input_shape: tuple[int, ...]  # (C, H, W); for "text" models (context,): a window of character ids
    num_classes: int  # for "text" models 0: the vocabulary comes from the data
    l2: float
    permute_biases: bool
    description: str
    # Keyword options a recipe may pass to the model class (what it takes from the data), each
    # ``(name, smallest, largest)``: :func:`check_options` refuses anything else before building.
    options: tuple[tuple[str, int, int], ...] = ()


class ModelOptionError(UnknownModelError):
    """A model option that the registry does not list for the model, or a value outside its bounds."""


MAX_VOCAB = 1 << 16  # characters in a text model's vocabulary (laperm's corpora have a few hundred)


def _resnet20(**kwargs) -> ResNetV1:
    return ResNetV1(20, **kwargs)


def _resnet50(**kwargs) -> ResNetV1:
    return ResNetV1(50, **kwargs)


_MNIST, _CIFAR = (1, 28, 28), (3, 32, 32)

MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("f1", F1, "mnist", _MNIST, 10, 0.0, True, "Flatten -> Linear(784, 10) without bias (7,840 weights)"),
        ModelSpec(
            "f2",
            F2,
            "mnist",
            _MNIST,
            10,
            1e-4,
            True,
            "784-128-64-10 ReLU MLP without biases, L2 on the hidden layers (109,184 weights)",
        ),
        ModelSpec(
            "lenet300", LeNet300, "mnist", _MNIST, 10, 0.0, False, "LeNet-300-100 MLP with biases (266,610 params)"
        ),
        ModelSpec(
            "conv7",
            Conv7,
            "mnist",
            _MNIST,
            10,
            0.0,
            True,
            "7 convs + dense, no BatchNorm, he-uniform biases (325,578 params)",
        ),
        ModelSpec(
            "conv2",
            Conv2,
            "cifar10",
            _CIFAR,
            10,
            1e-4,
            False,
            "2 convs (ReLU then BN) + 3 dense layers (4,302,922 trainable)",
        ),
        ModelSpec(
            "conv4",
            Conv4,
            "cifar10",
            _CIFAR,
            10,
            1e-4,
            False,
            "4 convs (ReLU then BN) + 3 dense layers (2,427,722 trainable)",
        ),
        ModelSpec(
            "conv13",
            Conv13,
            "cifar10",
            _CIFAR,
            10,
            1e-4,
            False,
            "VGG-16-style 13 convs (ReLU then BN) + 2 dense layers (14,991,946 trainable)",
        ),
        ModelSpec(
            "resnet", ResNetV1, "cifar10", _CIFAR, 10, 1e-4, False, "CIFAR ResNet v1 of depth 6n+2; pass depth=..."
        ),
        ModelSpec("resnet20", _resnet20, "cifar10", _CIFAR, 10, 1e-4, False, "CIFAR ResNet v1, depth 20 (n=3)"),
        ModelSpec(
            "resnet50",
            _resnet50,
            "cifar10",
            _CIFAR,
            10,
            1e-4,
            False,
            "CIFAR ResNet v1, depth 50 (n=8), the paper's 'ResNet50' (760,266 trainable)",
        ),
        ModelSpec(
            "char-gpt",
            CharGPT,
            "text",
            (128,),
            0,
            0.0,
            False,
            "decoder-only char Transformer, 4 pre-LN layers, width 128, context 128, tied embedding "
            "(809,728 + 128 x vocabulary params: 823,040 with the default corpus)",
            (("vocab_size", 2, MAX_VOCAB),),
        ),
        ModelSpec(
            "vit-tiny",
            ViTTiny,
            "mnist",
            _MNIST,
            10,
            0.0,
            False,
            "vision Transformer, 7x7 patches (16 tokens), 4 pre-LN layers, width 64, mean pooling (204,938 params)",
        ),
        ModelSpec(
            "vit-tiny-cifar",
            _vit_cifar,
            "cifar10",
            _CIFAR,
            10,
            0.0,
            False,
            "vit-tiny for 3x32x32 images, 4x4 patches (64 tokens; 207,946 params)",
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name`` (case-insensitive)."""
    try:
        return MODELS[name.lower()]
    except (KeyError, AttributeError):
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


ENGINE_OPTIONS = ("generator", "vocab_size")  # what the training engine passes to a model class itself


def check_trainable(name: str) -> ModelSpec:
    """``name``'s spec if a run can build it by name alone; else UnknownModelError naming what it lacks
    (``resnet`` needs ``depth=``: its fixed-depth entries train by name)."""
    import inspect

    spec = get_spec(name)
    needs = [
        p.name
        for p in inspect.signature(spec.builder).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ENGINE_OPTIONS
    ]
    if needs:
        others = ", ".join(n for n in MODELS if n.startswith(spec.name) and n != spec.name)
        instead = f" such as {others}" if others else ""
        raise UnknownModelError(
            f"model {spec.name} needs {', '.join(f'{n}=' for n in needs)} and cannot be trained by name; "
            f"choose a model{instead} (see laperm models), or build it in Python with laperm.models.build"
        )
    return spec


def build(
    name: str,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` with the Keras-equivalent initialisation.

    ``seed`` (or a CPU ``generator``, not both) makes the initial weights reproducible on any
    device; with neither, torch's global CPU generator is used. Other keyword arguments go to the
    model class (e.g. ``depth=`` for ``"resnet"``, ``num_classes=``).
    """
    spec = get_spec(name)
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return spec.builder(generator=generator, **kwargs)


def check_options(name: str, options: dict[str, object]) -> None:
    """Refuse options the registry does not list for model ``name``, and values outside their bounds."""
    spec = get_spec(name)
    bounds = {key: (lo, hi) for key, lo, hi in spec.options}
    for key, value in options.items():
        if key not in bounds:
            takes = ", ".join(bounds) or "none"
            raise ModelOptionError(f"model {spec.name} takes no option {key!r} (its options: {takes})")
        lo, hi = bounds[key]
        if type(value) is not int or not lo <= value <= hi:
            raise ModelOptionError(f"model {spec.name}: {key} must be a whole number from {lo} to {hi}, got {value!r}")


def state_numel(name: str, **options: int) -> int:
    """How many numbers model ``name``'s ``state_dict`` holds, counted without allocating them.

    The model is built on the meta device (shapes only), after :func:`check_options`."""
    check_options(name, options)
    try:
        with torch.device("meta"):
            model = get_spec(name).builder(**options)
    except (TypeError, ValueError) as e:  # e.g. "resnet" without its depth
        raise ModelOptionError(f"model {name} cannot be built from these options ({e})") from None
    return sum(t.numel() for t in model.state_dict().values())
