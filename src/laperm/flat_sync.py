"""One sync of many tensors in a fixed handful of kernels, whatever their number.

:func:`sync_flat_` synchronises every row of every tensor at once (docs/algorithm.md §2's rule,
bit-identical to :func:`laperm.reconnect.sync_tensor_` on each tensor):

1. the tensors' memory (each seen as a flat view in its own memory order: contiguous,
   channels_last, or any other dense layout) is concatenated into one buffer (one ``cat``),
   tensors of equal row length next to each other;
2. one precomputed gather puts every element in *row order* (rows one after another, each row in
   the column order of :func:`laperm.reconnect.to_rows`), skipped when that already is the
   memory order;
3. every row's stable argsort, by one of two strategies (:data:`STRATEGY`):

   * ``"global"``: two stable sorts of everything, by value (ties keep row order), then by row
     id (which keeps, within a row, the order by ``(value, column)``): two sorts in all;
   * ``"by_length"``: one stable 2-D ``torch.sort`` per distinct row length, each over a
     contiguous block of the buffer (on CUDA the segmented sort ``torch.sort`` uses for rows):
     as many sorts as row lengths, not tensors, and no more work than sorting the rows;

4. the concatenated sorted initial rows are scattered to those positions (mapped back to memory
   positions) with one ``index_put_``, and one ``_foreach_copy_`` writes every tensor in place.

The index tensors (the gather, row ids or row offsets) depend only on the tensors' shapes,
strides and layouts; they are built once and cached (:data:`PLAN_CACHE_SIZE` sets of shapes):
the gather as int64 (8 bytes per weight, only where memory order is not row order, e.g.
channels_last), the row ids as int32 (4 bytes per weight, ``"global"`` only).  A sync is then a
fixed number of kernels plus per-tensor *views* (no kernels), where
:func:`laperm.reconnect.sync_many_` launches sorts, scatters and copies per row length and per
non-contiguous tensor.  On CPU the threaded per-tensor kernel stays faster
(``benchmarks/sync.py``), so :class:`laperm.optim.LaPerm` uses this one for CUDA tensors.
Assumes finite values (the optional ``check`` runs first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .reconnect import RowLayout, sync_many_, to_rows

__all__ = ["sync_flat_", "PLAN_CACHE_SIZE", "STRATEGY", "GLOBAL_MAX_ELEMENTS", "STRATEGIES"]

PLAN_CACHE_SIZE = 16
"""Sets of (shapes, strides, layouts) whose index tensors are kept (least recently used dropped)."""

STRATEGIES = ("auto", "global", "by_length")
STRATEGY = "auto"
"""How rows are sorted (see the module docstring); ``"auto"``: ``"global"`` up to
:data:`GLOBAL_MAX_ELEMENTS` elements (where launches, not bytes, cost most: two sorts whatever the
row lengths), ``"by_length"`` above (where a global sort of everything would cost more than
sorting each row)."""

GLOBAL_MAX_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class _Plan:
    """The static part of a flat sync of tensors with given shapes, strides and layouts."""

    perm: tuple[int, ...]  # the tensors in buffer order (equal row lengths adjacent)
    orders: tuple[tuple[int, ...] | None, ...]  # dim order making each tensor contiguous (None: already)
    sizes: tuple[int, ...]  # elements of each tensor
    rows: tuple[tuple[int, int], ...]  # each tensor's row-matrix shape
    gather: Tensor | None  # memory position of every row-order position (None: the identity)
    segments: Tensor | None  # "global": row id of every row-order position
    blocks: tuple[tuple[int, int, int, Tensor], ...]  # "by_length": (start, rows, length, row starts (rows, 1))


_plans: OrderedDict[tuple, _Plan] = OrderedDict()
_plans_lock = threading.Lock()


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
    views = [_memory_view(tensors[i].detach(), order) for i, order in zip(plan.perm, plan.orders, strict=True)]
    memory = torch.cat(views)
    return _Gathered(plan, views, memory, memory if plan.gather is None else memory[plan.gather])


def _write(g: _Gathered, sorted_vals: list[Tensor]) -> None:
    """Give every row's sorted initial values to its ranks, and write the tensors in place."""
    plan = g.plan
    # -0.0 and 0.0 must tie (the rule's, and the CPU kernel's, order); a radix sort (CUDA, long
    # rows) may order them by bits, so make every zero +0.0 first: x + 0.0 is x bit for bit
    # otherwise.  (values is scratch: the memory it may be is overwritten below, every element.)
    g.values.add_(0.0)
    if plan.segments is not None:
        order = torch.sort(g.values, stable=True).indices  # by value; ties in row order
        order = order[torch.sort(plan.segments[order], stable=True).indices]  # then by row: (row, value, column)
    else:
        parts = [
            torch.sort(g.values[a : a + r * n].view(r, n), dim=1, stable=True).indices.add_(starts).view(-1)
            for a, r, n, starts in plan.blocks
        ]
        order = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else g.values.new_zeros(0, dtype=torch.int64)
    target = order if plan.gather is None else plan.gather[order]
    new = torch.cat([sorted_vals[i].reshape(-1) for i in plan.perm])
    g.memory.index_put_((target,), new.to(device=g.memory.device, dtype=g.memory.dtype))  # (a fresh buffer)
    torch._foreach_copy_(g.views, list(g.memory.split(plan.sizes)))


def _plan(tensors: list[Tensor], layouts: list[RowLayout]) -> _Plan:
    """The cached plan for these shapes, strides and layouts (built on first use)."""
    if STRATEGY not in STRATEGIES:
        raise ValueError(f"flat_sync.STRATEGY must be one of {STRATEGIES}, got {STRATEGY!r}")
    device = tensors[0].device
    shapes = ((tuple(t.shape), t.stride(), lay) for t, lay in zip(tensors, layouts, strict=True))
    key = (device, STRATEGY, GLOBAL_MAX_ELEMENTS, *shapes)
    with _plans_lock:  # (syncs may run in several threads)
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    plan = _build_plan(tensors, layouts, device)
    with _plans_lock:
        _plans[key] = plan
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _build_plan(tensors: list[Tensor], layouts: list[RowLayout], device: torch.device) -> _Plan:
    rows = [tuple(to_rows(torch.empty(t.shape, device="meta"), lay).shape) for t, lay in zip(tensors, layouts)]
    perm = sorted(range(len(tensors)), key=lambda i: rows[i][1])  # (stable: equal lengths keep their order)
    orders, gather = [], []
    offset = 0
    for i in perm:
        t, order = tensors[i], _dense_order(tensors[i])
        if order is False:  # (sync_flat_ routes these elsewhere)
            raise AssertionError("a tensor without dense memory reached the flat plan")
        # Memory position of every element, laid out like t: to_rows of it is the gather.
        where = torch.empty_strided(t.shape, t.stride(), dtype=torch.int64)
        _memory_view(where, order).copy_(torch.arange(offset, offset + t.numel()))
        orders.append(order)
        gather.append(to_rows(where, layouts[i]).reshape(-1))
        offset += t.numel()
    flat = torch.cat(gather) if gather else torch.zeros(0, dtype=torch.int64)
    index_type = torch.int32 if offset < 2**31 else torch.int64
    strategy = STRATEGY if STRATEGY != "auto" else "global" if offset <= GLOBAL_MAX_ELEMENTS else "by_length"
    ordered_rows = [(int(rows[i][0]), int(rows[i][1])) for i in perm]
    return _Plan(
        tuple(perm),
        tuple(orders),
        tuple(tensors[i].numel() for i in perm),
        tuple((int(r), int(n)) for r, n in rows),
        None if torch.equal(flat, torch.arange(offset)) else flat.to(device),  # (int64: index ops would cast int32)
        _segments(ordered_rows).to(device=device, dtype=index_type) if strategy == "global" else None,
        _blocks(ordered_rows, device) if strategy == "by_length" else (),
    )


def _segments(rows: list[tuple[int, int]]) -> Tensor:
    """The row id of every element, for row matrices ``rows`` one after another."""
    per_row = [torch.full((r,), n, dtype=torch.int64) for r, n in rows]
    lengths = torch.cat(per_row) if per_row else torch.zeros(0, dtype=torch.int64)
    return torch.arange(len(lengths)).repeat_interleave(lengths)


def _blocks(rows: list[tuple[int, int]], device: torch.device) -> tuple[tuple[int, int, int, Tensor], ...]:
    """``(start, rows, length, row starts)`` of each run of equal row lengths (empty ones left out)."""
    out = []
    start = 0
    for n in sorted({n for _, n in rows}):
        r = sum(rr for rr, nn in rows if nn == n)
        if r and n:
            out.append((start, r, n, (start + n * torch.arange(r, device=device)).view(r, 1)))
        start += r * n
    return tuple(out)


def _dense_order(t: Tensor) -> tuple[int, ...] | None | Literal[False]:
    """The dim order in which ``t``'s memory is contiguous: None if ``t`` is contiguous, False if none is."""
    if t.is_contiguous():
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True))
    return order if t.permute(order).is_contiguous() else False


def _memory_view(t: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """``t``'s elements in memory order, as a 1-D view that writes through to ``t``."""
    return (t if order is None else t.permute(order)).view(-1)
