"""Row views of weight tensors and the LaPerm synchronisation kernel.

LaPerm permutes the incoming weights of every output unit ("a row") among
themselves.  Everything here works on a 2-D *row matrix* of shape
``(units, fan_in)`` obtained from a parameter through a :class:`RowLayout`:

* ``Linear.weight`` (out, in) and ``ConvNd.weight`` (out, in/groups, *k): row ``o``
  is ``weight[o].flatten()`` -- a free view for contiguous tensors.
* ``ConvTransposeNd.weight`` (in, out/groups, *k) keeps output units on dim 1;
  the rows are gathered per group (a copy), see :func:`to_rows`.
* ``unit_dim=d`` (rows along dim ``d``, every dim before it of size 1): a ``(1, L, D)``
  tensor has ``L`` rows of ``D`` values -- a free view too.
* ``granularity="tensor"`` treats the whole tensor as a single row (ablations),
  and a 1-D tensor (a bias) is always one row.

The synchronisation rule (docs/algorithm.md §2): given the inner weights ``w`` and the sorted
initial values ``s`` of a row, the value of rank ``r`` in ``s`` goes to the element
whose weight has rank ``r`` in ``w``; ties are broken by index order.  With
``idx = argsort(w, stable=True)`` this is a single scatter: ``w[idx] = s``.
The reference formulation, ``s[argsort(argsort(w))]``, gives the same result
with one more sort and a gather; it is kept here as :func:`reference_sync`
for tests and benchmarks.

Nothing in this module knows about models, data or files.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

__all__ = [
    "RowLayout",
    "to_rows",
    "from_rows_",
    "sorted_rows",
    "argsort_rows",
    "sync_rows_",
    "sync_tensor_",
    "sync_many_",
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
        unit_dim: for a row layout that is not transposed, the dim the rows run
            along; every dim before it must have size 1 (the leading singleton
            dims of e.g. a ``(1, L, D)`` position embedding, which has ``L`` rows).
    """

    granularity: str = "row"
    transposed: bool = False
    groups: int = 1
    unit_dim: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups!r}")
        if not isinstance(self.unit_dim, int) or self.unit_dim < 0 or (self.unit_dim and self.transposed):
            raise ValueError(f"unit_dim must be an integer >= 0 (0 when transposed), got {self.unit_dim!r}")

    def record(self) -> dict[str, object]:
        """JSON-able fields (``unit_dim`` only when set, so the records of earlier layouts are unchanged)."""
        out: dict[str, object] = {"granularity": self.granularity, "transposed": self.transposed, "groups": self.groups}
        if self.unit_dim:
            out["unit_dim"] = self.unit_dim
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RowLayout:
        """The layout of a :meth:`record` (ValueError for a malformed one)."""
        if not isinstance(record, Mapping):
            raise ValueError(f"malformed layout record {record!r}")
        granularity, transposed = record.get("granularity"), record.get("transposed")
        groups, unit_dim = record.get("groups"), record.get("unit_dim", 0)
        if not (isinstance(transposed, bool) and isinstance(groups, int) and isinstance(unit_dim, int)):
            raise ValueError(f"malformed layout record {dict(record)!r}")
        return cls(str(granularity), transposed, groups, unit_dim)

    def is_view(self, t: Tensor) -> bool:
        """True when :func:`to_rows` returns a view that writes through to ``t``."""
        return t.is_contiguous() and not (self.granularity == "row" and self.transposed and t.dim() >= 2)


def to_rows(t: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """Return ``t`` as a 2-D ``(units, fan_in)`` matrix (a view where possible)."""
    if t.dim() == 0:
        raise ValueError("cannot permute a 0-dimensional tensor")
    if layout.granularity == "tensor" or t.dim() == 1:
        return t.reshape(1, -1)
    if not layout.transposed:
        d = layout.unit_dim
        if d and (t.dim() <= d or any(n != 1 for n in t.shape[:d])):
            raise ValueError(f"unit_dim={d} needs size-1 dims before it, got a tensor of shape {tuple(t.shape)}")
        return t.reshape(t.shape[d], -1)
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
    SIMD sort of unique integer keys per row, which gives exactly the stable
    order of the values, -0.0 and 0.0 being equal); CPU float64 rows numpy's
    stable sort; anything else (CUDA, bfloat16, float16) torch's stable sort.
    The fast path assumes finite input: a NaN gets a deterministic rank, but
    not necessarily torch's (:class:`laperm.optim.LaPerm` checks first).
    """
    path = _cpu_path(rows)
    if path == "keys":
        x = rows.detach().numpy()
        out = np.empty(x.shape, np.int64)

        def block(a: int, b: int) -> None:
            k = _sorted_keys(x[a:b], out[a:b].reshape(-1), _arange(x.shape[1]))
            np.bitwise_and(k, 0xFFFFFFFF, out=k)  # the column of each rank

        _for_row_blocks(x.shape, block)
        return torch.from_numpy(out)
    if path == "stable":
        return torch.from_numpy(np.argsort(rows.detach().numpy(), axis=1, kind="stable"))
    return torch.argsort(rows, dim=1, stable=True)


def sync_rows_(rows: Tensor, sorted_vals: Tensor) -> Tensor:
    """In place: give rank ``r`` of ``sorted_vals`` to the element of rank ``r`` in ``rows``.

    Ranks are stable (ties in index order).  On CPU (float32, float64) the
    rows are cut into blocks of about :data:`BLOCK_ELEMS` elements, each
    argsorted and scattered while in cache, by :func:`get_num_threads`
    threads.  Assumes finite ``rows``, like :func:`argsort_rows`.
    """
    if rows.shape != sorted_vals.shape:
        raise ValueError(
            f"row matrix shape {tuple(rows.shape)} does not match the stored sorted values {tuple(sorted_vals.shape)}"
        )
    path = _cpu_path(rows)
    if path is None or (rows.requires_grad and torch.is_grad_enabled()):
        # torch (also raises autograd's usual error for an in-place write to a leaf)
        idx = argsort_rows(rows)
        rows.scatter_(1, idx.to(rows.device), sorted_vals.to(rows.dtype))
        return rows
    target = rows.detach()
    work = target if target.is_contiguous() else target.contiguous()
    x = work.numpy()
    vals = np.ascontiguousarray(sorted_vals.detach().to(rows.dtype).numpy())
    n = x.shape[1]

    def block(a: int, b: int) -> None:
        if path == "keys":
            # Low halves = flat positions in the (contiguous) block, so after
            # the sort one flat assignment does the scatter.
            e = (b - a) * n
            k = _sorted_keys(x[a:b], _buffer("keys", e, np.int64), _arange(e).reshape(b - a, n))
            np.bitwise_and(k, 0xFFFFFFFF, out=k)
        else:
            k = np.argsort(x[a:b], axis=1, kind="stable")
            k += n * np.arange(b - a)[:, None]  # columns -> flat positions in the block
        x[a:b].reshape(-1)[k.reshape(-1)] = vals[a:b].reshape(-1)

    # numpy, not torch.scatter_, scatters: torch would start its own OpenMP
    # threads for blocks over 32K elements, inside ours.
    _for_row_blocks(x.shape, block)
    if work is not target:
        target.copy_(work)
    else:  # numpy wrote behind autograd's back: let it see the in-place change
        increment_version(target)
    return rows


def sync_tensor_(t: Tensor, sorted_vals: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """Synchronise the parameter tensor ``t`` in place against its sorted initial rows."""
    with torch.no_grad():
        rows = to_rows(t, layout)
        if not layout.is_view(t):
            rows = rows.clone()
        sync_rows_(rows, sorted_vals)
        from_rows_(t, rows, layout)
    return t


def sync_many_(tensors: Sequence[Tensor], sorted_vals: Sequence[Tensor], layouts: Sequence[RowLayout]) -> None:
    """Synchronise many tensors in place with one batched sort per distinct row length.

    The rows of all tensors that share a row length (and dtype and device) are
    stacked into one matrix, argsorted by a single stable ``torch.sort`` (on
    CUDA a segmented sort over all of them at once), scattered, and copied
    back.  Row by row this is exactly :func:`sync_tensor_`'s rule, so the
    result is bit-identical to syncing each tensor on its own; what it saves
    on a GPU is one sort and scatter launch per tensor.  On CPU the per-tensor
    kernel (:func:`sync_rows_`, int64 keys, threaded) is faster; on CUDA
    :class:`laperm.optim.LaPerm` uses :func:`laperm.flat_sync.sync_flat_`, which
    needs a fixed number of launches whatever the number of tensors (it falls
    back to this function for tensors without dense memory).  Assumes finite
    values, like :func:`sync_rows_`.
    """
    if not len(tensors) == len(sorted_vals) == len(layouts):
        raise ValueError(
            f"sync_many_ needs one sorted matrix and one layout per tensor, got {len(tensors)} "
            f"tensors, {len(sorted_vals)} sorted matrices and {len(layouts)} layouts"
        )
    groups: dict[tuple[int, torch.dtype, torch.device], list[tuple[Tensor, Tensor, Tensor, RowLayout]]] = {}
    with torch.no_grad():
        for t, s, layout in zip(tensors, sorted_vals, layouts, strict=True):
            rows = to_rows(t, layout)
            if rows.shape != s.shape:
                raise ValueError(
                    f"row matrix shape {tuple(rows.shape)} does not match the stored sorted values {tuple(s.shape)}"
                )
            groups.setdefault((rows.shape[1], t.dtype, t.device), []).append((t, rows, s, layout))
        for members in groups.values():
            _sync_same_length(members)


def _sync_same_length(members: list[tuple[Tensor, Tensor, Tensor, RowLayout]]) -> None:
    """One stable sort and one scatter for the stacked rows of ``members`` (equal row length)."""
    rows = torch.cat([r for _, r, _, _ in members]) if len(members) > 1 else members[0][1].contiguous()
    vals = torch.cat([s.to(rows.dtype) for _, _, s, _ in members]) if len(members) > 1 else members[0][2]
    idx = torch.sort(rows, dim=1, stable=True).indices
    rows.scatter_(1, idx, vals.to(device=rows.device, dtype=rows.dtype))
    start = 0
    for t, r, _, layout in members:
        part = rows[start : start + r.shape[0]]
        start += r.shape[0]
        if not (layout.is_view(t) and part.data_ptr() == t.data_ptr()):  # else the scatter wrote into t itself
            from_rows_(t, part, layout)


def rebuild_by_rank(target: Tensor, values: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """A new tensor shaped like ``target`` holding ``values``' entries at ``target``'s ranks.

    Row by row, the ``r``-th smallest value of ``values`` is placed where
    ``target`` has its ``r``-th smallest entry.  ``rebuild_by_rank(trained, init)``
    is exactly one LaPerm sync of a trained net against its initial weights.
    """
    if target.shape != values.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != values shape {tuple(values.shape)}")
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
    sa = torch.sort(float_bits(a_rows), dim=1).values
    sb = torch.sort(float_bits(b_rows.to(a_rows.device)), dim=1).values
    return bool(torch.equal(sa, sb))


# The integer type of each float width: one table for every bit-pattern view in the package.
INT_OF_WIDTH: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def float_bits(t: Tensor) -> Tensor:
    """``t``'s bit patterns as integers of the same width (exact: -0.0 and 0.0, NaN payloads differ)."""
    return t.detach().contiguous().view(INT_OF_WIDTH[t.element_size()])


_bits = float_bits  # the former private name, kept for callers outside the package


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
_CACHE_MAX = 1 << 20  # largest scratch buffer kept per thread (elements)

_num_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_local = threading.local()  # per thread scratch buffers


def set_num_threads(n: int | None) -> None:
    """Set the threads of the CPU sync kernel; ``None`` (default): ``torch.get_num_threads()``."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"number of threads must be a positive integer or None, got {n!r}")
    global _num_threads
    _num_threads = n


def get_num_threads() -> int:
    """Threads the CPU sync kernel uses (see :func:`set_num_threads`)."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def _cpu_path(rows: Tensor) -> str | None:
    """``"keys"`` (float32), ``"stable"`` (float64) or None (use torch) for a row matrix."""
    if not rows.is_cpu or rows.dim() != 2:
        return None
    if rows.dtype == torch.float32 and rows.shape[1] < 2**31:  # columns fit in 31 bits
        return "keys"
    return "stable" if rows.dtype == torch.float64 else None


def _sorted_keys(x: np.ndarray, out: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Sorted int64 keys ``(orderable(x) << 32) | low`` of the float32 rows ``x``.

    ``low`` (int32, broadcast to ``x.shape``) must be distinct within each row
    and increase along it (the column, or the flat position); ``out`` is a flat
    int64 buffer of at least ``x.size`` elements.  ``orderable`` turns the
    float's sign-magnitude bits into a two's-complement int32 (``-magnitude``
    for negatives) that orders like the values; -0.0 and 0.0 both map to 0, so
    they tie and keep index order, as the stable rule on values wants.  Only
    integer ops: flush-to-zero/denormals-are-zero modes cannot merge subnormals.
    Returns the sorted keys as an ``x.shape`` view of ``out``.
    """
    r, n = x.shape
    keys = out[: r * n].reshape(r, n)
    halves = keys.view(np.int32).reshape(r, n, 2)
    lo_i, hi_i = (0, 1) if sys.byteorder == "little" else (1, 0)
    bits = x.view(np.int32)
    sign = _buffer("sign", r * n, np.int32).reshape(r, n)
    mag = _buffer("mag", r * n, np.int32).reshape(r, n)
    np.right_shift(bits, 31, out=sign)  # -1 for negatives, 0 otherwise
    np.bitwise_and(bits, 0x7FFFFFFF, out=mag)
    np.bitwise_xor(mag, sign, out=mag)
    np.subtract(mag, sign, out=halves[..., hi_i])  # (mag ^ -1) + 1 == -mag
    halves[..., lo_i] = low
    keys.sort(axis=1)  # unstable is fine: keys are distinct within a row
    return keys


def _buffer(name: str, size: int, dtype: type) -> np.ndarray:
    """This thread's reusable 1-D scratch array ``name`` (no allocation per block).

    Only block-sized buffers are kept: a huge single row (``granularity="tensor"``)
    gets a temporary one rather than pinning its size in memory for good.
    """
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, BLOCK_ELEMS), dtype)
        if size <= _CACHE_MAX:
            setattr(_local, name, buf)
    return buf[:size]


def _arange(size: int) -> np.ndarray:
    """``np.arange(size, dtype=int32)``, from a cache shared by all threads (read-only)."""
    global _AR
    if size > _CACHE_MAX:
        return np.arange(size, dtype=np.int32)
    if _AR.size < size:
        _AR = np.arange(_CACHE_MAX, dtype=np.int32)  # rebinding is atomic
    return _AR[:size]


_AR = np.arange(BLOCK_ELEMS, dtype=np.int32)


def _for_row_blocks(shape: tuple[int, int], fn: Callable[[int, int], None]) -> None:
    """Call ``fn(a, b)`` for row blocks ``[a, b)`` covering ``shape[0]`` rows, in parallel.

    Threads take blocks from a shared iterator, so one slowed by other load
    does less of the work.  The calling thread works too and waits only for
    blocks in progress, not for pool threads that have not started yet (on a
    busy machine they may start late, find nothing left and return); so a
    sync run from inside a pool thread cannot deadlock either.
    """
    r, n = shape
    step = max(1, BLOCK_ELEMS // max(n, 1))
    starts = range(0, r, step)
    threads = min(get_num_threads(), len(starts))
    if threads <= 1 or r * n < _MIN_PARALLEL:
        for a in starts:
            fn(a, min(a + step, r))
        return
    blocks = iter(starts)
    lock = threading.Lock()
    left = [len(starts)]  # blocks not finished yet
    finished = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                a = next(blocks, None)
            if a is None:
                return
            try:
                fn(a, min(a + step, r))
            except BaseException as e:  # re-raised by the calling thread
                errors.append(e)
            finally:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        finished.set()

    pool = _get_pool(threads - 1)
    for _ in range(threads - 1):
        pool.submit(work)
    work()
    finished.wait()
    if errors:
        raise errors[0]


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """The module's thread pool, (re)built when more workers are needed."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="laperm-sync")
            _pool_size = workers
        return _pool


def _forget_pool() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the pool object but not its threads.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
