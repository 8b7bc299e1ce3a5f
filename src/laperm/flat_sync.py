"""One sync of many tensors in a fixed handful of kernels, whatever their number and row lengths.

:func:`sync_flat_` synchronises every row of every tensor at once (docs/algorithm.md §2's rule,
bit-identical to :func:`laperm.reconnect.sync_tensor_` on each tensor):

1. the tensors' memory (each seen as a flat view in its own memory order: contiguous,
   channels_last, or any other dense layout) is concatenated into one buffer (one ``cat``);
2. one precomputed gather puts every element in *row order* (rows of all tensors one after
   another, each row in the column order of :func:`laperm.reconnect.to_rows`), skipped when that
   already is the memory order;
3. two stable sorts give every row's stable argsort at once: all values by value (ties keep row
   order), then those positions by their row id (which keeps, within a row, the order by
   ``(value, column)``);
4. the concatenated sorted initial rows are scattered to those positions (mapped back to memory
   positions), and one ``_foreach_copy_`` writes every tensor in place.

The index tensors (row id of every element, the row-order gather) depend only on the tensors'
shapes, strides and layouts; they are built once and cached (:data:`PLAN_CACHE_SIZE` sets of
shapes).  So a sync is about ten kernels plus the per-tensor *views* (no kernels), where the
per-length kernel (:func:`laperm.reconnect.sync_many_`) launches a sort, a scatter and copies
per row length and per non-contiguous tensor.  The sorts are global, not per row: on CPU the
threaded per-tensor kernel stays faster (``benchmarks/sync.py``), so :class:`laperm.optim.LaPerm`
uses this one for CUDA tensors.  Assumes finite values (the optional ``check`` runs first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .reconnect import RowLayout, sync_many_, to_rows

__all__ = ["sync_flat_", "PLAN_CACHE_SIZE"]

PLAN_CACHE_SIZE = 16
"""Sets of (shapes, strides, layouts) whose index tensors are kept (least recently used dropped)."""


@dataclass(frozen=True)
class _Plan:
    """The static part of a flat sync of tensors with given shapes, strides and layouts."""

    orders: tuple[tuple[int, ...] | None, ...]  # dim order making each tensor contiguous (None: already)
    sizes: tuple[int, ...]  # elements of each tensor
    rows: tuple[tuple[int, int], ...]  # each tensor's row-matrix shape
    segments: Tensor  # row id of every element, in row order (int32; int64 past 2**31 rows)
    gather: Tensor | None  # memory position of every row-order position (None: the identity)


_plans: OrderedDict[tuple, _Plan] = OrderedDict()


def sync_flat_(
    tensors: Sequence[Tensor],
    sorted_vals: Sequence[Tensor],
    layouts: Sequence[RowLayout],
    check: Callable[[list[Tensor]], None] | None = None,
) -> None:
    """Synchronise ``tensors`` in place against their sorted initial rows, all rows at once.

    Same arguments as :func:`laperm.reconnect.sync_many_`, and bit-identical to it and to
    :func:`laperm.reconnect.sync_tensor_` on each tensor.  Tensors are batched per
    ``(dtype, device)``; a tensor whose memory is not dense (overlapping or gapped strides) goes
    through ``sync_many_``.  ``check``, when given, is called once, before anything is written,
    with the values of all tensors (one flat tensor per batch; e.g. a finite check that raises).
    """
    if not len(tensors) == len(sorted_vals) == len(layouts):
        raise ValueError(
            f"sync_flat_ needs one sorted matrix and one layout per tensor, got {len(tensors)} "
            f"tensors, {len(sorted_vals)} sorted matrices and {len(layouts)} layouts"
        )
    batches: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    odd: list[int] = []
    for i, t in enumerate(tensors):
        (odd if _dense_order(t) is False else batches.setdefault((t.dtype, t.device), [])).append(i)
    with torch.no_grad():
        gathered = [
            _gather([tensors[i] for i in b], [layouts[i] for i in b], [sorted_vals[i] for i in b])
            for b in batches.values()
        ]
        if check is not None:
            check([g.values for g in gathered] + [tensors[i].detach().reshape(-1) for i in odd])
        for g, b in zip(gathered, batches.values(), strict=True):
            _write(g, [sorted_vals[i] for i in b])
        if odd:
            sync_many_([tensors[i] for i in odd], [sorted_vals[i] for i in odd], [layouts[i] for i in odd])


@dataclass
class _Gathered:
    """One batch's values, ready to sort: the plan, the tensors' memory views and a copy of them."""

    plan: _Plan
    views: list[Tensor]  # each tensor's memory, 1-D views that write through
    memory: Tensor  # a fresh copy of the views, concatenated
    values: Tensor  # memory in row order (memory itself when that is the same)


def _gather(tensors: list[Tensor], layouts: list[RowLayout], sorted_vals: list[Tensor]) -> _Gathered:
    """The values of tensors of one dtype and device, all with dense memory, in row order."""
    plan = _plan(tensors, layouts)
    for t, s, shape in zip(tensors, sorted_vals, plan.rows, strict=True):
        if tuple(s.shape) != shape:
            raise ValueError(
                f"row matrix shape {shape} of a {tuple(t.shape)} tensor does not match the stored "
                f"sorted values {tuple(s.shape)}"
            )
    views = [_memory_view(t.detach(), order) for t, order in zip(tensors, plan.orders, strict=True)]
    memory = torch.cat(views)
    return _Gathered(plan, views, memory, memory if plan.gather is None else memory[plan.gather])


def _write(g: _Gathered, sorted_vals: list[Tensor]) -> None:
    """Give every row's sorted initial values to its ranks, and write the tensors in place."""
    plan = g.plan
    order = torch.sort(g.values, stable=True).indices  # by value; ties in row order
    order = order[torch.sort(plan.segments[order], stable=True).indices]  # then by row: (row, value, column)
    target = order if plan.gather is None else plan.gather[order]
    new = torch.cat([s.reshape(-1) for s in sorted_vals]).to(device=g.memory.device, dtype=g.memory.dtype)
    g.memory.index_put_((target,), new)  # (memory is the cat's fresh output, not the tensors)
    torch._foreach_copy_(g.views, list(g.memory.split(plan.sizes)))


def _plan(tensors: list[Tensor], layouts: list[RowLayout]) -> _Plan:
    """The cached plan for these shapes, strides and layouts (built on first use)."""
    device = tensors[0].device
    key = (device, *((tuple(t.shape), t.stride(), lay) for t, lay in zip(tensors, layouts, strict=True)))
    plan = _plans.get(key)
    if plan is None:
        plan = _build_plan(tensors, layouts, device)
        _plans[key] = plan
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def _build_plan(tensors: list[Tensor], layouts: list[RowLayout], device: torch.device) -> _Plan:
    orders, sizes, rows, segments, gather = [], [], [], [], []
    offset = first_row = 0
    for t, layout in zip(tensors, layouts, strict=True):
        order = _dense_order(t)
        if order is False:  # (sync_flat_ routes these elsewhere)
            raise AssertionError("a tensor without dense memory reached the flat plan")
        # Memory position of every element, laid out like t: to_rows of it is the gather.
        where = torch.empty_strided(t.shape, t.stride(), dtype=torch.int64)
        _memory_view(where, order).copy_(torch.arange(offset, offset + t.numel()))
        r = to_rows(where, layout)
        orders.append(order)
        sizes.append(t.numel())
        rows.append((int(r.shape[0]), int(r.shape[1])))
        gather.append(r.reshape(-1))
        segments.append(torch.arange(first_row, first_row + r.shape[0]).repeat_interleave(r.shape[1]))
        offset += t.numel()
        first_row += r.shape[0]
    flat = torch.cat(gather)
    identity = bool(torch.equal(flat, torch.arange(offset)))
    seg_type = torch.int32 if first_row < 2**31 else torch.int64
    return _Plan(
        tuple(orders),
        tuple(sizes),
        tuple(rows),
        torch.cat(segments).to(device=device, dtype=seg_type),
        None if identity else flat.to(device),
    )


def _dense_order(t: Tensor) -> tuple[int, ...] | None | Literal[False]:
    """The dim order in which ``t``'s memory is contiguous: None if ``t`` is contiguous, False if none is."""
    if t.is_contiguous():
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True))
    return order if t.permute(order).is_contiguous() else False


def _memory_view(t: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """``t``'s elements in memory order, as a 1-D view that writes through to ``t``."""
    return (t if order is None else t.permute(order)).view(-1)
