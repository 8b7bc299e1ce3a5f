"""Sharded parameters (``DTensor``, as FSDP2's ``fully_shard`` makes them) for LaPerm.

A sync rearranges values *within* each row (one output unit's incoming
weights).  When a parameter is sharded on dim 0 every row lies whole on one
rank, so each rank syncs its local rows against the sorted θ0 of those rows,
and no values ever cross ranks: a sync needs no collective at all.  A
placement that cuts rows across ranks (``Shard(d)`` with ``d > 0``, any shard
of a ``"tensor"``-granularity or transposed layout, ``Partial``) would need
one, so it is refused when the optimizer is built.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
from torch import Tensor

from .reconnect import RowLayout

__all__ = ["is_sharded", "local", "check_rows_whole", "like", "all_ranks_agree"]

DTENSOR_MODULE = "torch.distributed.tensor"


def is_sharded(t: Any) -> bool:
    """True for a ``DTensor`` (sharded or replicated over a device mesh).

    torch.distributed.tensor is not imported here (a second of every ``laperm`` command's start):
    a DTensor exists only once its module has been imported, so until then nothing is one."""
    module = sys.modules.get(DTENSOR_MODULE)
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """The rows this rank holds: the local shard of a ``DTensor``, else ``t`` itself (writes go through)."""
    return cast(Any, t).to_local() if is_sharded(t) else t


def check_rows_whole(p: Tensor, layout: RowLayout, name: str) -> None:
    """Raise ValueError unless every row of ``p`` (under ``layout``) lies whole on one rank."""
    if not is_sharded(p):
        return
    from torch.distributed.tensor import Replicate, Shard  # (loaded already: p is a DTensor)

    placements = cast(Any, p).placements
    rows_on_dim0 = layout.granularity == "row" and not layout.transposed and not layout.unit_dim and p.dim() >= 2
    for placement in placements:
        if isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0 and rows_on_dim0):
            continue
        raise ValueError(
            f"parameter {name} is placed as {placement} on its device mesh, which splits its permutation rows "
            "across ranks; LaPerm syncs whole rows locally, so shard only on dim 0 (FSDP2's default "
            "fully_shard) with row granularity, or leave this parameter out of the permuted groups (permute=False)"
        )


def like(p: Tensor, rows: Tensor) -> Tensor:
    """Wrap this rank's ``(local rows, n)`` matrix as a ``DTensor`` placed like ``p`` (rows on dim 0).

    Checkpoints written through ``torch.distributed.checkpoint`` then store
    every rank's rows under one global tensor instead of de-duplicating them
    as if they were replicated.
    """
    if not is_sharded(p):
        return rows
    from torch.distributed.tensor import DTensor  # (loaded already: p is a DTensor)

    n, sharded = rows.shape[1], cast(Any, p)
    return DTensor.from_local(
        rows, sharded.device_mesh, sharded.placements, run_check=False, shape=torch.Size((p.shape[0], n)), stride=(n, 1)
    )


def all_ranks_agree(ok: bool, params: list[Tensor]) -> bool:
    """``ok`` on every rank of the default process group (one all-reduce) when any parameter is a DTensor."""
    if not any(is_sharded(p) for p in params) or not torch.distributed.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], device=local(params[0]).device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())
