"""Batch-level image augmentation with plain torch ops (no torchvision).

Every function takes a float batch ``x`` (N×C×H×W, on any device, 0..1 scale)
and a CPU ``torch.Generator``.  Random parameters are drawn on the CPU
generator and then moved to ``x.device``, so results are identical on CPU and
CUDA for a given seed and the same code runs everywhere.

Geometry follows Keras ``ImageDataGenerator`` (used by the LaPerm paper):
``rotate`` in degrees drawn from [-r, r], ``shift`` as a fraction of width /
height drawn from [-s, s], ``zoom`` factors drawn independently for x and y
from [1 - z, 1 + z] (> 1 zooms out), bilinear interpolation, and
``fill="nearest"`` (Keras' default ``fill_mode``: repeat the edge pixels,
i.e. ``grid_sample(padding_mode="border")``).  ``fill="zero"`` pads with black.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
_PADDING = {"nearest": "border", "zero": "zeros"}


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"augmentations need a float N×C×H×W batch, got {x.dtype} with shape {tuple(x.shape)}")


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    _check(x)
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    degrees: float = 0.0,
    shift: float = 0.0,
    zoom: float = 0.0,
    fill: str = "nearest",
) -> torch.Tensor:
    """Random rotation, shift and zoom per image, combined into one resampling pass."""
    _check(x)
    if fill not in _PADDING:
        raise ValueError(f"fill must be one of {sorted(_PADDING)}, got {fill!r}")
    n, _, h, w = x.shape
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(degrees)
    tx, ty = u[:, 1] * shift * 2, u[:, 2] * shift * 2  # normalised coords span 2 units per image side
    zx, zy = 1 + u[:, 3] * zoom, 1 + u[:, 4] * zoom
    cos, sin = angle.cos(), angle.sin()
    # Output -> input map R(angle)·diag(zx, zy) in pixel units, rewritten for
    # affine_grid's [-1, 1] coordinates (the h/w factors keep non-square images undistorted).
    theta = torch.stack(
        [
            torch.stack([cos * zx, -sin * zy * h / w, tx], dim=1),
            torch.stack([sin * zx * w / h, cos * zy, ty], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=_PADDING[fill], align_corners=False)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_frac: float, fill: str = "nearest") -> torch.Tensor:
    """Translate by up to ``max_frac`` of the width and height (Keras ``width/height_shift_range``)."""
    return random_affine(x, generator, shift=max_frac, fill=fill)


def random_rotate(
    x: torch.Tensor, generator: torch.Generator, max_degrees: float, fill: str = "nearest"
) -> torch.Tensor:
    """Rotate by an angle drawn from [-max_degrees, max_degrees] (Keras ``rotation_range``)."""
    return random_affine(x, generator, degrees=max_degrees, fill=fill)


def random_zoom(x: torch.Tensor, generator: torch.Generator, max_frac: float, fill: str = "nearest") -> torch.Tensor:
    """Scale x and y independently by factors in [1 - max_frac, 1 + max_frac] (Keras ``zoom_range``)."""
    return random_affine(x, generator, zoom=max_frac, fill=fill)


@dataclass(frozen=True)
class Augment:
    """A picklable augmentation pipeline: one affine resample, then an optional flip."""

    rotate: float = 0.0
    shift: float = 0.0
    zoom: float = 0.0
    hflip: bool = False
    fill: str = "nearest"

    def __post_init__(self) -> None:
        if self.rotate < 0 or not 0 <= self.shift < 1 or not 0 <= self.zoom < 1:
            raise ValueError(f"need rotate >= 0 and shift, zoom in [0, 1), got {asdict(self)}")
        if self.fill not in _PADDING:
            raise ValueError(f"fill must be one of {sorted(_PADDING)}, got {self.fill!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.rotate or self.shift or self.zoom:
            x = random_affine(x, generator, degrees=self.rotate, shift=self.shift, zoom=self.zoom, fill=self.fill)
        if self.hflip:
            x = random_hflip(x, generator)
        return x


PRESETS: dict[str, dict] = {
    "mnist-paper": {"rotate": 10.0, "zoom": 0.1, "shift": 0.1},  # Conv7 on MNIST
    "cifar-paper": {"rotate": 15.0, "shift": 0.1, "hflip": True},  # Conv2/4/13 on CIFAR-10
    "cifar-resnet": {"shift": 0.1, "hflip": True},  # Keras ResNet example
}


def make_augment(spec: str | dict | Augment | None) -> Augment | None:
    """Build an :class:`Augment` from a preset name, a dict of its fields, or ``None``/``"none"`` (no augmentation)."""
    if spec is None or isinstance(spec, Augment):
        return spec
    if isinstance(spec, str):
        if spec.lower() in ("none", ""):
            return None
        if spec not in PRESETS:
            raise ValueError(f"unknown augmentation preset {spec!r}; choose one of {['none', *PRESETS]}")
        return Augment(**PRESETS[spec])
    if isinstance(spec, dict):
        unknown = set(spec) - set(Augment.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown augmentation keys {sorted(unknown)}; allowed: {list(Augment.__dataclass_fields__)}"
            )
        return Augment(**spec)
    raise TypeError(f"augmentation spec must be a preset name, a dict or None, got {type(spec).__name__}")
