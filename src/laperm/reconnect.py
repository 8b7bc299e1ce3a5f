"""Row views of weight tensors and the LaPerm synchronisation kernel.

LaPerm permutes the incoming weights of every output unit ("a row") among
themselves.  Everything here works on a 2-D *row matrix* of shape
``(units, fan_in)`` obtained from a parameter through a :class:`RowLayout`:

* ``Linear.weight`` (out, in) and ``ConvNd.weight`` (out, in/groups, *k): row ``o``
  is ``weight[o].flatten()`` -- a free view for contiguous tensors.
* ``ConvTransposeNd.weight`` (in, out/groups, *k) keeps output units on dim 1;
  the rows are gathered per group (a copy), see :func:`to_rows`.
* ``granularity="tensor"`` treats the whole tensor as a single row (ablations),
  and a 1-D tensor (a bias) is always one row.

The synchronisation rule (SPEC §2): given the inner weights ``w`` and the sorted
initial values ``s`` of a row, the value of rank ``r`` in ``s`` goes to the element
whose weight has rank ``r`` in ``w``; ties are broken by index order.  With
``idx = argsort(w, stable=True)`` this is a single scatter: ``w[idx] = s``.
The reference formulation, ``s[argsort(argsort(w))]``, gives the same result
with one more sort and a gather; it is kept here as :func:`reference_sync`
for tests and benchmarks.

Nothing in this module knows about models, data or files.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RowLayout",
    "to_rows",
    "from_rows_",
    "sorted_rows",
    "argsort_rows",
    "sync_rows_",
    "sync_tensor_",
    "rebuild_by_rank",
    "is_row_permutation",
    "rows_match",
    "reference_sync",
    "moved_fraction",
    "set_num_threads",
    "get_num_threads",
]

GRANULARITIES = ("row", "tensor")


@dataclass(frozen=True)
class RowLayout:
    """How a parameter tensor is cut into permutation units (rows).

    Attributes:
        granularity: ``"row"`` (one row per output unit) or ``"tensor"``
            (the whole tensor is one row).
        transposed: output units live on dim 1, as in ``ConvTranspose*``
            weights of shape ``(in, out/groups, *kernel)``.
        groups: the ``groups`` of a transposed convolution; output unit
            ``(g, j)`` receives ``weight[g*in/groups:(g+1)*in/groups, j]``.
    """

    granularity: str = "row"
    transposed: bool = False
    groups: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups!r}")

    def is_view(self, t: Tensor) -> bool:
        """True when :func:`to_rows` returns a view that writes through to ``t``."""
        return t.is_contiguous() and not (
            self.granularity == "row" and self.transposed and t.dim() >= 2
        )


def to_rows(t: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """Return ``t`` as a 2-D ``(units, fan_in)`` matrix (a view where possible)."""
    if t.dim() == 0:
        raise ValueError("cannot permute a 0-dimensional tensor")
    if layout.granularity == "tensor" or t.dim() == 1:
        return t.reshape(1, -1)
    if not layout.transposed:
        return t.reshape(t.shape[0], -1)
    if t.dim() < 2:
        raise ValueError("a transposed layout needs a tensor with at least 2 dims")
    g = layout.groups
    cin, out_g = t.shape[0], t.shape[1]
    if cin % g:
        raise ValueError(f"dim 0 ({cin}) is not divisible by groups={g}")
    # (in, out/g, *k) -> (g, in/g, out/g, rest) -> (g, out/g, in/g, rest) -> rows
    rest = t[0, 0].numel()
    v = t.reshape(g, cin // g, out_g, rest).transpose(1, 2)
    return v.reshape(g * out_g, (cin // g) * rest)


def from_rows_(t: Tensor, rows: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """Write a row matrix produced by :func:`to_rows` back into ``t`` (in place)."""
    if layout.is_view(t) and rows.data_ptr() == t.data_ptr():
        return t  # rows already are t's storage
    if layout.granularity == "tensor" or t.dim() == 1 or not layout.transposed:
        t.copy_(rows.reshape(t.shape))
        return t
    g = layout.groups
    cin, out_g = t.shape[0], t.shape[1]
    rest = t[0, 0].numel()
    back = rows.reshape(g, out_g, cin // g, rest).transpose(1, 2)
    t.copy_(back.reshape(t.shape))
    return t


def sorted_rows(t: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """Each row of ``t`` sorted ascending: the ``θ_sorted`` that LaPerm keeps."""
    return torch.sort(to_rows(t, layout).detach(), dim=1, stable=True).values.contiguous()


def argsort_rows(rows: Tensor) -> Tensor:
    """Stable ascending argsort of every row (ties in index order), as int64.

    CPU float32 rows take the fast path (:func:`_sorted_keys`: one unstable
    SIMD integer sort of ``(value, index)`` keys, which yields exactly the stable
    order, -0.0 and 0.0 being equal); CPU float64 rows numpy's stable sort; all
    else (CUDA, bfloat16, float16) torch's stable sort.  The input is assumed
    finite: a NaN gets some deterministic rank, not necessarily torch's.
    """
    if _use_keys(rows):
        out = np.empty(tuple(rows.shape), np.int64)
        x = rows.detach().numpy()

        def block(a: int, b: int) -> None:
            np.bitwise_and(_sorted_keys(x[a:b], out[a:b]), 0xFFFFFFFF, out=out[a:b])

        _for_row_blocks(x.shape, block)
        return torch.from_numpy(out)
    if rows.device.type == "cpu" and rows.dtype == torch.float64:
        return torch.from_numpy(np.argsort(rows.detach().numpy(), axis=1, kind="stable"))
    return torch.argsort(rows, dim=1, stable=True)


def sync_rows_(rows: Tensor, sorted_vals: Tensor) -> Tensor:
    """In place: give rank ``r`` of ``sorted_vals`` to the element of rank ``r`` in ``rows``.

    Ranks are stable (ties in index order).  On CPU (float32 and float64) the
    rows are cut into blocks of about :data:`BLOCK_ELEMS` elements, each
    argsorted and scattered while it is in cache, by up to
    :func:`get_num_threads` threads.  Assumes finite ``rows`` (see
    :func:`argsort_rows`); :class:`laperm.optim.LaPerm` checks this first.
    """
    if rows.shape != sorted_vals.shape:
        raise ValueError(
            f"row matrix shape {tuple(rows.shape)} does not match the stored sorted "
            f"values {tuple(sorted_vals.shape)}"
        )
    fast = _use_keys(rows) or (rows.device.type == "cpu" and rows.dtype == torch.float64)
    if not fast or rows.dim() != 2 or (rows.requires_grad and torch.is_grad_enabled()):
        # Torch path; also raises autograd's usual error for an in-place write to a leaf.
        idx = argsort_rows(rows)
        rows.scatter_(1, idx.to(rows.device), sorted_vals.to(rows.dtype))
        return rows
    target = rows.detach()
    x = target.numpy()
    vals = sorted_vals.detach().to(rows.dtype)
    keys = x.dtype == np.float32 and _use_keys(rows)

    def block(a: int, b: int) -> None:
        if keys:
            idx = _sorted_keys(x[a:b], _scratch(b - a, x.shape[1]))
            np.bitwise_and(idx, 0xFFFFFFFF, out=idx)  # the column of each rank
        else:
            idx = np.argsort(x[a:b], axis=1, kind="stable")
        target[a:b].scatter_(1, torch.from_numpy(idx), vals[a:b])

    _for_row_blocks(x.shape, block)
    return rows


# -- CPU kernel internals -------------------------------------------------------
#
# Why keys: numpy's argsort of floats is a scalar introsort and its stable
# argsort a timsort, while np.sort of int64 is SIMD-accelerated (x86-simd-sort /
# highway).  A key ``(orderable(value) << 32) | column`` is unique within a row,
# so an unstable sort of the keys gives exactly the stable argsort in its low
# 32 bits, in about a third of the time of np.argsort.

BLOCK_ELEMS = 1 << 16
"""Elements per block: 512 KiB of int64 keys, about one core's L2 cache."""

_MIN_PARALLEL = 1 << 15  # below this many elements threads cost more than they give

_num_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()  # per thread: scratch buffers, "inside a pool worker" flag


def set_num_threads(n: int | None) -> None:
    """Threads used by the CPU sync kernel; ``None`` (default) follows ``torch.get_num_threads()``."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"number of threads must be a positive integer or None, got {n!r}")
    global _num_threads
    _num_threads = n


def get_num_threads() -> int:
    """Threads the CPU sync kernel uses (see :func:`set_num_threads`)."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def _use_keys(rows: Tensor) -> bool:
    # Column indices must fit the low 32 bits (as a non-negative int32).
    return (
        rows.device.type == "cpu"
        and rows.dtype == torch.float32
        and rows.dim() == 2
        and rows.shape[1] < 2**31
    )


def _sorted_keys(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Sort the int64 keys ``(orderable(x) << 32) | column`` of the float32 rows ``x`` into ``out``.

    ``orderable`` maps the float's sign-magnitude bits to a two's-complement
    int32 (``-magnitude`` for negatives) that orders like the values; both
    -0.0 and 0.0 map to 0, so they tie and keep index order as the stable rule
    wants.  Integer ops only: unaffected by flush-to-zero/denormals-are-zero
    modes, so subnormals keep their order.  Returns ``out`` (shape of ``x``).
    """
    r, n = x.shape
    bits = x.view(np.int32)
    hi = out.view(np.int32).reshape(r, n, 2)  # little-endian: [..., 1] is the high half
    if sys.byteorder == "big":
        hi = hi[..., ::-1]
    sign = _scratch32(r * n, 0).reshape(r, n)
    mag = _scratch32(r * n, 1).reshape(r, n)
    np.right_shift(bits, 31, out=sign)  # -1 for negatives, 0 otherwise
    np.bitwise_and(bits, 0x7FFFFFFF, out=mag)
    np.bitwise_xor(mag, sign, out=mag)
    np.subtract(mag, sign, out=hi[..., 1])  # (mag ^ -1) - (-1) == -mag
    hi[..., 0] = _columns(n)
    out.sort(axis=1)
    return out


def _columns(n: int) -> np.ndarray:
    cols = getattr(_local, "cols", None)
    if cols is None or len(cols) < n:
        cols = _local.cols = np.arange(max(n, 4096), dtype=np.int32)
    return cols[:n]


def _scratch(r: int, n: int) -> np.ndarray:
    """This thread's reusable int64 ``(r, n)`` key buffer (no allocation per block)."""
    buf = getattr(_local, "keys", None)
    if buf is None or buf.size < r * n:
        buf = _local.keys = np.empty(max(r * n, BLOCK_ELEMS), np.int64)
    return buf[: r * n].reshape(r, n)


def _scratch32(size: int, which: int) -> np.ndarray:
    name = f"tmp{which}"
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, BLOCK_ELEMS), np.int32)
        setattr(_local, name, buf)
    return buf[:size]


def _for_row_blocks(shape: tuple[int, int], fn: Callable[[int, int], None]) -> None:
    """Call ``fn(a, b)`` for row blocks ``[a, b)`` covering ``shape[0]`` rows, in parallel.

    Blocks go to the threads dynamically (a shared counter), so a thread slowed
    by other load does less of the work.  The calling thread works too; the
    pool only holds the extra ``get_num_threads() - 1`` threads.
    """
    r, n = shape
    step = max(1, BLOCK_ELEMS // max(n, 1))
    starts = range(0, r, step)
    threads = min(get_num_threads(), len(starts))
    if threads <= 1 or r * n < _MIN_PARALLEL or getattr(_local, "in_pool", False):
        for a in starts:
            fn(a, min(a + step, r))
        return
    next_block = itertools.count().__next__  # atomic under the GIL
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next_block()
            if i >= len(starts):
                return
            fn(starts[i], min(starts[i] + step, r))

    futures = [_get_pool(threads - 1).submit(_in_pool, work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for f in futures:
            f.result()  # wait for all (they write into our buffers) and re-raise


def _in_pool(fn: Callable[[], None]) -> None:
    _local.in_pool = True  # a nested sync from a worker runs serially (no deadlock)
    fn()


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="laperm-sync")
        return _pool


def _forget_pool() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the pool object but not its threads.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def sync_tensor_(t: Tensor, sorted_vals: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """Synchronise the parameter tensor ``t`` in place against its sorted initial rows."""
    with torch.no_grad():
        rows = to_rows(t, layout)
        if not layout.is_view(t):
            rows = rows.clone()
        sync_rows_(rows, sorted_vals)
        from_rows_(t, rows, layout)
    return t


def rebuild_by_rank(
    target: Tensor, values: Tensor, layout: RowLayout = RowLayout()
) -> Tensor:
    """A new tensor shaped like ``target`` holding ``values``' entries at ``target``'s ranks.

    Row by row, the ``r``-th smallest value of ``values`` is placed where
    ``target`` has its ``r``-th smallest entry.  ``rebuild_by_rank(trained, init)``
    is exactly one LaPerm sync of a trained net against its initial weights.
    """
    if target.shape != values.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} != values shape {tuple(values.shape)}"
        )
    out = target.detach().clone()
    return sync_tensor_(out, sorted_rows(values, layout), layout)


def is_row_permutation(a: Tensor, b: Tensor, layout: RowLayout = RowLayout()) -> bool:
    """True when every row of ``a`` holds exactly (bit for bit) the values of that row of ``b``."""
    if a.shape != b.shape:
        return False
    return rows_match(to_rows(a, layout), to_rows(b.to(a.device, a.dtype), layout))


def rows_match(a_rows: Tensor, b_rows: Tensor) -> bool:
    """Row by row, do two row matrices hold the same multiset of values, bit for bit?

    Bit patterns are compared (sorted as integers), so -0.0 and 0.0 or two
    different NaNs are told apart, which comparing sorted floats would miss.
    """
    if a_rows.shape != b_rows.shape or a_rows.dtype != b_rows.dtype:
        return False
    sa = torch.sort(_bits(a_rows), dim=1).values
    sb = torch.sort(_bits(b_rows.to(a_rows.device)), dim=1).values
    return bool(torch.equal(sa, sb))


def _bits(t: Tensor) -> Tensor:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(width[t.element_size()])


def reference_sync(w: Tensor, sorted_vals: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """The reference implementation's rule, ``sorted[argsort(argsort(w))]``, out of place.

    Kept as an independent check for tests and as the baseline in benchmarks.
    """
    rows = to_rows(w.detach(), layout)
    rank = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1, stable=True)
    new_rows = torch.gather(sorted_vals.to(rows.dtype), 1, rank)
    out = w.detach().clone()
    return from_rows_(out, new_rows, layout)


def moved_fraction(before: Tensor, after: Tensor) -> float:
    """Fraction of entries whose value changed (how much a sync reconnected)."""
    if before.shape != after.shape:
        raise ValueError("tensors must have the same shape")
    if before.numel() == 0:
        return 0.0
    return float((before != after).float().mean())
