"""LaPerm's step bookkeeping, apart from the optimizer: when a group is due to sync, whether the tensors
about to be synced are finite, and one flat sync of several optimizers' due tensors.

:class:`~laperm.optim.LaPerm` counts its steps with :func:`count_steps` (host-side integers only: no
device read) and checks its tensors with :func:`check_finite` before a sync; its public
``sync_together`` gathers each optimizer's due tensors into a :class:`DueSync` and hands them all to
:func:`sync_due_together`: one :func:`laperm.flat_sync.sync_flat_` call for every optimizer (a fixed
handful of kernels on CUDA, where one sync per optimizer would be one call each), bit for bit what
each optimizer's own sync writes (``sync_flat_``'s contract).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor

from . import flat_sync
from .reconnect import RowLayout

__all__ = [
    "LaPermError",
    "HookHandle",
    "observed",
    "DueSync",
    "check_k",
    "count_steps",
    "check_finite",
    "finite_check",
    "sync_due_together",
]


class LaPermError(RuntimeError):
    """A LaPerm invariant or usage rule was broken; the message says how to fix it."""


# The param-group keys LaPerm adds and reads itself, on the host (never inside the inner step).
LAPERM_GROUP_KEYS = ("k", "laperm_step", "granularity", "sync_rule", "permute", "transposed", "unit_groups")


class HookHandle:
    """Returned by ``LaPerm.register_sync_hook``: ``remove()`` unregisters the hook."""

    def __init__(self, hooks: list, hook: Callable) -> None:
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def observed(optimizer: torch.optim.Optimizer) -> bool:
    """True when something observes ``optimizer``'s step: a step hook of its own or a global one, or the
    autograd profiler (then its step runs torch's hook and profiler wrapper; otherwise, to save the range's
    ~10 us per step, it does not)."""
    # (if a torch version renames these registries, always take the observed path)
    return (
        bool(optimizer._optimizer_step_pre_hooks)
        or bool(optimizer._optimizer_step_post_hooks)
        or bool(getattr(_torch_optimizer, "_global_optimizer_pre_hooks", True))
        or bool(getattr(_torch_optimizer, "_global_optimizer_post_hooks", True))
        or torch.autograd._profiler_enabled()
    )


def check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (the sync period in steps), got {k!r}")


def count_steps(groups: Sequence[dict[str, Any]]) -> list[int] | None:
    """Count one step in every group; the indices of the groups whose sync is due now (None: none)."""
    due = None
    for i, group in enumerate(groups):
        if "laperm_step" not in group:
            raise LaPermError(
                "a param group was added to the inner optimizer after wrapping it; "
                "add groups through LaPerm.add_param_group so their θ0 is recorded"
            )
        count = group["laperm_step"] = group["laperm_step"] + 1
        k = group["k"]
        if type(k) is not int or k < 1:  # the full check only when the fast one fails
            check_k(k)
        if count % k == 0:
            due = (due or []) + [i]
    return due


def _extremes(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Every tensor's minimum and maximum, float64: NaN propagates into them and an inf is one, so all
    are finite iff every tensor is (``aminmax``: one pass without a boolean temporary, ~15x faster than
    ``isfinite(t).all()`` on CPU; float64 because a cast never creates an inf)."""
    return [e.double() for t in tensors if t.numel() for e in torch.aminmax(t.detach())]


def check_finite(tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    """Raise :class:`LaPermError` naming the first of ``tensors`` that holds NaN or inf (before any is
    synced). The extremes of all are read together: one host sync on CUDA, not one per tensor."""
    ext = _extremes(tensors)
    if not ext or bool(torch.isfinite(torch.stack(ext)).all()):
        return
    for t, name in zip(tensors, names, strict=True):  # slow path: name the culprit
        if not bool(torch.isfinite(t).all()):
            raise LaPermError(
                f"parameter {name} holds NaN or inf at a synchronisation, so its "
                "ranks are undefined; lower the learning rate or check the loss"
            )


def finite_check(tensors: Sequence[Tensor], names: Sequence[str]) -> Callable[[list[Tensor]], None]:
    """:func:`check_finite` for :func:`flat_sync.sync_flat_`'s ``check``: the extremes of its flat values, read once."""

    def check(values: list[Tensor]) -> None:
        ext = _extremes(values)
        if ext and not bool(torch.isfinite(torch.stack(ext)).all()):
            check_finite(tensors, names)  # names the culprit and raises

    return check


class DueSync(NamedTuple):
    """One optimizer's sync due at this step: its tensors (local), their sorted θ0 rows and layouts."""

    tensors: list[Tensor]
    sorted_rows: list[Tensor]
    layouts: list[RowLayout]
    check: bool  # the optimizer's check_finite


def sync_due_together(plans: Sequence[DueSync]) -> set[int]:
    """Sync every plan's tensors in one :func:`flat_sync.sync_flat_` call, except those of the plans whose
    tensors hold NaN or inf (checked first, one reduction for all plans, read once): their indices are
    returned, and they are left as they are (the caller reports each as its optimizer's fault)."""
    checked = [(i, plan) for i, plan in enumerate(plans) if plan.check and any(t.numel() for t in plan.tensors)]
    bad: set[int] = set()
    if checked:
        fine = torch.stack([torch.stack(_extremes(plan.tensors)).isfinite().all() for _, plan in checked]).tolist()
        bad = {i for (i, _), ok in zip(checked, fine, strict=True) if not ok}
    good = [plan for i, plan in enumerate(plans) if i not in bad]
    tensors = [t for plan in good for t in plan.tensors]
    if tensors:
        flat_sync.sync_flat_(
            tensors, [s for plan in good for s in plan.sorted_rows], [x for plan in good for x in plan.layouts]
        )
    return bad
