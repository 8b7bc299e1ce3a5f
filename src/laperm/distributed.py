"""Data-parallel training with ``torch.distributed`` (DDP), as launched by ``torchrun``.

LaPerm needs nothing special under DistributedDataParallel: every rank holds
an identical replica, DDP all-reduces the gradients, the inner optimizer takes
the same step everywhere, and the sync (a deterministic sort) then leaves the
same weights on every rank.  This module only sets the process group up, says
who is who, and can *prove* the replicas agree after each sync by comparing a
checksum of the permuted weights across ranks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .reconnect import float_bits

__all__ = ["Dist", "setup", "teardown", "DivergenceError", "replica_checksum", "ReplicaCheck"]

DEFAULT_TIMEOUT_S = 300  # a dead peer fails the job after this long instead of hanging forever


class DivergenceError(RuntimeError):
    """Ranks hold different weights after a sync."""


@dataclass(frozen=True)
class Dist:
    """Who this process is in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Sum scalars over ranks (float64), in one collective."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(self.all_sum(float(flag))[0]) if self.enabled else flag

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (e.g. BatchNorm running statistics)."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, src=0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device, timeout_s: int = DEFAULT_TIMEOUT_S) -> tuple[Dist, torch.device]:
    """Join the process group described by torchrun's environment (no-op for one process).

    Uses NCCL on CUDA (one GPU per local rank) and gloo on CPU.  A process group the
    caller has already initialised is used as it is, and :func:`teardown` leaves it alone.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # the caller's own group
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank), _rank_device(device, local_rank)
    if not launched_by_torchrun():
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _rank_device(device, local_rank)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return Dist(rank, world, local_rank, owns_group=True), device


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per local rank (and made current); other devices as they are."""
    if device.type != "cuda":
        return device
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def teardown(d: Dist, finished: bool = False) -> None:
    """Destroy the process group if :func:`setup` created it for ``d`` (never a caller's own).

    ``finished``: every rank got through the run, so all of them wait for each other first and
    none takes its connections down while a peer is still writing or verifying (a rank that
    tore down early was seen to abort at exit in CI). After a failure there is no barrier: a
    peer may be gone, and the launcher stops the others.
    """
    if d.owns_group and dist.is_initialized():
        if finished:
            try:
                dist.barrier()
            except RuntimeError:  # a peer went away after finishing: nothing left to wait for
                pass
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def replica_checksum(params: list[torch.Tensor]) -> int:
    """An exact 63-bit checksum of the bit patterns of ``params`` (position-sensitive)."""
    total = 0
    for i, p in enumerate(params):
        bits = p.detach().contiguous().view(-1)
        bits = float_bits(bits).long()
        # Weight each element by its position so that swapped values change the sum.
        pos = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
        total = (total * 1_000_003 + int((bits * pos).sum()) + i) % (1 << 63)
    return total


class ReplicaCheck:
    """A LaPerm sync hook that fails loudly if the ranks' permuted weights differ."""

    def __init__(self, d: Dist) -> None:
        self.d = d
        self.checks = 0

    def __call__(self, optimizer: Any, params: list[torch.Tensor]) -> None:
        sums = self.d.gather_objects(replica_checksum(params))
        self.checks += 1
        if len(set(sums)) != 1:
            step = optimizer.param_groups[0].get("laperm_step")
            raise DivergenceError(
                f"replicas differ after the sync at step {step} (checksums {sums}); "
                "the ranks no longer hold identical weights"
            )
