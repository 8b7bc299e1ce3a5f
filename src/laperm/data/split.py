"""Seeded train/validation index splits."""

from __future__ import annotations

import numbers

import torch


def train_val_split(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into disjoint, sorted int64 index tensors ``(train_idx, val_idx)``.

    ``val_size`` is a count (``0 <= val_size < n``) or a fraction
    (``0.0 <= val_size < 1.0``, rounded to the nearest count).  The same
    ``seed`` always gives the same split, independent of global RNG state.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, numbers.Integral):
        if not 0 <= val_size < n:
            raise ValueError(
                f"val_size={val_size} must satisfy 0 <= val_size < n={n} (the training part may not be empty)"
            )
        k = int(val_size)
    else:
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"fractional val_size={val_size} must be in [0, 1)")
        k = min(round(val_size * n), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Sorted indices keep gathers cache-friendly; the loader shuffles anyway.
    return perm[k:].sort().values, perm[:k].sort().values


def random_subset(idx: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded random sample of ``n`` entries of ``idx`` (all of it if shorter), sorted.

    Not the first ``n``: image folders and zips list their images class by class, so a
    prefix of a sorted index holds one or two classes.
    """
    pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]
    return idx[pick.sort().values]
