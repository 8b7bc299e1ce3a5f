"""The sorted initial rows LaPerm keeps for each permuted tensor: dense or run-length encoded.

A dense init has (almost) all-distinct values, so the sorted copy is stored
as is: one value per weight.  Sparse and single-shared-value inits repeat
values (zeros, or the shared value ``v``): sorted, each row is a few long
runs, and storing ``(value, count)`` per run plus a row pointer costs a
small fraction of a copy.  A shared-value row ``{0, v}`` is two runs whatever
its length.  :meth:`SortedRows.dense` rebuilds the full sorted matrix (a
temporary used by one sync) with a single ``repeat_interleave``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .reconnect import float_bits

__all__ = ["SortedRows", "SORTED", "COUNTS"]

# Keys of the per-parameter optimizer state: the sorted values (dense rows, or one value per run) and
# the run lengths (run-length storage only).
SORTED = "laperm_sorted"
COUNTS = "laperm_sorted_counts"

# Use run-length encoding only when it is at most this fraction of the dense bytes.
RLE_MAX_FRACTION = 0.5


@dataclass
class SortedRows:
    """Sorted rows of one tensor's initial values, ``shape == (rows, row_length)``."""

    shape: tuple[int, int]
    dense_values: Tensor | None = None  # (rows, n), when stored densely
    run_values: Tensor | None = None  # (runs,) value of each run, rows concatenated
    run_counts: Tensor | None = None  # (runs,) int32 length of each run
    run_rows: Tensor | None = None  # (runs,) int32 row of each run (only in laperm 0.1.0 files)

    @classmethod
    def from_sorted(cls, sorted_rows: Tensor, encoding: str = "auto") -> SortedRows:
        """Store ``sorted_rows`` (each row ascending) in the cheaper of the two forms.

        ``encoding`` is ``"auto"``, ``"dense"`` or ``"rle"``.  Runs group *bit-identical*
        neighbours, so -0.0 and 0.0 stay distinct and the rebuilt rows are bit-exact.
        """
        if encoding not in ("auto", "dense", "rle"):
            raise ValueError(f"encoding must be auto, dense or rle, got {encoding!r}")
        shape = (int(sorted_rows.shape[0]), int(sorted_rows.shape[1]))
        if encoding == "dense" or sorted_rows.numel() == 0:
            return cls(shape, dense_values=sorted_rows.contiguous())
        bits = float_bits(sorted_rows)
        # A run starts at column 0 and wherever the bit pattern changes.
        starts = torch.ones_like(bits, dtype=torch.bool)
        starts[:, 1:] = bits[:, 1:] != bits[:, :-1]
        n_runs = int(starts.sum())
        rle_bytes = n_runs * (sorted_rows.element_size() + 4 + 4)
        dense_bytes = sorted_rows.numel() * sorted_rows.element_size()
        if encoding == "auto" and rle_bytes > RLE_MAX_FRACTION * dense_bytes:
            return cls(shape, dense_values=sorted_rows.contiguous())
        flat_starts = starts.reshape(-1).nonzero().squeeze(1)
        ends = torch.cat([flat_starts[1:], flat_starts.new_tensor([sorted_rows.numel()])])
        # Runs never cross rows: every row starts a run at column 0.
        return cls(
            shape,
            run_values=sorted_rows.reshape(-1)[flat_starts].clone(),
            run_counts=(ends - flat_starts).to(torch.int32),
        )

    @property
    def encoding(self) -> str:
        return "dense" if self.dense_values is not None else "rle"

    @property
    def dtype(self) -> torch.dtype:
        return (self.dense_values if self.dense_values is not None else self.run_values).dtype

    @property
    def device(self) -> torch.device:
        return (self.dense_values if self.dense_values is not None else self.run_values).device

    def dense(self) -> Tensor:
        """The full ``(rows, n)`` sorted matrix (a temporary for RLE storage, built at each sync).

        On CPU numpy's ``repeat`` is several times quicker than
        ``torch.repeat_interleave``; on CUDA ``output_size`` spares
        repeat_interleave a host sync to size its output.
        """
        if self.dense_values is not None:
            return self.dense_values
        values, counts = self.run_values, self.run_counts
        if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64, torch.float16):
            flat = torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
        else:  # CUDA, or a dtype numpy lacks (bfloat16)
            flat = torch.repeat_interleave(values, counts.long(), output_size=self.shape[0] * self.shape[1])
        return flat.reshape(self.shape)

    def nbytes(self) -> int:
        """Bytes this object keeps alive."""
        tensors = [self.dense_values, self.run_values, self.run_counts, self.run_rows]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SortedRows:
        def move(t: Tensor | None, cast: bool) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast else None)

        return SortedRows(
            self.shape,
            move(self.dense_values, True),
            move(self.run_values, True),
            move(self.run_counts, False),
            move(self.run_rows, False),
        )

    def entry(self) -> dict[str, Tensor]:
        """The tensors an optimizer's per-parameter state keeps (``laperm_sorted``, and the run lengths)."""
        if self.dense_values is not None:
            return {SORTED: self.dense_values}
        assert self.run_values is not None and self.run_counts is not None
        return {SORTED: self.run_values, COUNTS: self.run_counts}

    @classmethod
    def from_entry(cls, entry: dict[str, Any], shape: tuple[int, int]) -> SortedRows:
        """Rebuild from :meth:`entry`'s tensors (local shards, for sharded parameters) and the rows' shape."""
        values, counts = entry[SORTED], entry.get(COUNTS)
        if not isinstance(values, Tensor) or not (counts is None or isinstance(counts, Tensor)):
            raise ValueError(f"{SORTED} and {COUNTS} must be tensors")
        if counts is None:
            if tuple(values.shape) != tuple(shape):
                raise ValueError(f"sorted rows have shape {tuple(values.shape)}, expected {tuple(shape)}")
            return cls(shape, dense_values=values)
        if values.shape != counts.shape or int(counts.sum()) != shape[0] * shape[1]:
            raise ValueError(f"run lengths add up to {int(counts.sum())}, expected {shape[0] * shape[1]}")
        return cls(shape, run_values=values, run_counts=counts)

    def state(self) -> dict[str, Any]:
        """Plain tensors and ints (laperm 0.1.0's ``state_dict`` layout)."""
        if self.dense_values is not None:
            return {"shape": self.shape, "dense": self.dense_values}
        return {"shape": self.shape, "values": self.run_values, "counts": self.run_counts, "rows": self.run_rows}

    @classmethod
    def from_state(cls, state: dict[str, Any] | Tensor) -> SortedRows:
        if isinstance(state, Tensor):  # a bare sorted matrix
            return cls((int(state.shape[0]), int(state.shape[1])), dense_values=state)
        shape = tuple(int(s) for s in state["shape"])
        if "dense" in state:
            return cls(shape, dense_values=state["dense"])
        counts = state["counts"]
        if int(counts.sum()) != shape[0] * shape[1]:
            raise ValueError(f"run-length counts add up to {int(counts.sum())}, expected {shape[0] * shape[1]}")
        return cls(shape, run_values=state["values"], run_counts=counts)  # (0.1.0's "rows" are not kept)
