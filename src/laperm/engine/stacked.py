"""Stacked training: N runs of one configuration (seeds, LaPerm and baseline) trained as one model.

Each member is a :class:`~laperm.engine.trainer.Trainer` of its own config: its own run folder,
seeded θ0, loaders (data order, augmentation), random stream (dropout), evaluator, BatchNorm
statistics, metrics, checkpoints and summary -- everything a single run has. Only the training
step is shared: the members' parameters are views of stacked tensors (:class:`StackedModel`),
one forward/backward computes every member's gradients, one inner optimizer over the stacked
tensors is N inner optimizers (elementwise) -- :class:`~laperm.engine.stack_step.StackStep`, eager
or (fast mode on CUDA) one CUDA graph -- and each LaPerm member then syncs its own rows
(``LaPerm.after_inner_step``: the count and the sync; on CUDA all members' due syncs as one,
``LaPerm.sync_together``). Baseline
members have no sync. A member whose loss or weights become NaN stops alone (its rows are
frozen); the others go on. In fast mode each member's training batches come from its own
device-resident loader (``engine.fast.device_loaders``), as in its single fast run.

A member's checkpoint holds its slice of the stacked optimizer state and the stack's random
stream (``Key.STACK``); ``stack.json`` in every member folder names the members, so resuming any
member resumes the stack (from the newest checkpoint step all running members have).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from .. import checkpoint, rundir
from ..config import TrainConfig, k_for_epoch
from ..data.loader import derive_seed
from ..fast.graph import DeviceFault
from ..fast.step import make_adam
from ..models.stacked import LossSpec, StackedModel
from ..optim import LaPerm, LaPermError
from . import checkpointing as ckpt
from . import fast
from .errors import NumericalError, TrainingInterrupted, device_unusable
from .guards import StopFlag
from .stack_step import StackStep
from .trainer import Trainer

__all__ = ["Member", "StackTrainer", "RngStream", "STACK_FILE", "STACK_KEY"]

STACK_FILE = "stack.json"  # in every member's run folder: the stack's members and those that stopped
STACK_KEY = "stack"  # a member checkpoint's share of the stack
STACK_FORMAT = "laperm-stack/1"
STACK_SEED = 9  # derive_seed(first member's seed, STACK_SEED): the stack's own random stream (vmap's dropout)
# The LaPerm members' syncs as one flat sync (LaPerm.sync_together); None: on CUDA, where LaPerm's own sync is
# the flat one too (on CPU each member's per-tensor kernel is faster). A test sets True to run it on CPU.
SYNC_TOGETHER: bool | None = None


class RngStream:
    """One random stream of the global generator (CPU, and CUDA on a GPU), swapped in while active."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state = ckpt.rng_state(device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        ckpt.restore_rng(self.state, self.device, 0, 1, False)
        try:
            yield
        finally:
            self.state = ckpt.rng_state(self.device)


class Member(Trainer):
    """A run trained inside a stack: a Trainer whose step is computed by the :class:`StackTrainer`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.saved_stack: dict[str, Any] | None = None
        self.stack: StackTrainer | None = None
        self.index = 0
        self.sync_failed = False  # the stack's sync found this member's weights NaN or inf
        super().__init__(*args, **kwargs)
        self.rng = RngStream(self.device)  # its own stream as a single run would have it now

    def _restore(self, saved: dict[str, Any]) -> None:
        self.saved_stack = saved.get(STACK_KEY)
        if self.saved_stack is None:
            raise checkpoint.CheckpointError(f"{self.last_saved} was not written by a stacked run")
        super()._restore(saved)

    def checkpoint_extras(self) -> dict[str, Any]:
        assert self.stack is not None
        return {STACK_KEY: self.stack.member_share(self.index)}

    def _step_strategy(self) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
        return self._stacked_update  # (in both modes: the stack computes the step, StackStep)

    def _stacked_update(self, xb: torch.Tensor, yb: torch.Tensor, batch: int) -> None:
        """The stack has stepped the inner optimizer and added to this member's totals: LaPerm's count and sync."""
        if self.laperm is None:
            return
        assert self.stack is not None
        if self.stack.sync_together:  # the stack has counted this step and synced (StackTrainer._sync_members)
            if self.sync_failed:
                raise LaPermError("a permuted weight holds NaN or inf at a synchronisation")  # (reported by train_step)
            return
        self.laperm.after_inner_step()  # LaPerm's own work: host-side step count, a sync when one is due

    def begin_epoch(self) -> None:
        """Trainer.run_epoch's start, for this member."""
        cfg, st, loader = self.cfg, self.state, self.loaders.train
        if self.laperm:
            for g in self.laperm.param_groups:
                g["k"] = k_for_epoch(cfg, st.epoch)
        loader.set_epoch(st.epoch)
        self.pos = loader.state_dict()["batch"]
        self.start = time.perf_counter()
        self.bar = tqdm(disable=True)

    def close_epoch(self) -> None:
        """Trainer.run_epoch's end, for this member: timing, lr schedule, the epoch's record and checkpoint."""
        st = self.state
        self.bar.close()
        st.epoch_time += time.perf_counter() - self.start
        st.elapsed += st.epoch_time
        with warnings.catch_warnings():  # a baseline member's own optimizer never steps (the stack's does)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.sched.step()
        st.epoch += 1
        self.end_epoch()


def inner_optimizer(cfg: TrainConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The inner optimizer over the stacked tensors: the single run's, with its options (elementwise: N of them);
    in fast mode on CUDA Adam fused and capturable, as build.build_optimizer makes a single fast run's."""
    kind = cfg.inner if cfg.optimizer == "laperm" else cfg.optimizer
    if kind in ("adam", "adamw"):
        device = params[0].device if cfg.mode == "fast" else torch.device("cpu")  # (cpu: torch's default Adam)
        return make_adam(params, lr=cfg.lr, eps=cfg.adam_eps, device=device, weight_decay_free=kind)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def loss_spec(member: Member) -> LossSpec:
    names = {id(p): n for n, p in member.model.named_parameters()}
    cfg = member.cfg
    return LossSpec(
        l2=member.l2,
        l2_names=tuple(names[id(p)] for p in member.l2_params),
        logit_scale=cfg.logit_scale,
        sum_scale=cfg.loss_scale == "sum",
        precision=cfg.precision,
        foreach_l2=cfg.mode == "fast",
    )


class StackTrainer:
    """Trains the members in lockstep: one stacked step, then each member's own bookkeeping."""

    def __init__(self, members: list[Member], vectorize: bool, log: Callable[[str], None]) -> None:
        self.members, self.vectorize, self.log = members, vectorize, log
        self.device = members[0].device
        cfg = members[0].cfg
        self.model = StackedModel([m.model for m in members], channels_last=cfg.channels_last)
        self.opt = inner_optimizer(cfg, self.model.parameters())
        self.stopped: dict[int, str] = {}
        self.sync_together = SYNC_TOGETHER if SYNC_TOGETHER is not None else self.device.type == "cuda"
        saved = [m.saved_stack for m in members]
        if saved[0] is not None:
            self._restore(cast(list[dict[str, Any]], saved))
        else:
            torch.manual_seed(derive_seed(cfg.seed, STACK_SEED))
            self.rng = RngStream(self.device)
        # the members' running totals become views of the stack's: the step adds to all at once
        totals = (torch.stack([m.loss_acc for m in members]), torch.stack([m.correct_acc for m in members]))
        for i, m in enumerate(members):
            m.stack, m.index = self, i
            m.loss_acc, m.correct_acc = totals[0][i], totals[1][i]
        self.update = self._step(cfg, totals)  # (after the restore: a graph captures the loaded state)

    def _step(self, cfg: TrainConfig, totals: tuple[torch.Tensor, torch.Tensor]) -> StackStep:
        """Fast mode captures the vectorised step in a CUDA graph where the inner step can be captured."""
        factory = fast.GRAPH_FACTORY
        capturable = all(g.get("capturable", False) for g in self.opt.param_groups)
        graph = (
            cfg.mode == "fast"
            and self.vectorize
            and (factory is not None or (self.device.type == "cuda" and capturable))
        )
        return StackStep(
            self.model,
            self.opt,
            loss_spec(self.members[0]),
            totals,
            vectorize=self.vectorize,
            around=self._member_stream,
            graph=graph,
            graph_factory=factory,
        )

    # -- the stack's checkpoint share -------------------------------------------------

    def member_share(self, i: int) -> dict[str, Any]:
        """Member ``i``'s slice of the stacked optimizer state, and the stack's random stream."""
        inner: dict[str, dict[str, Any]] = {}
        for n, p in self.model.params.items():
            state = self.opt.state.get(p, {})
            inner[n] = {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()}
        return {
            "format": STACK_FORMAT,
            "index": i,
            "members": [m.run_dir.name for m in self.members],
            "inner": inner,
            "rng": self.rng.state,
        }

    def _restore(self, saved: list[dict[str, Any]]) -> None:
        for n, p in self.model.params.items():
            shares = [s["inner"][n] for s in saved]
            if not shares[0]:
                continue
            self.opt.state[p] = {k: self._restored(k, v, [s[k] for s in shares]) for k, v in shares[0].items()}
        self.rng = RngStream(self.device)
        self.rng.state = saved[0]["rng"]

    def _restored(self, key: str, first: Any, shares: list[Any]) -> Any:
        """One optimizer state entry of the stack from the members' shares; a fused or capturable Adam keeps
        its step count on the device, torch's default one on the CPU (as ``Optimizer.load_state_dict``)."""
        if torch.is_tensor(first) and first.dim() > 0:
            return torch.stack(shares).to(self.device)
        if torch.is_tensor(first) and key == "step":
            group = self.opt.param_groups[0]
            on_device = group.get("fused") or group.get("capturable")
            return first.to(self.device if on_device else "cpu", torch.float32)
        return first

    # -- the loop ---------------------------------------------------------------------

    def alive(self) -> list[Member]:
        return [m for m in self.members if m.index not in self.stopped]

    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs of every member, end each with its final sync; their summaries."""
        first = self.members[0]
        how = "vectorised (torch.func.vmap)" if self.vectorize else "member by member"
        self.log(f"stack of {len(self.members)} runs, {how}, device {self.device}:")
        for m in self.members:
            m.log(f"  {m.run_dir.name} ({m.cfg.optimizer}, seed {m.cfg.seed})")
            m.model.train()
        with StopFlag() as flag:
            for m in self.members:
                m.stop = flag
            while self.alive() and self.alive()[0].state.epoch < first.cfg.epochs:
                self.run_epoch()
        return [s for m in self.alive() if (s := self._guarded(m, self._finish)) is not None]

    @staticmethod
    def _finish(m: Member) -> dict[str, Any]:
        m.final_sync()
        return m.finish()

    def _guarded(self, m: Member, work: Callable[[Member], Any]) -> Any:
        """``work(m)`` in member ``m``'s random stream; a numerical fault stops that member alone."""
        try:
            with m.rng.active():
                return work(m)
        except NumericalError as e:
            self.stop_member(m, str(e))
            return None

    def stop_member(self, m: Member, reason: str) -> None:
        self.stopped[m.index] = reason
        self.log(f"{m.run_dir.name} stopped: {reason}")
        self.log(f"the other {len(self.alive())} member(s) go on")
        write_stack_file([x.run_dir for x in self.members], self.stopped_names())

    def stopped_names(self) -> dict[str, str]:
        return {self.members[i].run_dir.name: r for i, r in self.stopped.items()}

    def run_epoch(self) -> None:
        members = self.alive()
        for m in members:
            m.begin_epoch()
        lr = members[0].opt.param_groups[0]["lr"]
        for g in self.opt.param_groups:
            g["lr"] = lr  # the members' schedules are equal; the stacked optimizer follows them
        steps = len(members[0].loaders.train) - members[0].pos
        batches = zip(*(m.loaders.train for m in members), strict=True)
        cfg = members[0].cfg
        bar = tqdm(total=steps, desc=f"epoch {members[0].state.epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=None if cfg.progress else True, dynamic_ncols=True)  # fmt: skip
        interrupted: list[str] = []
        for pairs in batches:
            self.step(members, pairs, interrupted)
            bar.update(1)
            if interrupted:
                bar.close()
                raise TrainingInterrupted(interrupted[0])
        bar.close()
        for m in self.alive():
            self._guarded(m, Member.close_epoch)

    def step(self, members: list[Member], pairs: tuple[Any, ...], interrupted: list[str]) -> None:
        """One stacked step: every member's batch, the shared forward/backward and inner step, then each
        member's own step bookkeeping (its sync, totals, evaluations, checkpoints)."""
        first_x, first_y = pairs[0]
        by_index = {m.index: p for m, p in zip(members, pairs, strict=True)}
        xs = [by_index.get(i, (first_x, first_y)) for i in range(len(self.members))]  # stopped: any batch
        x, y = self.model.stack_inputs([p[0] for p in xs]), torch.stack([p[1] for p in xs])
        epoch = members[0].state.epoch
        # vmap draws every member's dropout from the stack's stream; the loop from each member's own
        with (
            self.rng.active() if self.vectorize else contextlib.nullcontext(),
            self.model.frozen_rows(sorted(self.stopped)),
        ):
            try:
                self.update(x, y)
            except DeviceFault as e:  # every member stops at its last checkpoint; resuming any resumes the stack
                first = members[0]
                raise device_unusable(e, first.state.step + 1, first.run_dir, first.last_saved) from e
        if self.sync_together:
            self._sync_members(members)
        for m, (xb, yb) in zip(members, pairs, strict=True):
            if m.index in self.stopped:
                continue
            try:
                self._guarded(m, functools.partial(_member_step, xb=xb, yb=yb, epoch=epoch))
            except TrainingInterrupted as e:  # every member saves its checkpoint before the stack stops
                interrupted.append(str(e))

    def _sync_members(self, members: list[Member]) -> None:
        """Every running LaPerm member's step count and due sync, as one sync (LaPerm.sync_together)."""
        synced = [m for m in members if m.laperm is not None and m.index not in self.stopped]
        for m in synced:
            if m.checker is not None:
                m.checker.step = m.state.step + 1  # (the step train_step is about to count: the hook's message)
        for k in LaPerm.sync_together([cast(LaPerm, m.laperm) for m in synced]):
            synced[k].sync_failed = True

    def _member_stream(self, i: int) -> contextlib.AbstractContextManager[None]:
        return self.members[i].rng.active()


def _member_step(m: Member, xb: torch.Tensor, yb: torch.Tensor, epoch: int) -> None:
    m.train_step(xb, yb)
    m.after_step(epoch)


# -- the stack's record in each member folder ----------------------------------------------


def write_stack_file(run_dirs: list[Path], stopped: dict[str, str]) -> None:
    body = {"format": STACK_FORMAT, "members": [d.name for d in run_dirs], "stopped": stopped}
    for d in run_dirs:
        checkpoint.atomic_write_text(d / STACK_FILE, json.dumps(body, indent=2) + "\n")


def read_stack_file(run_dir: Path) -> dict[str, Any] | None:
    """``stack.json`` of a member folder (None: the folder is a single run's)."""
    path = run_dir / STACK_FILE
    if not path.exists():
        return None
    body = rundir.read_json(path)
    if not isinstance(body, dict) or body.get("format") != STACK_FORMAT or not isinstance(body.get("members"), list):
        raise rundir.RunDirError(f"{path} is damaged; restore it, or resume each member folder's stack by hand")
    return body
