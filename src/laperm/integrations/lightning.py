"""A PyTorch Lightning callback: evaluate and save at synced weights, sync at the end of training.

    from laperm.integrations import LaPermLightningCallback
    trainer = pl.Trainer(callbacks=[LaPermLightningCallback()])   # configure_optimizers returns LaPerm(...)

* validation and test run at synced weights (a temporary sync; training continues from the inner
  weights, so evaluating does not change the trajectory), and ``laperm/reconnected`` -- the fraction
  of permuted weights that changed since the previous validation -- is logged;
* a checkpoint's ``state_dict`` holds the synced weights (what ``load_from_checkpoint`` gives you: a
  row-wise permutation of θ0), and LaPerm's state in it, taken at those synced weights, carries the
  inner weights of the permuted tensors (:mod:`laperm.optim_state`), which it puts back when a fit
  resumes from the checkpoint, so a resumed run continues bit for bit (checkpoints of earlier laperm
  versions kept the whole inner model under ``laperm_inner_state_dict``: still read);
* at the end of training the weights are synced for good and (``verify=True``) checked.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytorch_lightning as pl
import torch

from ..optim import LaPerm
from ._common import ReconnectionTracker, find_laperm

__all__ = ["LaPermLightningCallback", "INNER_KEY"]

INNER_KEY = "laperm_inner_state_dict"  # where earlier versions kept the inner (training) weights: still read


class LaPermLightningCallback(pl.Callback):
    """Evaluate and save at synced weights, sync (and verify) at the end of training.

    Args:
        verify: after the final sync, check that every permuted row is a permutation of its θ0 row.
    """

    def __init__(self, verify: bool = True) -> None:
        self.verify = verify
        self.tracker = ReconnectionTracker()
        self._synced: contextlib.ExitStack | None = None

    @property
    def reconnected(self) -> float | None:
        """The last reconnected fraction measured (at a validation or at the end of training)."""
        return self.tracker.last

    @staticmethod
    def laperm(trainer: pl.Trainer) -> LaPerm | None:
        """The trainer's LaPerm optimizer (the first one found), or None."""
        return next((opt for o in trainer.optimizers if (opt := find_laperm(o)) is not None), None)

    # -- evaluation at synced weights --------------------------------------------------------
    def _enter(self, trainer: pl.Trainer) -> None:
        opt = self.laperm(trainer)
        if opt is not None and self._synced is None:
            self._synced = contextlib.ExitStack()
            self._synced.enter_context(opt.synced_weights())

    def _exit(self) -> None:
        if self._synced is not None:
            stack, self._synced = self._synced, None
            stack.close()  # the inner weights back in place

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = self.laperm(trainer)
        if opt is None or trainer.sanity_checking:
            return
        fraction = self.tracker.update(opt)
        if fraction is not None:
            pl_module.log("laperm/reconnected", fraction)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._exit()

    # -- the end of training ------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()
        opt = self.laperm(trainer)
        if opt is None:
            return
        opt.sync()
        if self.verify:
            opt.verify()
        fraction = self.tracker.update(opt)
        if fraction is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"laperm/reconnected": fraction}, step=trainer.global_step)

    # -- checkpoints: synced weights to use, inner weights to resume ---------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        opt = self.laperm(trainer)
        if opt is None or "state_dict" not in checkpoint or opt.is_synced:
            return  # (saved during validation, inside the temporary sync: the optimizer's state carries the inner weights)
        with opt.synced_weights():  # the synced model, and LaPerm's state taken at it: it carries the inner weights
            checkpoint["state_dict"] = _copy(pl_module.state_dict())
            states = checkpoint.get("optimizer_states") or []
            for i, o in enumerate(trainer.optimizers[: len(states)]):
                if find_laperm(o) is opt:
                    states[i] = trainer.strategy.optimizer_state(o)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint of an earlier laperm holds the whole inner model beside the synced one: resume from it.
        # (Newer ones need nothing here: LaPerm's state puts the inner weights back when it is loaded.)
        if INNER_KEY in checkpoint:
            pl_module.load_state_dict(checkpoint[INNER_KEY])


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
