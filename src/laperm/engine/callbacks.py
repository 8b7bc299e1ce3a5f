"""The engine's extension point: hooks a run calls at fixed moments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Callbacks", "EpochCallback"]


class Callbacks:
    """Optional hooks into a run of :func:`laperm.train.train`: subclass and override what you need.

    * ``on_optimizer(opt, model)``: once, right after the optimizer is built (before a resumed
      run loads its state), on every process -- e.g. to register LaPerm sync hooks.
    * ``before_evaluation(record, model, opt)``: before each evaluation (epoch ends and
      ``eval_steps``), with the weights as training left them (for LaPerm: not yet synced);
      an epoch end's ``record`` already holds its training metrics (``train_loss``, ...), a
      step evaluation's only ``step`` and ``epoch``.
    * ``on_epoch(record, model, opt)``: after each epoch's evaluation, still in the synced
      state; keys added to ``record`` go into metrics.jsonl.

    The last two run on the main process only.
    """

    def on_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        return None

    def before_evaluation(self, record: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
        return None

    def on_epoch(self, record: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
        return None


class EpochCallback(Callbacks):
    """``train(on_epoch=fn)``: a Callbacks with only ``on_epoch``."""

    def __init__(self, fn: Callable[[dict[str, Any], nn.Module, torch.optim.Optimizer], None]) -> None:
        self.on_epoch = fn  # type: ignore[method-assign,assignment]
