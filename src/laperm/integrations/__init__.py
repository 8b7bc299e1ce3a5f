"""LaPerm inside the training tools people already use (optional dependencies, imported lazily).

* :class:`LaPermLightningCallback` -- PyTorch Lightning (``pip install laperm[integrations]``);
* :class:`LaPermTrainerCallback` -- the Hugging Face ``transformers.Trainer``;
* :class:`TensorBoardCallbacks` -- TensorBoard logging for :func:`laperm.train.train` (``laperm train --tensorboard``);
* :func:`find_laperm` and :class:`ReconnectionTracker` -- the pieces they share, for your own loop
  (``accelerate``, ``torch.amp`` and ``torch.compile`` need no adapter: see docs/integrations.md).

Importing :mod:`laperm` or this package imports none of Lightning, transformers or TensorBoard; each
class's module is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._common import ReconnectionTracker, find_laperm

__all__ = [
    "LaPermLightningCallback",
    "LaPermTrainerCallback",
    "TensorBoardCallbacks",
    "ReconnectionTracker",
    "find_laperm",
]

_LAZY = {
    "LaPermLightningCallback": ".lightning",
    "LaPermTrainerCallback": ".huggingface",
    "TensorBoardCallbacks": ".tensorboard",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
