"""TensorBoard logging for :func:`laperm.train.train` (``laperm train --tensorboard``).

Written (on the main process only) to an event-file folder, by default ``RUN_DIR/tensorboard``:

* ``epoch/<metric>`` at each epoch end: train/val/test loss and accuracy, ``lr``, ``k``, ``reconnected``
  (the fraction of permuted weights changed since the previous epoch's synced state) ...;
* ``eval/<metric>`` at each step evaluation (``--eval-steps``);
* ``sync/reconnected``, ``sync/lr`` at every sync, and ``moved/<parameter>``: a histogram, per permuted
  layer, of how far each weight moved (new value minus value at the previous sync; θ0 before the first).

The x axis is always the training step.  The sync statistics keep one copy of the permuted weights.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..optim import LaPerm
from ..train import Callbacks

__all__ = ["TensorBoardCallbacks"]


def _is_main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TensorBoardCallbacks(Callbacks):
    """Log a :func:`~laperm.train.train` run to TensorBoard; call :meth:`close` when it is done.

    Args:
        log_dir: the event-file folder (created on first use, on the main process).
        histograms: also write the per-layer histograms of how far weights moved at each sync.
    """

    def __init__(self, log_dir: str | Path, histograms: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.histograms = histograms
        self.writer: Any = None  # a torch.utils.tensorboard.SummaryWriter on the main process
        self._names: dict[int, str] = {}
        self._previous: dict[int, torch.Tensor] = {}  # each permuted weight at its previous sync
        self._pending: list[dict[str, Any]] = []  # step evaluations not yet filled in

    def on_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        if not _is_main():
            return
        from torch.utils.tensorboard import SummaryWriter  # (needs the tensorboard package)

        self.writer = SummaryWriter(str(self.log_dir))
        if isinstance(opt, LaPerm):
            self._names = {id(p): name for name, p in opt.permuted_parameters()}
            self._previous = {id(p): p.detach().clone() for _, p in opt.permuted_parameters()}
            opt.register_sync_hook(self._on_sync)

    @torch.no_grad()
    def _on_sync(self, opt: LaPerm, params: list[torch.Tensor]) -> None:
        self._write_pending()
        step = opt.param_groups[0]["laperm_step"]
        moved = total = 0
        for p in params:
            before = self._previous.get(id(p))
            if before is None:
                continue
            delta = p.detach() - before
            moved += int((delta != 0).sum())
            total += delta.numel()
            if self.histograms:
                self.writer.add_histogram(f"moved/{self._names[id(p)]}", delta.float().cpu(), step)
            before.copy_(p)
        if total:
            self.writer.add_scalar("sync/reconnected", moved / total, step)
        self.writer.add_scalar("sync/lr", opt.param_groups[0]["lr"], step)

    def before_evaluation(self, record: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self._write_pending()
        if "train_loss" not in record:  # a step evaluation: the engine fills the record in after this call
            self._pending.append(record)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self._write_pending()
        self._scalars("epoch", record)
        self.writer.flush()

    def _write_pending(self) -> None:
        for record in self._pending:
            self._scalars("eval", record)
        self._pending.clear()

    def _scalars(self, prefix: str, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), record["step"])

    def close(self) -> None:
        """Write what is pending and close the event file."""
        if self.writer is not None:
            self._write_pending()
            self.writer.close()
