"""Reconnection dynamics: how many weights each sync moves, per layer.

``moved_per_layer`` compares two synced states.  ``SyncRecorder`` watches a
:class:`laperm.optim.LaPerm` optimizer and, after every scheduled sync, records
the step, the per-layer fraction of entries whose value changed since the
previous sync, and (optionally) a snapshot of chosen tensors, e.g. F1's ten
28×28 templates for an animation.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["moved_per_layer", "SyncRecorder"]


def moved_per_layer(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> dict[str, float]:
    """``{name: fraction of entries whose value differs}`` for the tensors in both mappings."""
    out = {}
    for name, a in before.items():
        b = after[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        out[name] = float((a != b).float().mean()) if a.numel() else 0.0
    return out


class SyncRecorder:
    """Records per-layer moved fractions (and snapshots) at each scheduled sync of a LaPerm optimizer.

    ``attach`` wraps the optimizer's ``step`` on that instance only; a step that
    ends in a full sync (``opt.is_synced``) is recorded.  Temporary syncs made
    for evaluation are not steps, so they are not counted.
    """

    def __init__(self, snapshot: tuple[str, ...] = (), max_snapshots: int = 400) -> None:
        self.snapshot_names = snapshot
        self.max_snapshots = max_snapshots
        self.records: list[dict[str, Any]] = []
        self.snapshots: list[tuple[int, dict[str, Tensor]]] = []
        self._prev: dict[str, Tensor] | None = None
        self._step = 0

    def attach(self, opt: Any) -> SyncRecorder:
        inner_step = opt.step
        self._prev = self._state(opt)  # θ0 (LaPerm is created on the initial weights)
        self._take_snapshot(0)

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            out = inner_step(*args, **kwargs)
            self._step += 1
            if optimizer.is_synced:
                self.observe(optimizer)
            return out

        # A bound method, as torch's LR schedulers expect to find (they wrap opt.step themselves).
        opt.step = types.MethodType(step, opt)
        return self

    @staticmethod
    def _state(opt: Any) -> dict[str, Tensor]:
        return {name: p.detach().cpu().clone() for name, p in opt.permuted_parameters()}

    def observe(self, opt: Any) -> None:
        """Record the current (synced) state against the previous one."""
        cur = self._state(opt)
        moved = moved_per_layer(self._prev, cur) if self._prev is not None else {}
        total = sum(t.numel() for t in cur.values())
        overall = sum(moved[n] * cur[n].numel() for n in moved) / max(total, 1)
        self.records.append({"step": self._step, "moved": moved, "moved_total": overall})
        self._prev = cur
        self._take_snapshot(self._step)

    def _take_snapshot(self, step: int) -> None:
        if self.snapshot_names and len(self.snapshots) < self.max_snapshots:
            src = self._prev or {}
            self.snapshots.append((step, {n: src[n].clone() for n in self.snapshot_names if n in src}))
