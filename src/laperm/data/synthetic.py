"""A small, seeded, learnable dataset for tests and CI end-to-end runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import Dataset, channel_stats


def synthetic_dataset(
    n_train: int = 512,
    n_test: int = 256,
    shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 0.3,
    name: str = "synthetic",
) -> Dataset:
    """Images = a smooth class-specific pattern + Gaussian pixel noise, stored as uint8.

    Each class has a random prototype (a coarse random grid upsampled
    bilinearly, so it has spatial structure a conv net can use); samples add
    noise of std ``noise`` on the 0..1 scale.  A tiny MLP or CNN learns it in
    a few hundred steps; the same ``seed`` always gives the same tensors.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    if num_classes < 2 or n_train < 1 or n_test < 1:
        raise ValueError("need num_classes >= 2 and n_train, n_test >= 1")
    c, h, w = (int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, c, max(2, h // 4), max(2, w // 4), generator=g)
    prototypes = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Balanced labels in random order.
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = prototypes[y] + noise * torch.randn(n, c, h, w, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y.to(torch.int64)

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    mean, std = channel_stats(train_x)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=[str(i) for i in range(num_classes)],
        mean=mean,
        std=std,
    )
