"""The in-memory :class:`Dataset` container and per-channel statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)  # comparing tensors with == is ambiguous; compare fields explicitly
class Dataset:
    """A whole image-classification dataset held in memory.

    Images stay ``uint8`` (N×C×H×W) to keep memory small (CIFAR-10 is 180 MB
    instead of 720 MB as float32); :class:`~laperm.data.BatchLoader` converts
    and normalises one batch at a time.  ``mean`` and ``std`` are per-channel
    values on the 0..1 scale: a batch is normalised as ``(x / 255 - mean) / std``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        # The default dataclass repr would print whole tensors.
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and population std of uint8 images on the 0..1 scale.

    Counts pixel values with a 256-bin histogram per channel, chunk by chunk,
    so the result is exact and memory stays small even for 50 000 images.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 N×C×H×W images, got {x.dtype} with shape {tuple(x.shape)}")
    channels = x.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].cpu()
        for c in range(channels):
            counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / n
    var = (counts * values**2).sum(dim=1) / n - mean**2
    std = var.clamp_min(0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
