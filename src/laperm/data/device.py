"""The training set resident on the device, augmented and batched there: no host work per batch.

This is the GPU fast path's data source.  It sits *beside* :class:`laperm.data.loader.BatchLoader`
(which gathers on the host and draws its random numbers on a CPU generator), and does not replace
it: existing runs keep their loader and their exact batches; only a run that selects the device
path gets these (a different random stream, so different, equally distributed, batches).

* :class:`DeviceAugment` -- the paper's augmentations (:mod:`laperm.data.augment`'s geometry:
  rotation, shift, zoom as one bilinear resample with edge-repeating fill, then a horizontal flip)
  for a whole uint8 batch at once: one ``affine_grid`` + ``grid_sample`` and one ``torch.where``,
  with the random parameters drawn on a generator that lives on the device.
* :class:`DeviceBatches` -- all training images as uint8 on the device, a seeded permutation per
  epoch drawn there, and batches gathered, augmented and normalised there.  Its state (epoch,
  batch, generator states) is saved and restored, so a resumed run sees exactly the batches it
  would have seen.

The same code runs on CPU (tests) and CUDA; the random streams differ between the two (CPU and
CUDA generators are different algorithms), each one deterministic for its seed.

Pixel convention (as ``grid_sample(align_corners=False)``): pixel ``j`` of an image ``W`` wide
has its centre at ``j``; the centre of the image is ``c = (W - 1) / 2``.  An output pixel at
offset ``d = (j - cx, i - cy)`` from the centre takes the bilinear sample of the input at
``c + R(angle) · diag(zx, zy) · d + (tx, ty)``, the coordinates clamped to ``[0, W - 1]`` and
``[0, H - 1]`` (Keras' ``fill_mode="nearest"``: the edge pixels repeat); ``tx, ty`` are pixels
(``shift`` × width or height).  A flipped image is mirrored after the resample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import Augment
from .loader import derive_seed

__all__ = ["AffineParams", "DeviceAugment", "DeviceBatches"]


@dataclass
class AffineParams:
    """One batch's random transform: per image angle (radians), shift (pixels), zoom factors, flip."""

    angle: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    zx: torch.Tensor
    zy: torch.Tensor
    flip: torch.Tensor  # bool


class DeviceAugment:
    """An :class:`~laperm.data.augment.Augment` applied to a whole uint8 batch on its device."""

    def __init__(self, spec: Augment) -> None:
        if spec.fill != "nearest":
            raise ValueError(
                f"the device augmentation repeats edge pixels (fill='nearest'), got fill={spec.fill!r}; "
                "use the host loader for other fills"
            )
        self.spec = spec

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> AffineParams:
        """Random parameters for ``n`` images, drawn on ``generator``'s device (no host sync)."""
        s = self.spec
        u = torch.rand(n, 6, generator=generator, device=generator.device) * 2 - 1  # uniform in [-1, 1)
        return AffineParams(
            angle=u[:, 0] * math.radians(s.rotate),
            tx=u[:, 1] * (s.shift * width),
            ty=u[:, 2] * (s.shift * height),
            zx=1 + u[:, 3] * s.zoom,
            zy=1 + u[:, 4] * s.zoom,
            flip=(u[:, 5] < 0) if s.hflip else torch.zeros_like(u[:, 5], dtype=torch.bool),
        )

    def apply(self, x: torch.Tensor, p: AffineParams) -> torch.Tensor:
        """The float32 (0..1 scale) batch for uint8 ``x`` (N×C×H×W) under the transforms ``p``."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise TypeError(f"the device augmentation takes a uint8 N×C×H×W batch, got {x.dtype} {tuple(x.shape)}")
        xf = x.float().div_(255)
        s = self.spec
        if s.rotate or s.shift or s.zoom:
            xf = F.grid_sample(xf, self._grid(p, x.shape), mode="bilinear", padding_mode="border", align_corners=False)
        if s.hflip:
            xf = torch.where(p.flip.view(-1, 1, 1, 1), xf.flip(-1), xf)
        return xf

    @staticmethod
    def _grid(p: AffineParams, shape: torch.Size) -> torch.Tensor:
        """``affine_grid`` for the pixel-unit map of the module docstring, in its [-1, 1] coordinates."""
        _, _, h, w = shape
        cos, sin = p.angle.cos(), p.angle.sin()
        # Normalised x = pixel offset * 2 / w (y: * 2 / h): the h/w factors keep the rotation rigid.
        theta = torch.stack(
            [
                torch.stack([cos * p.zx, -sin * p.zy * h / w, p.tx * 2 / w], dim=1),
                torch.stack([sin * p.zx * w / h, cos * p.zy, p.ty * 2 / h], dim=1),
            ],
            dim=1,
        )
        return F.affine_grid(theta, list(shape), align_corners=False)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], x.shape[2], x.shape[3], generator))


class DeviceBatches:
    """Training batches gathered, augmented and normalised on ``device`` from a uint8 copy held there.

    Each epoch draws a permutation of the samples on a device generator seeded by ``(seed,
    epoch)``; augmentation draws come from a second device generator seeded by ``(seed, epoch,
    1)`` at the start of each epoch.  Iterating yields ``(x, y)``: float32 N×C×H×W normalised as
    ``(x/255 - mean)/std``, int64 labels; the last short batch is dropped when ``drop_last``.
    Nothing in an iteration waits for the device.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        seed: int,
        device: str | torch.device,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        augment: Augment | None = None,
        drop_last: bool = True,
        channels_last: bool = False,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise TypeError(f"x must be uint8 N×C×H×W, got {x.dtype} with shape {tuple(x.shape)}")
        if len(x) != len(y) or batch_size < 1 or (drop_last and batch_size > len(x)):
            raise ValueError(
                f"need len(x) == len(y) and 1 <= batch_size <= samples, got {len(x)} images, "
                f"{len(y)} labels, batch_size {batch_size}"
            )
        self.device = torch.device(device)
        self.x = x.to(self.device)  # uint8: 4x smaller than float (CIFAR-10: 150 MB)
        self.y = y.to(self.device, torch.int64)
        self.batch_size, self.seed, self.drop_last, self.channels_last = batch_size, seed, drop_last, channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.augment = None if augment is None else DeviceAugment(augment)
        self._order_gen = torch.Generator(device=self.device)
        self._aug_gen = torch.Generator(device=self.device)
        self.epoch, self._batch = 0, 0
        self._order: torch.Tensor | None = None
        self._start_epoch(0)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self._batch = epoch, 0
        self._order_gen.manual_seed(derive_seed(self.seed, epoch, 0))
        self._order = torch.randperm(len(self.x), generator=self._order_gen, device=self.device)
        self._aug_gen.manual_seed(derive_seed(self.seed, epoch, 1))

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of the current epoch (advances the augmentation generator)."""
        assert self._order is not None
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        xb, yb = self.x.index_select(0, rows), self.y.index_select(0, rows)
        xf = self.augment(xb, self._aug_gen) if self.augment is not None else xb.float().div_(255)
        xf = (xf - self.mean) / self.std
        if self.channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        return xf, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch; a completed iteration moves to the next epoch."""
        while self._batch < len(self):
            i = self._batch
            self._batch += 1  # counted before yielding: a checkpoint in the loop body has consumed it
            yield self.batch(i)
        self._start_epoch(self.epoch + 1)

    def global_batch_size(self, index: int) -> int:
        """Rows in batch ``index`` (the last batch may be short): the engine's loader interface."""
        return min(self.batch_size, len(self.x) - index * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch (a no-op when it is the epoch in progress)."""
        if epoch != self.epoch:
            self._start_epoch(int(epoch))

    def state_dict(self) -> dict:
        """Position and generator states: enough to continue with exactly the same batches."""
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "seed": self.seed,
            "n": len(self.x),
            "batch_size": self.batch_size,
            "aug_generator": self._aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, ours in (("seed", self.seed), ("n", len(self.x)), ("batch_size", self.batch_size)):
            if state[key] != ours:
                raise ValueError(f"cannot resume: saved data state has {key}={state[key]!r}, this one {ours!r}")
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"cannot resume at batch {state['batch']}: an epoch has {len(self)} batches")
        self._start_epoch(int(state["epoch"]))
        self._batch = int(state["batch"])
        self._aug_gen.set_state(state["aug_generator"])
