"""Deterministic, resumable mini-batches straight from in-memory uint8 tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, so (seed, epoch, batch) streams never overlap."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 (or 0..1 float) images -> float32 ``(x / 255 - mean) / std``, per channel."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class BatchLoader:
    """Iterate over ``(x, y)`` in mini-batches with no per-sample Python work.

    Each ``for`` loop over the loader is one epoch of ``len(loader)`` batches
    ``(xb, yb)``: ``xb`` float32 N×C×H×W, normalised as ``(x/255 - mean)/std``
    after augmentation; ``yb`` int64; both on ``device``.  The uint8 batch is
    gathered where ``x`` lives, moved to ``device`` (4× less traffic than
    float) and converted there.

    Determinism: the sample order of epoch ``e`` comes from a generator seeded
    by ``(seed, e)`` and the augmentation of batch ``i`` from ``(seed, e, i)``,
    so any batch can be reproduced bit-exactly without replaying earlier ones.
    Completing an iteration advances :attr:`epoch`; an interrupted one
    (``break``) does not, and the next ``for`` loop starts that epoch afresh.

    Resuming: :meth:`state_dict` taken inside the loop body after batch ``i``
    records ``batch = i + 1``; after :meth:`load_state_dict`, the next
    iteration yields exactly batches ``i + 1 ..`` of that epoch (same samples,
    same augmentation), then later iterations continue with the next epochs.

    ``indices`` restricts the loader to a subset (e.g. a validation split)
    without copying the images.

    ``shard=(rank, world)`` is for data-parallel training: every rank walks the
    same global batches (same order, same length) and keeps rows
    ``rank::world`` of each, so ``world`` ranks together see exactly the
    batches one process would.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        indices: torch.Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise TypeError(f"x must be uint8 N×C×H×W, got {x.dtype} with shape {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) not in (1, x.shape[1]) or len(std) not in (1, x.shape[1]):
            raise ValueError(f"mean/std need 1 or {x.shape[1]} values, got {len(mean)} and {len(std)}")
        self.x, self.y = x, y if y.dtype == torch.int64 else y.long()
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64).cpu()
        self.n = len(x) if self.indices is None else len(self.indices)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # Built once on the target device, not per batch.
        self._mean_t = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        self.augment = augment
        self.device = torch.device(device)
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        self.shard = (int(rank), int(world))
        self.epoch = 0  # epoch the next iteration will run
        self._batch = 0  # batches of the current (or last interrupted) iteration already yielded
        self._resume: int | None = None  # start batch set by load_state_dict

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """Row indices into ``x`` in the order epoch ``epoch`` visits them."""
        rows = self.indices if self.indices is not None else torch.arange(self.n)
        if not self.shuffle:
            return rows
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0))
        return rows[torch.randperm(self.n, generator=g)]

    def make_batch(self, rows: torch.Tensor, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, move, convert, augment and normalise the batch for ``rows``."""
        # non_blocking only host -> GPU; a GPU -> host copy must finish before we read it.
        non_blocking = self.device.type == "cuda"
        xb = self.x.index_select(0, rows.to(self.x.device)).to(self.device, non_blocking=non_blocking)
        yb = self.y.index_select(0, rows.to(self.y.device)).to(self.device, non_blocking=non_blocking)
        xb = xb.float().div_(255)
        if self.augment is not None:
            # Augment on the 0..1 scale (like Keras, so zero fill is black), then normalise.
            xb = self.augment(xb, torch.Generator().manual_seed(derive_seed(self.seed, epoch, index, 1)))
        return normalize(xb, self._mean_t, self._std_t), yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._resume or 0
        self._resume, self._batch = None, start
        rows = self.order(epoch)
        rank, world = self.shard
        for i in range(start, len(self)):
            batch_rows = rows[i * self.batch_size : (i + 1) * self.batch_size]
            xb, yb = self.make_batch(batch_rows[rank::world] if world > 1 else batch_rows, epoch, i)
            self._batch = i + 1  # count it before yielding: a checkpoint in the loop body has consumed it
            yield xb, yb
        self.epoch, self._batch = epoch + 1, 0

    def global_batch_size(self, index: int) -> int:
        """Rows in batch ``index`` across all shards (the last batch may be short)."""
        return min(self.batch_size, self.n - index * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` from its start.

        A no-op for the epoch a :meth:`load_state_dict` is about to resume,
        so ``load_state_dict(...); set_epoch(saved_epoch)`` keeps the position.
        """
        if self._resume is not None and epoch == self.epoch:
            return
        self.epoch, self._batch, self._resume = int(epoch), 0, None

    def state_dict(self) -> dict:
        """Position (``epoch``, ``batch``) plus the settings that must match on resume."""
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "seed": self.seed,
            "n": self.n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}"
                )
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"cannot resume at batch {state['batch']}: an epoch has {len(self)} batches")
        self.epoch, self._batch, self._resume = int(state["epoch"]), int(state["batch"]), int(state["batch"])
