"""The training loop: :class:`Trainer` (fit -> epoch -> step), reading top to bottom.

Rules we keep (docs/algorithm.md, "Evaluating a LaPerm run"): evaluation,
model selection and saving happen only at synced states; training always ends
with a final sync; the test accuracy of the selected and of the final model
are both reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import checkpoint, distributed, rundir
from ..build import Loaders, build_model, build_optimizer, describe_model, model_options
from ..config import ConfigError, TrainConfig, k_for_epoch, lr_factor, parse_init
from ..data import Dataset
from ..data.loader import derive_seed
from ..data.text import TextCorpus
from ..fast.graph import DeviceFault
from ..models import ModelSpec
from ..optim import LaPerm, LaPermError
from ..verify import layout_records
from . import checkpointing as ckpt
from . import fast
from . import summary as report
from .callbacks import Callbacks
from .checkpointing import Key
from .errors import DeadlineReached, InvariantError, TrainingInterrupted, device_unusable, numerical_error
from .evaluation import Evaluator, evaluate, recalibrate_bn
from .guards import Deadline, StopFlag, SyncChecker, first_nonfinite, inject_fault
from .state import TrainingState
from .text import text_summary

__all__ = ["Trainer"]

FLUSH_EVERY = 25  # steps between host syncs of the running loss (the display, the NaN check)


class Trainer:
    """One run: built from a config, a run folder and (on resume) a checkpoint; :meth:`fit` trains it."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        device: torch.device,
        spec: ModelSpec,
        ds: Dataset | TextCorpus,
        loaders: Loaders,
        log: Callable[[str], None],
        callbacks: Callbacks,
        d: distributed.Dist,
        resumed: tuple[Path | None, dict[str, Any] | None] = (None, None),
    ) -> None:
        if cfg.mode == "fast":
            loaders = fast.device_loaders(loaders, cfg.channels_last)  # the data strategy
        self.cfg, self.run_dir, self.device, self.spec, self.ds = cfg, run_dir, device, spec, ds
        self.loaders, self.log, self.callbacks, self.d = loaders, log, callbacks, d
        self.main = d.is_main  # only rank 0 writes files
        self.text = isinstance(ds, TextCorpus)  # a language model: bits per character and a sample
        self.last_saved, saved = resumed
        self.pos, self.start = 0, 0.0  # batch position in the epoch, and when its timing (re)started
        self.deadline = Deadline(cfg.stop_at)
        self._build_model()
        self.state = TrainingState()
        # Accumulators of the epoch in progress, flushed to `state` every FLUSH_EVERY steps (not at
        # checkpoints: the float sums must group identically in a resumed run).
        self.loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        self.correct_acc = torch.zeros((), dtype=torch.int64, device=device)
        self.evaluator = Evaluator(
            self.model,
            self.opt,
            loaders.val,
            loaders.test,
            loaders.calib,
            cfg.bn_recalibrate,
            run_dir / rundir.BEST,
            callbacks,
            d,
            bits_per_char=self.text,
        )
        if saved is not None:
            self._restore(saved)
        # The step strategy (after the restore: a CUDA graph is captured over the loaded optimizer state).
        self.update = self._step_strategy()
        self.metrics = rundir.MetricsLog(run_dir / rundir.METRICS if self.main else None, self.state.records)
        self.checker = SyncChecker(self.laperm) if self.laperm else None
        self.replicas = distributed.ReplicaCheck(d) if self.laperm and d.enabled and cfg.check_replicas else None
        if self.replicas is not None and self.laperm is not None:
            self.laperm.register_sync_hook(self.replicas)

    # -- construction -------------------------------------------------------------------

    def _build_model(self) -> None:
        cfg, device = self.cfg, self.device
        torch.manual_seed(derive_seed(cfg.seed, 6))  # dropout and anything else on the global RNG
        self.model, masks = build_model(cfg, device, **model_options(self.ds))
        self.opt = build_optimizer(cfg, self.model)
        self.callbacks.on_optimizer(self.opt, self.model)
        self.laperm = self.opt if isinstance(self.opt, LaPerm) else None
        self.l2 = self.spec.l2 if cfg.l2 is None else cfg.l2
        # every registry model has l2_parameters() (models.registry); nn.Module's typing cannot say so
        self.l2_params = cast(Any, self.model).l2_parameters() if self.l2 else []
        # Baselines on a pruned/shared init keep the pruned weights at zero (a fixed mask).
        self.fixed = (
            [(p, masks[n]) for n, p in self.model.named_parameters() if n in masks] if self.laperm is None else []
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda e: lr_factor(cfg.lr_schedule, e))
        description = describe_model(cfg, self.model) if self.laperm else None
        self.init_record = {
            "state": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "permuted": layout_records(self.laperm) if self.laperm else [],
            "free": description.records() if description else [],
            "optimizer": cfg.optimizer,
            "seed": cfg.seed,
            "model": cfg.model,
            "init": cfg.init,
        }
        if self.last_saved is None and self.main:
            checkpoint.save(self.init_record, self.run_dir / rundir.INIT)
            if description is not None:
                checkpoint.atomic_write_text(self.run_dir / rundir.DESCRIPTION, f"{description}\n")
                self.log(f"LaPerm: {description.total} (table: {rundir.DESCRIPTION})")
        # Data parallel: DDP averages gradients; the weights and the sync stay local and identical.
        self.forward: nn.Module = (
            nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
            if self.d.enabled
            else self.model
        )

    def _step_strategy(self) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
        """``update(xb, yb, batch)``: the eager step, or fast mode's device step (a stacked member: the stack's)."""
        if self.cfg.mode == "eager":
            return self._eager_update
        return fast.FastUpdate(
            self.cfg, self.model, self.opt, self.l2, self.l2_params, (self.loss_acc, self.correct_acc)
        )

    # -- checkpoints --------------------------------------------------------------------

    def _restore(self, saved: dict[str, Any]) -> None:
        """Each component loads its own part of the checkpoint."""
        try:
            self.model.load_state_dict(saved[Key.MODEL])
            self.opt.load_state_dict(saved[Key.OPTIMIZER])
            self.sched.load_state_dict(saved[Key.SCHEDULER])
            self.loaders.train.load_state_dict(saved[Key.LOADER])
            if saved.get(Key.CALIB_LOADER):
                self.loaders.calib.load_state_dict(saved[Key.CALIB_LOADER])
            ckpt.restore_rng(saved[Key.RNG], self.device, self.d.rank, self.d.world, self.d.enabled)
            self.state.load_state_dict(saved[Key.RUN])
            self.evaluator.load_state(saved.get(Key.BEST_MODEL), saved.get(Key.PREV_SYNCED), self.device)
            acc = saved.get(Key.ACC, (0.0, 0))
            self.loss_acc.fill_(acc[0])
            self.correct_acc.fill_(acc[1])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise checkpoint.CheckpointError(
                f"{self.last_saved} does not fit this run ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                "was config.yaml edited, or the checkpoint written by another version?"
            ) from None
        if self.cfg.epochs < self.state.epoch:
            raise ConfigError(f"the run has already done {self.state.epoch} epochs; --epochs must be at least that")
        if self.main:
            ckpt.reconcile_init(self.run_dir, self.init_record, self.laperm, self.log)
            ckpt.reconcile_best(self.run_dir, self.state, self.evaluator.best_model, self.log)
        ckpt.apply_changes(self.cfg, saved[Key.CONFIG], self.state, self.opt, self.sched, self.log)
        self._log_resume()

    def _log_resume(self) -> None:
        pos, name, st = self.loaders.train.state_dict()["batch"], getattr(self.last_saved, "name", "?"), self.state
        self.log(
            f"resuming {self.run_dir} from {name}: step {st.step}, epoch {st.epoch + 1} "
            f"at batch {pos}/{len(self.loaders.train)}"
            if pos
            else f"resuming {self.run_dir} from {name}: step {st.step}, {st.epoch} epochs done"
        )

    def save_checkpoint(self) -> None:
        """Check for NaN first (one O(n) pass: a NaN never reaches a checkpoint), then write one."""
        st = self.state
        bad = first_nonfinite(self.model, self.opt)
        if bad is None and not math.isfinite(st.loss_sum + float(self.loss_acc)):
            bad = "the training loss"
        if bad is not None:
            raise self._numerical(f"{bad} became NaN or inf", st.step)
        st.records = self.metrics.records
        rng: dict[str, Any] = ckpt.rng_state(self.device)
        if self.d.enabled:
            rng = {"ranks": self.d.gather_objects(rng)}  # a collective: every rank gets here at the same step
        if not self.main:
            return
        payload = {
            Key.FORMAT: ckpt.CKPT_FORMAT,
            Key.CONFIG: self.cfg.to_dict(),
            Key.MODEL: self.model.state_dict(),
            Key.OPTIMIZER: self.opt.state_dict(),
            Key.SCHEDULER: self.sched.state_dict(),
            Key.LOADER: self.loaders.train.state_dict(),
            Key.CALIB_LOADER: self.loaders.calib.state_dict(),
            Key.RNG: rng,
            Key.RUN: st.state_dict(),
            Key.ACC: (float(self.loss_acc), int(self.correct_acc)),
            Key.PREV_SYNCED: self.evaluator.prev_synced,
            Key.BEST_MODEL: self.evaluator.best_model,
            **self.checkpoint_extras(),
        }
        ckpt_dir = self.run_dir / rundir.CHECKPOINTS
        path = checkpoint.checkpoint_path(ckpt_dir, st.step)
        t0 = time.perf_counter()
        checkpoint.save(payload, path)
        self.deadline.record(time.perf_counter() - t0)
        self.last_saved = path
        checkpoint.prune_checkpoints(ckpt_dir, self.cfg.keep_checkpoints)

    def checkpoint_extras(self) -> dict[str, Any]:
        """Keys a subclass adds to every checkpoint (a stacked run's member: its share of the stack)."""
        return {}

    def _numerical(self, what: str, step: int) -> Exception:
        return numerical_error(what, step, self.run_dir, self.last_saved, self.cfg.lr)

    # -- the loop -----------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, end with a permanent sync; returns the summary."""
        cfg = self.cfg
        self.log(
            f"{cfg.run_name()}: {cfg.model} on {self.ds.name} ({self.loaders.sizes}), "
            f"{report.describe_optimizer(cfg, self.opt)}, {parse_init(cfg.init).describe()}, "
            f"{cfg.epochs} epochs x {len(self.loaders.train)} steps, device {self.device}"
        )
        self.model.train()
        with StopFlag() as self.stop:
            while self.state.epoch < cfg.epochs:
                self.run_epoch()
        self.final_sync()
        return self.finish()

    def run_epoch(self) -> None:
        cfg, st, loader = self.cfg, self.state, self.loaders.train
        epoch = st.epoch
        if self.laperm:
            for g in self.laperm.param_groups:
                g["k"] = k_for_epoch(cfg, epoch)
        loader.set_epoch(epoch)
        self.pos = loader.state_dict()["batch"]  # > 0 when resuming mid-epoch
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=len(loader),
            initial=self.pos,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            leave=False,
            disable=None if cfg.progress and self.main else True,
            dynamic_ncols=True,
        )
        for xb, yb in loader:
            self.train_step(xb, yb)
            self.after_step(epoch)
        self.bar.close()
        st.epoch_time += time.perf_counter() - self.start
        st.elapsed += st.epoch_time
        self.sched.step()
        st.epoch += 1
        t0 = time.perf_counter()
        self.end_epoch()
        self.deadline.record(time.perf_counter() - t0)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One optimizer step on one (global) batch by the step strategy; LaPerm syncs inside it every k steps."""
        batch = self.loaders.train.global_batch_size(self.pos)  # all ranks' rows of this step
        if self.checker is not None:
            self.checker.step = self.state.step + 1
        try:
            self.update(xb, yb, batch)
        except LaPermError:  # LaPerm refuses to sync NaN weights: report it as the numerical fault it is
            bad = first_nonfinite(self.model)
            if bad is None:
                raise
            raise self._numerical(f"{bad} became NaN or inf", self.state.step + 1) from None
        except (
            DeviceFault
        ) as e:  # a failed replay, or a failed capture that broke the device: stop, keep the checkpoint
            raise device_unusable(e, self.state.step + 1, self.run_dir, self.last_saved) from e
        for p, m in self.fixed:
            p.data.mul_(m)
        self.state.step += 1
        self.state.seen += batch
        self.pos += 1

    def _eager_update(self, xb: torch.Tensor, yb: torch.Tensor, batch: int) -> None:
        """The eager step strategy: forward, loss, backward, ``opt.step()``; loss and accuracy into the totals."""
        cfg, d = self.cfg, self.d
        logits = self.forward(xb)
        # logit_scale: the loss is cross-entropy of T*logits (a softmax temperature); it changes
        # the objective's curvature only, never the predictions (argmax) of the trained net.
        scaled = logits if cfg.logit_scale == 1.0 else logits * cfg.logit_scale
        if d.enabled:
            # This rank's share of the global mean: DDP's gradient average then equals
            # the single-process gradient of the whole batch.
            ce_sum = F.cross_entropy(scaled, yb, reduction="sum")
            loss = ce_sum / len(yb)
            objective = ce_sum * (d.world / batch)
        else:
            loss = objective = F.cross_entropy(scaled, yb)
        if self.l2_params:
            penalty = self.l2 * sum(p.pow(2).sum() for p in self.l2_params)
            loss, objective = loss + penalty, objective + penalty
        self.opt.zero_grad(set_to_none=True)
        (objective * batch if cfg.loss_scale == "sum" else objective).backward()
        self.opt.step()
        self.loss_acc += loss.detach().double() * len(yb)
        self.correct_acc += (logits.detach().argmax(1) == yb).sum()

    def after_step(self, epoch: int) -> None:
        """Step evaluation, fault point, running totals, the stop agreement and step checkpoints."""
        cfg, st, steps = self.cfg, self.state, len(self.loaders.train)
        if cfg.eval_steps and st.step % cfg.eval_steps == 0 and self.pos < steps:
            t0 = time.perf_counter()
            self.evaluate_step(epoch)
            self.deadline.record(time.perf_counter() - t0)  # (work between two deadline checks, like a checkpoint)
        inject_fault(f"step:{st.step}", self.model)
        self.bar.update(1)
        flush = self.pos % FLUSH_EVERY == 0 or self.pos == steps
        if flush:
            self.flush()
        # Ranks agree to stop only at flush points, so that they stop at the same step.
        ahead = (self.pos == steps) + (self.pos == steps and st.epoch + 1 == cfg.epochs)  # epoch end, run end
        late = self.stop.signal is not None or self.deadline.reached(ahead)
        stopping = (flush and self.d.any(late)) if self.d.enabled else late
        # (a step checkpoint on an epoch's last batch is left to the epoch-end one)
        if stopping or (cfg.checkpoint_steps and st.step % cfg.checkpoint_steps == 0 and self.pos < steps):
            st.epoch_time += time.perf_counter() - self.start
            self.start = time.perf_counter()
            self.save_checkpoint()
        if stopping:
            self.bar.close()
            again = f"checkpoint saved. Continue with: laperm train --resume {self.run_dir}"
            if self.stop.signal is None and self.deadline.stop_at is not None:
                raise DeadlineReached(
                    f"stopped before the deadline (stop_at {self.deadline.stop_at:.0f}) at step {st.step}; {again}"
                )
            raise TrainingInterrupted(f"stopped by {self.stop.describe()} at step {st.step}; {again}")

    def evaluate_step(self, epoch: int) -> None:
        """An evaluation every ``eval_steps`` steps (the reference evaluates right after each sync)."""
        st = self.state
        record: dict[str, Any] = {"step": st.step, "epoch": round(epoch + self.pos / len(self.loaders.train), 4)}
        with self.evaluator.evaluated(record, st):
            pass
        st.step_evals.append(record)
        if self.main:
            rundir.MetricsLog.write(self.run_dir / rundir.EVALS, st.step_evals)

    def flush(self) -> None:
        """One host sync every FLUSH_EVERY steps: running totals, the NaN check and the progress bar."""
        st = self.state
        loss_total, correct_total = self.d.all_sum(float(self.loss_acc), float(self.correct_acc))
        st.loss_sum += loss_total
        st.correct += int(correct_total)
        self.loss_acc.zero_()
        self.correct_acc.zero_()
        cur_loss = st.loss_sum / max(st.seen, 1)
        if not math.isfinite(cur_loss):
            raise self._numerical(f"the training loss became {cur_loss}", st.step)
        post: dict[str, Any] = {"loss": f"{cur_loss:.4f}", "acc": f"{st.correct / max(st.seen, 1):.2%}"}
        if self.laperm:
            post["sync in"] = self.laperm.steps_to_next_sync()
        el = st.epoch_time + time.perf_counter() - self.start
        post["img/s"] = f"{st.seen / max(el, 1e-9):,.0f}"
        self.bar.set_postfix(post, refresh=False)

    def end_epoch(self) -> None:
        """The epoch's record, its evaluation at synced weights, the metrics line and its checkpoint."""
        cfg, st = self.cfg, self.state
        record = report.epoch_record(st, float(self.opt.param_groups[0]["lr"]))  # (a CUDA graph keeps lr in a tensor)
        if self.laperm:
            record["k"] = self.laperm.param_groups[0]["k"]
        if st.epoch % cfg.eval_every == 0 or st.epoch == cfg.epochs:
            with self.evaluator.evaluated(record, st):
                self.evaluator.measure_reconnected(record)
                if self.main:
                    self.callbacks.on_epoch(record, self.model, self.opt)
            self.log(report.epoch_line(record, cfg.epochs))
        self.metrics.append(record)
        checkpoint.fault_point(f"epoch-end:{st.epoch}")
        st.start_epoch_totals()
        if (
            st.epoch % cfg.checkpoint_every == 0
            or st.epoch == cfg.epochs
            or (cfg.checkpoint_steps and st.step % cfg.checkpoint_steps == 0)
        ):
            self.save_checkpoint()

    # -- the end --------------------------------------------------------------------------

    def final_sync(self) -> None:
        """A permanent sync, BN statistics for the synced weights; no NaN may reach final.pt."""
        if self.laperm:
            try:
                self.laperm.sync()  # runs the SyncChecker hook too
            except InvariantError:
                raise
            except LaPermError:  # it refuses NaN weights
                raise self._numerical("the weights became NaN or inf", self.state.step) from None
            self.d.broadcast_buffers(self.model)
            recalibrate_bn(self.model, self.loaders.calib, self.cfg.bn_recalibrate)
        bad = first_nonfinite(self.model)
        if bad is not None:
            raise self._numerical(f"{bad} became NaN or inf", self.state.step)

    def finish(self) -> dict[str, Any]:
        """final.pt, the final evaluation, verification and summary.json (rank 0 writes)."""
        if self.main:
            checkpoint.save(
                {"model": self.model.state_dict(), "epoch": self.state.epoch, "synced": True},
                self.run_dir / rundir.FINAL,
            )
        val = self.loaders.val
        val_loss, final_val = evaluate(self.model, val, self.d) if val is not None else (None, None)
        test_loss, final_test = evaluate(self.model, self.loaders.test, self.d)
        summary = report.build_summary(self, final_test, final_val)
        if isinstance(self.ds, TextCorpus):
            summary.update(text_summary(self.model, self.ds.vocab, self.cfg.seed, val_loss, test_loss, self.log))
        if self.main:
            report.write_outputs(self, summary)
        return summary
