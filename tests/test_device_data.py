"""Device-resident data: augmentation against a hand-written numpy reference, sampler determinism and resume."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from laperm.data.augment import PRESETS, Augment
from laperm.data.device import AffineParams, DeviceAugment, DeviceBatches

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# float32 grid and interpolation against a float64 reference, on the 0..1 scale: a coordinate error of
# ~1e-5 pixel times an intensity step of at most 1 per pixel.
ATOL = 1e-4


def _reference(img: np.ndarray, angle: float, tx: float, ty: float, zx: float, zy: float, flip: bool) -> np.ndarray:
    """One C×H×W uint8 image transformed per the pixel convention of laperm.data.device (float64, per pixel)."""
    c, h, w = img.shape
    x = img.astype(np.float64) / 255
    cx, cy = (w - 1) / 2, (h - 1) / 2
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    dx, dy = jj - cx, ii - cy
    sx = cx + math.cos(angle) * zx * dx - math.sin(angle) * zy * dy + tx
    sy = cy + math.sin(angle) * zx * dx + math.cos(angle) * zy * dy + ty
    sx, sy = np.clip(sx, 0, w - 1), np.clip(sy, 0, h - 1)  # edge pixels repeat
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = sx - x0, sy - y0
    out = (
        x[:, y0, x0] * (1 - fx) * (1 - fy)
        + x[:, y0, x1] * fx * (1 - fy)
        + x[:, y1, x0] * (1 - fx) * fy
        + x[:, y1, x1] * fx * fy
    )
    return out[:, :, ::-1] if flip else out


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", [(3, 32, 32), (1, 28, 28), (3, 12, 20)])
def test_device_augment_matches_the_numpy_reference(device, preset, size):
    aug = DeviceAugment(Augment(**PRESETS[preset]))
    x = _images(16, *size).to(device)
    g = torch.Generator(device=device).manual_seed(3)
    p = aug.draw(len(x), size[1], size[2], g)
    got = aug.apply(x, p).cpu().numpy()
    for i in range(len(x)):
        want = _reference(
            x[i].cpu().numpy(),
            float(p.angle[i]),
            float(p.tx[i]),
            float(p.ty[i]),
            float(p.zx[i]),
            float(p.zy[i]),
            bool(p.flip[i]),
        )
        np.testing.assert_allclose(got[i], want, atol=ATOL, rtol=0)


def test_reference_check_can_fail():
    # A transform off by one pixel must be caught at this tolerance.
    aug = DeviceAugment(Augment(shift=0.2))
    x = _images(1, 1, 16, 16)
    z = torch.zeros(1)
    p = AffineParams(angle=z, tx=z + 1.0, ty=z, zx=z + 1, zy=z + 1, flip=torch.zeros(1, dtype=torch.bool))
    got = aug.apply(x, p)[0].numpy()
    assert np.abs(got - _reference(x[0].numpy(), 0.0, 0.0, 0.0, 1.0, 1.0, False)).max() > 10 * ATOL
    np.testing.assert_allclose(got, _reference(x[0].numpy(), 0.0, 1.0, 0.0, 1.0, 1.0, False), atol=ATOL)


def test_drawn_parameters_cover_the_preset_ranges():
    spec = Augment(rotate=15.0, shift=0.1, zoom=0.2, hflip=True)
    p = DeviceAugment(spec).draw(20000, 32, 24, torch.Generator().manual_seed(0))
    assert p.angle.abs().max() <= math.radians(15) and p.angle.abs().max() > 0.95 * math.radians(15)
    assert p.tx.abs().max() <= 0.1 * 24 and p.ty.abs().max() <= 0.1 * 32 and p.ty.abs().max() > 0.95 * 3.2
    assert ((p.zx - 1).abs().max() <= 0.2) and ((p.zy - 1).abs().max() > 0.19)
    assert 0.47 < p.flip.float().mean() < 0.53
    assert abs(float(p.angle.mean())) < 0.01 and abs(float(torch.corrcoef(torch.stack([p.zx, p.zy]))[0, 1])) < 0.05
    still = DeviceAugment(Augment(rotate=10.0)).draw(100, 8, 8, torch.Generator().manual_seed(0))
    assert not still.flip.any() and torch.equal(still.tx, torch.zeros(100))


def test_identity_transform_returns_the_images():
    x = _images(4, 3, 8, 8)
    aug = DeviceAugment(Augment(shift=0.1))
    z = torch.zeros(4)
    p = AffineParams(angle=z, tx=z, ty=z, zx=z + 1, zy=z + 1, flip=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(aug.apply(x, p), x.float() / 255, atol=1e-6, rtol=0)


def test_device_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="fill='nearest'"):
        DeviceAugment(Augment(shift=0.1, fill="zero"))
    with pytest.raises(TypeError, match="uint8"):
        DeviceAugment(Augment(shift=0.1))(torch.rand(2, 1, 4, 4), torch.Generator())


def _batches(**kw: Any) -> DeviceBatches:
    x, y = _images(103, 3, 8, 8, seed=1), torch.arange(103) % 10
    args: dict[str, Any] = dict(
        seed=5, device="cpu", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), augment=Augment(**PRESETS["cifar-paper"])
    )
    return DeviceBatches(x, y, 10, **{**args, **kw})


def test_batches_are_a_seeded_permutation_per_epoch_normalised():
    data = _batches(augment=None)
    epoch0 = list(data)
    assert len(epoch0) == 10 and data.epoch == 1  # 103 // 10, the short batch dropped
    labels = torch.cat([y for _, y in epoch0])
    xs = torch.cat([x for x, _ in epoch0])
    # every row once; the images are the normalised uint8 rows of the same samples
    rows = [
        int(torch.nonzero((data.x.float() / 255 - data.mean).div(data.std).flatten(1).eq(r.flatten()).all(1))[0])
        for r in xs
    ]
    assert len(set(rows)) == 100 and torch.equal(labels, data.y[rows])
    assert rows != sorted(rows)
    epoch1 = list(data)
    assert not torch.equal(epoch1[0][1], epoch0[0][1]) or not torch.equal(epoch1[1][1], epoch0[1][1])
    again = _batches(augment=None)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(again), epoch0, strict=True))


def test_resume_mid_epoch_gives_the_same_batches():
    data = _batches()
    it = iter(data)
    for _ in range(4):
        next(it)
    state = data.state_dict()
    rest = [b for b in it] + list(data)
    resumed = _batches(seed=5)
    resumed.load_state_dict(state)
    again = list(resumed) + list(resumed)
    assert len(rest) == len(again) == 16
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, again, strict=True))
    with pytest.raises(ValueError, match="seed"):
        _batches(seed=6).load_state_dict(state)


def test_channels_last_batches_hold_the_same_values():
    a, b = next(iter(_batches())), next(iter(_batches(channels_last=True)))
    assert b[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(a[0], b[0])
