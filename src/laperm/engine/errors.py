"""The engine's exceptions: each one a run can end with, and what the user does next."""

from __future__ import annotations

from pathlib import Path

from ..optim import LaPermError

__all__ = [
    "TrainingInterrupted",
    "DeadlineReached",
    "NumericalError",
    "InvariantError",
    "DeviceUnusable",
    "numerical_error",
    "device_unusable",
]


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was saved."""


class DeadlineReached(TrainingInterrupted):
    """The run's ``stop_at`` time came near: the current step finished and a checkpoint was saved."""


class NumericalError(RuntimeError):
    """The loss or the weights became NaN/inf."""


class InvariantError(LaPermError):
    """A permuted row is no longer a permutation of its θ0 row (a bug or memory corruption)."""


class DeviceUnusable(RuntimeError):
    """The device cannot go on in this process (laperm.fast.graph.DeviceFault): the run ends at its last
    checkpoint, and the resume command (a fresh process) continues it."""


def device_unusable(fault: Exception, step: int, run_dir: Path, last: Path | None) -> DeviceUnusable:
    """A DeviceUnusable saying what was kept and how to continue (nothing is saved from the broken process)."""
    kept = f"the last checkpoint, {last.name}, is kept" if last else "no checkpoint had been saved yet"
    return DeviceUnusable(
        f"{fault} (at step {step}); nothing from that point on was saved and {kept}. "
        f"Continue in a fresh process with: laperm train --resume {run_dir}"
    )


def numerical_error(what: str, step: int, run_dir: Path, last: Path | None, lr: float) -> NumericalError:
    """A NumericalError saying what was kept and how to continue more gently."""
    kept = f"the last good checkpoint, {last.name}, is kept" if last else "no checkpoint had been saved yet"
    return NumericalError(
        f"{what} at step {step}; nothing from that point on was saved and {kept}. "
        f"Continue with a lower learning rate: laperm train --resume {run_dir} --lr {lr / 10:g}"
    )
