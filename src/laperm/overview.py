"""``describe(model)``: what LaPerm will do with each parameter, as a table (in the spirit of ``torchinfo.summary``).

One line per trainable parameter -- name, shape, module type, permuted or free (and why), the unit
dim, rows x row length and the fewest distinct values in a row -- and a total line.  ``laperm train``
writes it into the run folder; users call it before training a model of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layouts import ParamPlan, plan_parameters
from .reconnect import RowLayout, to_rows

__all__ = ["Description", "ParamLine", "describe"]

HEADERS = ("Parameter", "Shape", "Module", "LaPerm", "Unit dim", "Rows x length", "Min distinct/row")


@dataclass(frozen=True)
class ParamLine:
    """One parameter's line of the table."""

    name: str
    shape: tuple[int, ...]
    module_type: str
    permuted: bool
    reason: str
    unit_dim: str  # "0", "1", ..., "all" (one row) or "-" (a scalar)
    rows: int
    row_length: int
    min_distinct: int  # fewest distinct values in a row (0 for a scalar)

    @property
    def numel(self) -> int:
        return self.rows * self.row_length

    def cells(self) -> tuple[str, ...]:
        what = ("permuted: " if self.permuted else "free: ") + self.reason
        size = f"{self.rows:,} x {self.row_length:,}" if self.rows else "-"
        return (
            self.name,
            "x".join(map(str, self.shape)) or "()",
            self.module_type,
            what,
            self.unit_dim,
            size,
            str(self.min_distinct) if self.rows else "-",
        )


@dataclass(frozen=True)
class Description:
    """The table :func:`describe` prints: ``lines`` (one :class:`ParamLine` per parameter) and ``total``."""

    lines: list[ParamLine]

    @property
    def free(self) -> list[ParamLine]:
        return [line for line in self.lines if not line.permuted]

    @property
    def total(self) -> str:
        permuted = [line for line in self.lines if line.permuted]
        weights = sum(line.numel for line in self.lines)
        untrainable = sum("untrainable" in line.reason for line in self.free)
        return (
            f"Total: {len(permuted)} of {len(self.lines)} parameters permuted "
            f"({sum(line.numel for line in permuted):,} of {weights:,} weights, "
            f"{sum(line.rows for line in permuted):,} rows); {len(self.free)} free"
            + (f", {untrainable} of them untrainable by permutation" if untrainable else "")
        )

    def records(self) -> list[dict[str, Any]]:
        """``[{"name", "reason"}]`` of the free parameters (init.pt's ``free``)."""
        return [{"name": line.name, "reason": line.reason} for line in self.free]

    def __str__(self) -> str:
        table = [HEADERS, *(line.cells() for line in self.lines)]
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
        text = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
        rule = "-" * len(max(text, key=len))
        return "\n".join([rule, text[0], rule, *text[1:], rule, self.total])


def _unit_dim(layout: RowLayout, rows: int, ndim: int) -> str:
    if layout.granularity == "tensor" or rows == 1 or ndim == 1:
        return "all"
    return str(1 if layout.transposed else layout.unit_dim)


def _line(plan: ParamPlan, granularity: str) -> ParamLine:
    p, layout = plan.param, plan.layout(granularity)
    shape = tuple(p.shape)
    if layout is None:  # a scalar
        return ParamLine(plan.name, shape, plan.module_type, False, plan.reason, "-", 0, 0, 0)
    full = getattr(p, "full_tensor", None)
    rows = to_rows(full() if callable(full) else p.detach(), layout)
    distinct = 0
    if rows.numel():
        s = torch.sort(rows.detach(), dim=1).values
        distinct = int((s[:, 1:] != s[:, :-1]).sum(dim=1).min().item()) + 1
    n, length = rows.shape
    dim = _unit_dim(layout, n, p.dim())
    return ParamLine(plan.name, shape, plan.module_type, plan.permuted, plan.reason, dim, n, length, distinct)


@torch.no_grad()
def describe(
    model: nn.Module,
    permute_biases: bool = False,
    permute_norm: bool = False,
    granularity: str = "row",
    show: bool = True,
) -> Description:
    """What ``LaPerm`` over ``laperm_param_groups(model, permute_biases, permute_norm)`` does with each
    parameter of ``model`` (at its current values, which would be θ0); printed unless ``show=False``.

    The untrainable check warns nothing here: the table says it (``free: untrainable by permutation``).
    """
    desc = Description(
        [_line(plan, granularity) for plan in plan_parameters(model, permute_biases, permute_norm, granularity)]
    )
    if show:
        print(desc)
    return desc
