"""The training engine: one :class:`~laperm.config.TrainConfig` in, one run folder out.

* :mod:`.session` -- :func:`train`: checks, the run folder and its lock, then a Trainer;
* :mod:`.trainer` -- :class:`Trainer`: fit -> epoch -> step;
* :mod:`.evaluation` -- evaluation at synced weights and best-model selection;
* :mod:`.checkpointing` -- the checkpoint format; find / restore / reconcile on resume;
* :mod:`.state` -- :class:`TrainingState`, the engine's counters;
* :mod:`.guards` -- stop signals, the sync invariant, numerical checks, fault points;
* :mod:`.callbacks` -- :class:`Callbacks`, the extension point;
* :mod:`.summary` -- epoch lines and summary.json;
* :mod:`.errors` -- the exceptions a run can end with.
"""

from .callbacks import Callbacks
from .checkpointing import CKPT_FORMAT, CKPT_KEYS
from .errors import DeadlineReached, InvariantError, NumericalError, TrainingInterrupted
from .evaluation import Evaluator, batchnorm_modules, evaluate, recalibrate_bn, synced_state
from .guards import StopFlag, SyncChecker, first_nonfinite, row_fingerprint
from .session import train
from .state import RunState, TrainingState
from .trainer import Trainer

__all__ = [
    "train",
    "Trainer",
    "Callbacks",
    "TrainingState",
    "RunState",
    "Evaluator",
    "evaluate",
    "recalibrate_bn",
    "synced_state",
    "batchnorm_modules",
    "SyncChecker",
    "StopFlag",
    "row_fingerprint",
    "first_nonfinite",
    "TrainingInterrupted",
    "DeadlineReached",
    "NumericalError",
    "InvariantError",
    "CKPT_FORMAT",
    "CKPT_KEYS",
]
