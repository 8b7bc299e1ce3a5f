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

from dataclasses import dataclass

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
    """Stable ascending argsort of every row (ties in index order).

    On CPU numpy's stable sort (radix sort for small integer types, timsort
    otherwise) on a zero-copy view is used where the dtype allows; torch's
    sort elsewhere (CUDA, bfloat16).
    """
    if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64):
        idx = np.argsort(rows.detach().numpy(), axis=1, kind="stable")
        return torch.from_numpy(idx)
    return torch.argsort(rows, dim=1, stable=True)


def sync_rows_(rows: Tensor, sorted_vals: Tensor) -> Tensor:
    """In place: give rank ``r`` of ``sorted_vals`` to the element of rank ``r`` in ``rows``."""
    if rows.shape != sorted_vals.shape:
        raise ValueError(
            f"row matrix shape {tuple(rows.shape)} does not match the stored sorted "
            f"values {tuple(sorted_vals.shape)}"
        )
    idx = argsort_rows(rows)
    rows.scatter_(1, idx.to(rows.device), sorted_vals.to(rows.dtype))
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
