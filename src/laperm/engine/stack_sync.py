"""One sync for every LaPerm member of a stack: the due tensors of all members in one ``sync_flat_``.

A LaPerm member's step, after the stacked inner step, is its step count and, every k steps, its
sync (``LaPerm.step`` with the inner step already done). :func:`sync_together` does that for all
members at once: it counts one step in each member's optimizer, exactly as its ``step`` would
(``laperm_step`` of every group, the synced flag), gathers the tensors of every group that is due
in every member, and synchronises them with one :func:`laperm.flat_sync.sync_flat_` call (a fixed
handful of kernels for the whole stack on CUDA, where a member's own sync is one call per member)
-- bit for bit what each member's own sync writes (sync_flat_'s contract). Each member's sync hooks
then run with its own synced parameters, as after its own sync.

A member whose due tensors hold NaN or inf is not synced (its count is taken): the caller reports
it as that member's numerical fault, so it stops alone, as it would through its own sync. The
finite check of all members is one reduction read once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import flat_sync
from ..optim import LaPerm

__all__ = ["sync_together"]


def sync_together(laperms: Sequence[LaPerm]) -> list[int]:
    """Count one step in each of ``laperms`` (inner steps done) and run all their due syncs as one.

    Returns the indices of the optimizers whose due tensors were not finite (left unsynced)."""
    plans: list[tuple[int, LaPerm, list[int], list[Any]]] = []
    for i, opt in enumerate(laperms):
        opt._synced = False  # (as LaPerm.step after its inner step)
        due = opt._count_steps()
        if due:
            plans.append((i, opt, due, [x for g in due for x in opt._sync_todo(opt.param_groups[g])]))
    bad = _not_finite(plans)
    good = [plan for plan in plans if plan[0] not in bad]
    tensors, sorted_vals, layouts = [], [], []
    for _, opt, _, todo in good:
        for p, t, st in todo:
            tensors.append(t)
            sorted_vals.append(opt._sorted_rows(p).dense())
            layouts.append(st.layout)
    if tensors:
        flat_sync.sync_flat_(tensors, sorted_vals, layouts)
    for _, opt, due, todo in good:
        if len(due) == len(opt.param_groups):
            opt._synced = True  # (a sync of every group: LaPerm.sync)
        opt._run_hooks([p for p, _, _ in todo])
    return sorted(bad)


def _not_finite(plans: list[tuple[int, LaPerm, list[int], list[Any]]]) -> set[int]:
    """The plans (by optimizer index) whose due tensors hold NaN or inf: every tensor's extremes (as
    ``LaPerm._check_finite``: NaN propagates into them, an inf is one), read in one host sync."""
    checked = [(i, todo) for i, opt, _, todo in plans if opt.check_finite and any(t.numel() for _, t, _ in todo)]
    if not checked:
        return set()
    fine = torch.stack(
        [
            torch.stack([e.double() for _, t, _ in todo if t.numel() for e in torch.aminmax(t.detach())])
            .isfinite()
            .all()
            for _, todo in checked
        ]
    ).tolist()
    return {i for (i, _), ok in zip(checked, fine, strict=True) if not ok}
