"""Evaluation at synced weights, BatchNorm recalibration, and best-model selection on validation.

Rules we keep (docs/algorithm.md, "Evaluating a LaPerm run"): evaluation, model
selection and saving happen only at *synced* states -- a temporary sync that
leaves the training trajectory untouched -- and the model is selected on a
validation split carved from the training set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint, distributed
from ..optim import LaPerm
from .callbacks import Callbacks
from .state import TrainingState
from .text import add_bits_per_char

__all__ = ["evaluate", "batchnorm_modules", "recalibrate_bn", "synced_state", "Evaluator"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (x, y) batches: image loaders, text windows


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, d: distributed.Dist | None = None) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy of ``model`` (in eval mode) over ``loader``.

    In a distributed run each rank evaluates its shard of every batch and the
    sums are added up across ranks.
    """
    d = distributed.Dist() if d is None else d
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    n = 0
    for xb, yb in loader:
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double().cpu()
        correct += (logits.argmax(1) == yb).sum().cpu()
        n += len(yb)
    model.train(was_training)
    total_loss, total_correct, total_n = d.all_sum(float(loss_sum), float(correct), float(n))
    return total_loss / max(total_n, 1), int(total_correct) / max(total_n, 1)


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` (whose running statistics a sync makes stale)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Batches, batches: int) -> None:
    """Recompute BatchNorm running statistics for the current (synced) weights."""
    bns = batchnorm_modules(model)
    if not bns or batches <= 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    was_training = model.training
    model.train()
    for i, (xb, _) in enumerate(loader):
        if i >= batches:
            break
        model(xb)
    model.train(was_training)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom


@contextlib.contextmanager
def synced_state(opt: torch.optim.Optimizer, model: nn.Module, calib: Batches | None, batches: int) -> Iterator[None]:
    """Weights synced (and BN recalibrated) inside; training state restored on exit."""
    if not isinstance(opt, LaPerm):
        yield
        return
    buffers = [(b, b.clone()) for m in batchnorm_modules(model) for b in m.buffers()] if batches else []
    with opt.synced_weights():
        if calib is not None and batches:
            recalibrate_bn(model, calib, batches)
        try:
            yield
        finally:
            for b, saved in buffers:
                b.copy_(saved)


class Evaluator:
    """Evaluates the synced weights into a record and keeps the best on validation (``best.pt``).

    Its own checkpoint state: the best model's weights (so a resumed run can restore
    ``best.pt``) and the last synced weights (for the ``reconnected`` metric). A language
    model's run (``bits_per_char``) also records its losses in bits per character.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        val: Batches | None,
        test: Batches,
        calib: Batches,
        bn_batches: int,
        best_path: Path,
        callbacks: Callbacks,
        d: distributed.Dist,
        bits_per_char: bool = False,
    ) -> None:
        self.model, self.opt, self.val, self.test, self.calib = model, opt, val, test, calib
        self.bn_batches, self.best_path, self.callbacks, self.d = bn_batches, best_path, callbacks, d
        self.bits_per_char = bits_per_char
        self.best_model: dict[str, torch.Tensor] | None = None  # a copy of best.pt's weights
        self.prev_synced: dict[str, torch.Tensor] | None = None

    @contextlib.contextmanager
    def evaluated(self, record: dict[str, Any], state: TrainingState) -> Iterator[None]:
        """Evaluate into ``record`` (and select); the body runs in the same synced state."""
        main = self.d.is_main
        if main:
            self.callbacks.before_evaluation(record, self.model, self.opt)
        self.d.broadcast_buffers(self.model)  # BatchNorm statistics of rank 0 for everyone
        with synced_state(self.opt, self.model, self.calib, self.bn_batches):
            if self.val is not None:
                record["val_loss"], record["val_acc"] = evaluate(self.model, self.val, self.d)
            record["test_loss"], record["test_acc"] = evaluate(self.model, self.test, self.d)
            if self.bits_per_char:
                add_bits_per_char(record)
            if self.val is not None and record["val_acc"] > state.best.get("val_acc", -1.0):
                self._select(record, state)
            yield

    def _select(self, record: dict[str, Any], state: TrainingState) -> None:
        digest = None
        if self.d.is_main:
            self.best_model = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            digest = checkpoint.save(
                {"model": self.best_model, "epoch": record["epoch"], "step": state.step, "synced": True}, self.best_path
            )
        state.best = {
            "epoch": record["epoch"],
            "step": state.step,
            "val_acc": record["val_acc"],
            "test_acc": record["test_acc"],
            "sha256": digest,
        }

    def measure_reconnected(self, record: dict[str, Any]) -> None:
        """``record["reconnected"]``: the fraction of permuted weights that moved since the last epoch's sync."""
        if not isinstance(self.opt, LaPerm):
            return
        current = {n: p.detach().clone() for n, p in self.opt.permuted_parameters()}
        if self.prev_synced is not None:
            moved = sum(int((current[n] != self.prev_synced[n]).sum()) for n in current)
            record["reconnected"] = moved / sum(t.numel() for t in current.values())
        self.prev_synced = current

    def load_state(
        self,
        best_model: dict[str, torch.Tensor] | None,
        prev_synced: dict[str, torch.Tensor] | None,
        device: torch.device,
    ) -> None:
        self.best_model = best_model
        # checkpoints load onto the CPU; prev_synced is compared with live weights
        self.prev_synced = None if prev_synced is None else {n: t.to(device) for n, t in prev_synced.items()}
