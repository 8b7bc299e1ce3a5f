"""The engine's own progress counters, saved in every checkpoint under ``run``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainingState"]


@dataclass
class TrainingState:
    """Where a run is. The field names are the checkpoint format (``run`` key): do not rename them."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    # accumulators of the epoch in progress (for mid-epoch checkpoints)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    epoch_time: float = 0.0
    elapsed: float = 0.0
    changes: list[dict[str, Any]] = field(default_factory=list)  # settings changed on resume
    step_evals: list[dict[str, Any]] = field(default_factory=list)  # evaluations every eval_steps steps

    def state_dict(self) -> dict[str, Any]:
        return vars(self).copy()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = TrainingState(**state)  # TypeError on an unknown key: the checkpoint does not fit
        vars(self).update(vars(fresh))

    def start_epoch_totals(self) -> None:
        """Zero the totals of the epoch in progress (after its record is written)."""
        self.loss_sum, self.correct, self.seen, self.epoch_time = 0.0, 0, 0, 0.0


RunState = TrainingState  # the former name
