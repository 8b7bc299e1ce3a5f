"""A Hugging Face ``transformers.Trainer`` callback: evaluate and save at synced weights, sync at the end.

    from laperm.integrations import LaPermTrainerCallback
    opt = LaPerm(torch.optim.AdamW(laperm_param_groups(model), lr=1e-3), k=50)
    trainer = Trainer(model, args, train_dataset=..., eval_dataset=...,
                      optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                      callbacks=[LaPermTrainerCallback()])

* when the Trainer is about to evaluate or save (after a step or an epoch), the weights are synced
  temporarily, so evaluation and the saved model see synced weights (a saved ``model.safetensors`` is
  a row-wise permutation of θ0); the inner weights come back before the next training step, so
  evaluating does not change the trajectory;
* ``eval_laperm_reconnected`` -- the fraction of permuted weights that changed since the previous
  evaluation -- is added to the evaluation metrics (and to ``trainer.state.log_history``);
* at the end of training the weights are synced for good and (``verify=True``) checked.

A checkpoint holds the synced model (``model.safetensors``) and the optimizer's state, taken at those
synced weights, so it carries the inner weights the model file lacks: with ``"overwrite"`` (the paper's
rule) those of the permuted tensors (:mod:`laperm.optim_state`), with ``"latent"`` the latent weights.
The Trainer loads the model first, then the optimizer's state, which puts the inner weights back, so
``trainer.train(resume_from_checkpoint=...)`` continues bit for bit under either rule (tested).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..optim import LaPerm
from ._common import ReconnectionTracker, find_laperm

__all__ = ["LaPermTrainerCallback"]

METRIC = "eval_laperm_reconnected"


class LaPermTrainerCallback(TrainerCallback):
    """Evaluate and save at synced weights; sync (and verify) at the end of training.

    Pass the LaPerm optimizer to the Trainer with ``optimizers=(opt, scheduler)``.

    Args:
        verify: after the final sync, check that every permuted row is a permutation of its θ0 row.
    """

    def __init__(self, verify: bool = True) -> None:
        self.verify = verify
        self.tracker = ReconnectionTracker()
        self._synced: contextlib.ExitStack | None = None
        self._measured_at: int | None = None  # the step whose reconnected fraction is pending

    @property
    def reconnected(self) -> float | None:
        """The last reconnected fraction measured (at an evaluation or at the end of training)."""
        return self.tracker.last

    @staticmethod
    def _laperm(optimizer: Any) -> LaPerm:
        opt = find_laperm(optimizer)
        if opt is None:
            raise TypeError(
                "LaPermTrainerCallback needs a LaPerm optimizer: pass Trainer(..., optimizers=(LaPerm(...), scheduler))"
            )
        return opt

    def _enter(self, state: TrainerState, control: TrainerControl, optimizer: Any) -> None:
        if self._synced is not None or not (control.should_evaluate or control.should_save):
            return
        opt = self._laperm(optimizer)
        self._synced = contextlib.ExitStack()
        self._synced.enter_context(opt.synced_weights())
        if control.should_evaluate:
            self.tracker.update(opt)
            self._measured_at = state.global_step

    def _exit(self) -> None:
        if self._synced is not None:
            stack, self._synced = self._synced, None
            stack.close()  # the inner weights back in place

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._laperm(optimizer)  # fail at once, not at the first evaluation

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._enter(state, control, optimizer)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._enter(state, control, optimizer)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics is not None and self._measured_at == state.global_step and self.tracker.last is not None:
            metrics[METRIC] = self.tracker.last
            state.log_history.append({METRIC: self.tracker.last, "step": state.global_step})

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._exit()

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._exit()

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        opt = self._laperm(optimizer)
        best_loaded = bool(args.load_best_model_at_end and state.best_model_checkpoint) and model is not None
        # The best checkpoint the Trainer has just loaded holds synced weights: keep them.
        kept = [(p, p.detach().clone()) for p in model.parameters()] if best_loaded and model is not None else []
        self._exit()
        with torch.no_grad():
            for p, value in kept:
                p.copy_(value)
        if best_loaded and opt.latent_weights():
            return  # (a sync of latent groups would replace the best weights with the final ones)
        opt.sync()  # (a synced state stays as it is)
        if self.verify:
            opt.verify()
        fraction = self.tracker.update(opt)
        if fraction is not None:
            state.log_history.append({"laperm_reconnected": fraction, "step": state.global_step})
