"""The public training API, kept stable: ``from laperm.train import train, Callbacks, ...``.

The engine lives in :mod:`laperm.engine` (the loop, evaluation, checkpoints,
guards) and the construction of a run in :mod:`laperm.build`; this module
re-exports their public names under the paths users and examples import.
"""

from __future__ import annotations

from .build import build_model, build_optimizer, load_data, resolve_device
from .engine import (
    CKPT_FORMAT,
    CKPT_KEYS,
    Callbacks,
    InvariantError,
    NumericalError,
    RunState,
    SyncChecker,
    Trainer,
    TrainingInterrupted,
    TrainingState,
    evaluate,
    recalibrate_bn,
    synced_state,
    train,
)

__all__ = [
    "train",
    "Callbacks",
    "Trainer",
    "TrainingState",
    "RunState",
    "TrainingInterrupted",
    "NumericalError",
    "InvariantError",
    "resolve_device",
    "evaluate",
    "build_model",
    "build_optimizer",
    "load_data",
    "recalibrate_bn",
    "synced_state",
    "SyncChecker",
    "CKPT_FORMAT",
    "CKPT_KEYS",
]
