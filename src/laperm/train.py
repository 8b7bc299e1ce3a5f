"""The training engine: one :class:`TrainConfig` in, one run folder out.

Rules we keep (SPEC §2, §6): evaluation, model selection and saving happen
only at *synced* states (a temporary sync that leaves the training trajectory
untouched), training always ends with a final sync, the model is selected on a
validation split carved from the training set, and the test accuracy of the
selected and of the final model are both reported (best-test is labelled as
such, for comparison with the paper's protocol).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint, distributed, init as winit, models, reconnect, rundir
from .config import RESUME_CHANGEABLE, ConfigError, TrainConfig, k_for_epoch, lr_factor, parse_init
from .data import BatchLoader, Dataset, load_dataset, make_augment, random_subset, train_val_split
from .data import text as textdata
from .data.loader import derive_seed
from .optim import LaPerm, LaPermError, laperm_param_groups

__all__ = ["train", "TrainingInterrupted", "NumericalError", "InvariantError", "resolve_device", "evaluate"]

CKPT_FORMAT = "laperm-train/1"


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was saved."""


class NumericalError(RuntimeError):
    """The loss or the weights became NaN/inf."""


class InvariantError(LaPermError):
    """A permuted row is no longer a permutation of its θ0 row (a bug or memory corruption)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {name!r} not understood; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# -- building blocks ----------------------------------------------------------------


def load_data(cfg: TrainConfig, spec: models.ModelSpec) -> Dataset | textdata.TextCorpus:
    name = cfg.dataset or spec.dataset
    if (name in textdata.TEXT_DATASETS) != (spec.dataset in textdata.TEXT_DATASETS):
        raise ConfigError(f"model {spec.name} is for {spec.dataset} data, not {name}; pick a matching "
                          "--model or --dataset (char-gpt for --dataset text)")
    if name in textdata.TEXT_DATASETS:
        corpus = textdata.load_text_corpus(cfg.data_dir)
        textdata.check_length(corpus, spec.input_shape[-1])
        return corpus
    ds = load_dataset(name, cfg.data_dir)
    if tuple(ds.input_shape) != tuple(spec.input_shape):
        raise ConfigError(
            f"model {spec.name} expects {spec.dataset} images of shape "
            f"{'x'.join(map(str, spec.input_shape))}, but dataset {name} has "
            f"{'x'.join(map(str, ds.input_shape))}; pick a matching --model or --dataset"
        )
    if ds.num_classes != spec.num_classes:
        raise ConfigError(f"model {spec.name} has {spec.num_classes} outputs but {name} has {ds.num_classes} classes")
    return ds


def build_model(cfg: TrainConfig, device: torch.device,
                **model_options: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The Keras-initialised model with the configured init applied; returns (model, masks).

    ``model_options`` go to the model class (a text model's ``vocab_size``)."""
    model = models.build(cfg.model, seed=derive_seed(cfg.seed, 1), **model_options)
    spec = parse_init(cfg.init)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, 2))
    masks: dict[str, torch.Tensor] = {}
    if spec.kind == "pruned" and spec.pruned > 0:
        masks = winit.random_prune_(model, spec.pruned, generator=g).masks
    elif spec.kind == "shared":
        keep = spec.keep[0] if len(spec.keep) == 1 else list(spec.keep)
        try:
            masks = winit.shared_value_(model, spec.value, keep, generator=g).masks
        except ValueError as e:
            raise ConfigError(f"init {cfg.init!r}: {e}") from None
    return model.to(device), {k: v.to(device) for k, v in masks.items()}


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    spec = models.get_spec(cfg.model)
    permute_biases = spec.permute_biases if cfg.permute_biases is None else cfg.permute_biases
    groups = laperm_param_groups(model, permute_biases=permute_biases)
    kind = cfg.inner if cfg.optimizer == "laperm" else cfg.optimizer
    if kind == "adam":
        inner = torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.adam_eps)
    elif kind == "adamw":
        inner = torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.adam_eps)
    else:
        inner = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer != "laperm":
        return inner
    return LaPerm(inner, k=k_for_epoch(cfg, 0), granularity=cfg.granularity, sync_rule=cfg.sync_rule)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
             d: distributed.Dist = distributed.Dist()) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over ``loader``.

    In a distributed run each rank evaluates its shard of every batch and the
    sums are added up across ranks.
    """
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


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: BatchLoader, batches: int) -> None:
    """Recompute BatchNorm running statistics for the current (synced) weights."""
    bns = _bn_modules(model)
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
    for m, mom in zip(bns, momenta):
        m.momentum = mom


@contextlib.contextmanager
def synced_state(opt: torch.optim.Optimizer, model: nn.Module, calib: BatchLoader | None, batches: int) -> Iterator[None]:
    """Weights synced (and BN recalibrated) inside; training state restored on exit."""
    if not isinstance(opt, LaPerm):
        yield
        return
    buffers = [(b, b.clone()) for m in _bn_modules(model) for b in m.buffers()] if batches else []
    with opt.synced_weights():
        if calib is not None and batches:
            recalibrate_bn(model, calib, batches)
        try:
            yield
        finally:
            for b, saved in buffers:
                b.copy_(saved)


# -- the run ---------------------------------------------------------------------------


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    # accumulators of the epoch in progress (for mid-epoch checkpoints)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    epoch_time: float = 0.0
    elapsed: float = 0.0
    changes: list[dict[str, Any]] = field(default_factory=list)  # settings changed on resume
    step_evals: list[dict[str, Any]] = field(default_factory=list)  # evaluations every eval_steps steps


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps.

    The first signal only sets the flag (the step in flight finishes and a
    checkpoint is saved); it also restores the previous handlers, so a second
    Ctrl-C or SIGTERM stops the process at once (files stay consistent: every
    write is atomic).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        self._restore()

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc: Any) -> None:
        self._restore()


# -- invariants and numerical faults --------------------------------------------------


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _row_fingerprint(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of its values' bit patterns read as integers (int64).

    Integer addition does not depend on the order of the elements, so a
    permuted row keeps its fingerprint exactly, while changing any value
    (even by one ulp, or 0.0 to -0.0) changes it unless another change
    cancels it exactly.  One O(n) pass, cheaper than the sync it checks.
    """
    bits = rows.contiguous().view(_INT_VIEW[rows.element_size()])
    if bits.device.type == "cpu":
        # numpy accumulates the narrow integers in int64 without a widened copy (several times faster)
        return torch.from_numpy(np.add.reduce(bits.numpy(), axis=1, dtype=np.int64))
    return bits.sum(1, dtype=torch.int64)


class SyncChecker:
    """The cheap invariant, checked right after every sync: each permuted row holds its θ0 values.

    Registered as a LaPerm sync hook, so it sees every scheduled sync and the
    final one.  (The full check, sorting every row against init.pt, runs at
    the end of training.)  ``step`` is set by the engine, for the message.
    """

    def __init__(self, opt: LaPerm) -> None:
        self.step = 0
        self.expected = {p: _row_fingerprint(opt.initial_sorted(p)) for p in opt.state}
        opt.register_sync_hook(self)

    def __call__(self, opt: LaPerm, params: list[torch.Tensor]) -> None:
        for p in params:
            st = opt.state[p]
            got = _row_fingerprint(reconnect.to_rows(p.detach(), st["layout"]))
            if not torch.equal(got, self.expected[p]):
                row = int((got != self.expected[p]).nonzero()[0, 0])
                raise InvariantError(
                    f"after the sync at step {self.step}, row {row} of {st['name']} is no longer a permutation "
                    "of its initial values (LaPerm's invariant is broken); the run is stopped and its "
                    "checkpoints are left as they were"
                )


def _first_nonfinite(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> str | None:
    """Name of the first model or optimizer-state tensor holding NaN/inf, else None (one pass, O(n))."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"weight {name}"
    inner = getattr(opt, "base_optimizer", opt)
    for st in (inner.state.values() if inner is not None else ()):
        for key, t in st.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"optimizer state {key!r}"
    for p, z in (opt.latent_weights().items() if isinstance(opt, LaPerm) else ()):
        if not bool(torch.isfinite(z).all()):
            return f"latent weights of {opt.state[p]['name']}"
    return None


def _numerical_error(what: str, step: int, run_dir: Path, last: Path | None, lr: float) -> NumericalError:
    kept = f"the last good checkpoint, {last.name}, is kept" if last else "no checkpoint had been saved yet"
    return NumericalError(
        f"{what} at step {step}; nothing from that point on was saved and {kept}. "
        f"Continue with a lower learning rate: laperm train --resume {run_dir} --lr {lr / 10:g}"
    )


# -- the run ---------------------------------------------------------------------------

CKPT_KEYS = ("format", "config", "model", "optimizer", "scheduler", "loader", "rng", "run")


class Callbacks:
    """Optional hooks into a run of :func:`train`: subclass and override what you need.

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


class _EpochCallback(Callbacks):
    def __init__(self, fn: Callable[[dict[str, Any], nn.Module, torch.optim.Optimizer], None]) -> None:
        self.on_epoch = fn  # type: ignore[method-assign]


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict[str, Any], nn.Module, torch.optim.Optimizer], None] | None = None,
    callbacks: Callbacks | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing the run folder; returns the summary dict.

    ``callbacks`` (see :class:`Callbacks`) let analyses ride along; ``on_epoch`` is a
    shorthand for a ``Callbacks`` with only that method.

    With ``resume``, the run folder ``cfg.out / cfg.run_name()`` continues from
    its newest good checkpoint; ``cfg`` must equal the saved config except for
    :data:`~laperm.config.RESUME_CHANGEABLE` fields (a lower ``lr``, more
    ``epochs``, where and how to run).  Everything that can be checked without
    writing (config, device, model, data) is checked before the run folder is
    created, so bad input leaves no half-made folder behind.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    d, device = distributed.setup(device)
    if d.enabled and cfg.nproc != d.world:
        cfg = dataclasses.replace(cfg, nproc=d.world).validate()  # e.g. launched by torchrun directly
    try:
        if on_epoch is not None:
            if callbacks is not None:
                raise TypeError("pass on_epoch or callbacks, not both")
            callbacks = _EpochCallback(on_epoch)
        return _train(cfg, d, device, resume, overwrite, log, callbacks or Callbacks())
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, d: distributed.Dist, device: torch.device, resume: bool, overwrite: bool,
           log: Callable[[str], None], callbacks: Callbacks) -> dict[str, Any]:
    if not d.is_main:
        log = _quiet  # rank 0 speaks for the job
    run_dir = Path(cfg.out) / cfg.run_name()
    if d.is_main:  # (other ranks might see the folder rank 0 has just made)
        rundir.check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        cfg = _resume_config(cfg, rundir.read_run_config(run_dir), run_dir)
    spec = models.get_spec(cfg.model)
    ds = load_data(cfg, spec)
    if isinstance(ds, Dataset) and cfg.val_size >= len(ds.train_y):
        raise ConfigError(f"val_size {cfg.val_size} leaves no training data ({len(ds.train_y)} images); lower --val-size")
    try:
        augment = make_augment(cfg.augment)
    except ValueError as e:
        raise ConfigError(f"augment: {e}") from None
    if d.is_main:
        run_dir = rundir.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    d.barrier()  # the folder exists (and damaged files are set aside) before other ranks look
    with rundir.locked(run_dir) if d.is_main else contextlib.nullcontext():
        try:
            return _run(cfg, run_dir, resume, device, spec, ds, augment, log, callbacks, d)
        except OSError as e:
            # Every write is atomic, so what is on disk is the last complete version of each file.
            where = f" {e.filename}" if e.filename else ""
            raise rundir.RunDirError(
                f"cannot write{where} ({e.strerror or e}); the files already in {run_dir} are intact. "
                f"Free some space or fix the permissions, then continue with: laperm train --resume {run_dir}"
            ) from None


def _resume_config(cfg: TrainConfig, saved: dict[str, Any], run_dir: Path) -> TrainConfig:
    """``cfg``, after checking it changes only what a resumed run may change."""
    try:
        old = TrainConfig(**saved).validate().to_dict()
    except (TypeError, ConfigError) as e:
        raise rundir.RunDirError(f"{run_dir / rundir.MARKER} is damaged ({e}); restore it or start a new run") from None
    new = cfg.to_dict()
    changed = [f for f in new if new[f] != old[f] and f not in RESUME_CHANGEABLE]
    if changed:
        what = ", ".join(f"{f} ({old[f]!r} -> {new[f]!r})" for f in changed)
        raise ConfigError(f"cannot change {what} when resuming {run_dir}; only "
                          f"{', '.join(sorted(RESUME_CHANGEABLE))} may change. Start a new run instead")
    return cfg


def _theta0_mismatch(init_state: dict[str, torch.Tensor], opt: LaPerm) -> str | None:
    """Name of the first permuted tensor whose θ0 in ``init_state`` differs from ``opt``'s, else None."""
    for p, st in opt.state.items():
        t = init_state.get(st["name"])
        if t is None or not torch.equal(reconnect.sorted_rows(t.to(p.device), st["layout"]), opt.initial_sorted(p)):
            return st["name"]
    return None


def _run(cfg: TrainConfig, run_dir: Path, resume: bool, device: torch.device, spec: models.ModelSpec,
         ds: Dataset | textdata.TextCorpus, augment: Any, log: Callable[[str], None],
         callbacks: Callbacks,
         d: distributed.Dist = distributed.Dist()) -> dict[str, Any]:
    ckpt_dir = run_dir / "checkpoints"
    main = d.is_main  # only rank 0 writes files
    saved, last_saved = None, None
    if resume and not main:
        d.barrier()  # rank 0 first sets damaged checkpoints aside
        found = checkpoint.latest_good(ckpt_dir, warn=log)
        if found is not None:
            last_saved, saved = found
    elif resume:
        ckpts = checkpoint.list_checkpoints(ckpt_dir)
        found = checkpoint.latest_good(ckpt_dir, warn=log)
        # Damaged checkpoints newer than the one used are renamed, so they are never tried again.
        for path in ckpts[: ckpts.index(found[0]) if found else len(ckpts)]:
            log(f"set {path.name} aside as {checkpoint.set_aside(path).name}")
        if found is None:
            log(f"no usable checkpoint in {run_dir}; starting it from the beginning")
        else:
            last_saved, saved = found
            if not isinstance(saved, dict) or saved.get("format") != CKPT_FORMAT or not set(CKPT_KEYS) <= saved.keys():
                raise checkpoint.CheckpointError(f"{last_saved} is not a laperm training checkpoint")
        if cfg.to_dict() != rundir.read_run_config(run_dir):
            rundir.write_config(run_dir, cfg.to_dict())  # it now describes the rest of the run
        d.barrier()
    elif main:
        rundir.write_config(run_dir, cfg.to_dict())

    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    text = isinstance(ds, textdata.TextCorpus)
    model_options: dict[str, Any] = {}
    if isinstance(ds, textdata.TextCorpus):  # character windows, contiguous 90/5/5 splits, vocab.json
        loaders, sizes = _text_loaders(cfg, ds, spec, run_dir, device, d, resume)
        model_options["vocab_size"] = len(ds.vocab)
    else:
        loaders, sizes = _image_loaders(cfg, ds, augment, device, d)
    train_loader, calib_loader, val_loader, test_loader = loaders

    # Model, θ0, optimizer.
    torch.manual_seed(derive_seed(cfg.seed, 6))  # dropout and anything else on the global RNG
    model, masks = build_model(cfg, device, **model_options)
    opt = build_optimizer(cfg, model)
    callbacks.on_optimizer(opt, model)
    laperm = opt if isinstance(opt, LaPerm) else None
    l2 = spec.l2 if cfg.l2 is None else cfg.l2
    l2_params = model.l2_parameters() if l2 else []
    # Baselines on a pruned/shared init keep the pruned weights at zero (a fixed mask).
    fixed = [(p, masks[n]) for n, p in model.named_parameters() if n in masks] if laperm is None else []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg.lr_schedule, e))
    init_record = {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                   "permuted": rundir.layout_records(laperm) if laperm else [],
                   "optimizer": cfg.optimizer, "seed": cfg.seed, "model": cfg.model, "init": cfg.init}
    if saved is None and main:
        checkpoint.save(init_record, run_dir / "init.pt")
    # Data parallel: DDP averages gradients; the weights and the sync stay local and identical.
    forward = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if d.enabled else model)

    state = RunState()
    prev_synced: dict[str, torch.Tensor] | None = None  # for the "reconnected" metric
    best_state: dict[str, torch.Tensor] | None = None  # a copy of best.pt's weights, kept in checkpoints
    # Accumulators of the epoch in progress, flushed to `state` every 25 steps (not at
    # checkpoints: the float sums must group identically in a resumed run).
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    correct_acc = torch.zeros((), dtype=torch.int64, device=device)
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            train_loader.load_state_dict(saved["loader"])
            if saved.get("calib_loader"):
                calib_loader.load_state_dict(saved["calib_loader"])
            rng = saved["rng"]
            if d.enabled and "ranks" in rng:  # each rank continues its own random stream
                if len(rng["ranks"]) != d.world:
                    raise ValueError(f"the checkpoint was written by {len(rng['ranks'])} processes, not {d.world}")
                rng = rng["ranks"][d.rank]
            torch.set_rng_state(rng["torch"])
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], device)
            state = RunState(**saved["run"])
            prev_synced = saved.get("prev_synced")
            if prev_synced is not None:  # checkpoints load onto the CPU; this is compared with live weights
                prev_synced = {n: t.to(device) for n, t in prev_synced.items()}
            best_state = saved.get("best_model")
            loss_acc.fill_(saved.get("acc", (0.0, 0))[0])
            correct_acc.fill_(saved.get("acc", (0.0, 0))[1])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise checkpoint.CheckpointError(
                f"{last_saved} does not fit this run ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                "was config.yaml edited, or the checkpoint written by another version?"
            ) from None
        if cfg.epochs < state.epoch:
            raise ConfigError(f"the run has already done {state.epoch} epochs; --epochs must be at least that")
        if main:
            _reconcile_init(run_dir, init_record, laperm, log)
            _reconcile_best(run_dir, state, best_state, log)
        _apply_changes(cfg, saved["config"], state, opt, sched, log)
        pos = train_loader.state_dict()["batch"]
        log(f"resuming {run_dir} from {last_saved.name}: step {state.step}, epoch {state.epoch + 1} "
            f"at batch {pos}/{len(train_loader)}" if pos else
            f"resuming {run_dir} from {last_saved.name}: step {state.step}, {state.epoch} epochs done")
    metrics = rundir.MetricsLog(run_dir / "metrics.jsonl" if main else None, state.records)
    checker = SyncChecker(laperm) if laperm else None
    replicas = distributed.ReplicaCheck(d) if laperm and d.enabled and cfg.check_replicas else None
    if replicas is not None:
        laperm.register_sync_hook(replicas)

    def save_checkpoint() -> None:
        nonlocal last_saved
        # A NaN must never reach a checkpoint: check first (one O(n) pass).
        bad = _first_nonfinite(model, opt)
        if bad is None and not math.isfinite(state.loss_sum + float(loss_acc)):
            bad = "the training loss"
        if bad is not None:
            raise _numerical_error(f"{bad} became NaN or inf", state.step, run_dir, last_saved, cfg.lr)
        state.records = metrics.records
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        if d.enabled:
            rng = {"ranks": d.gather_objects(rng)}  # a collective: every rank gets here at the same step
        if not main:
            return
        payload = {
            "format": CKPT_FORMAT, "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "loader": train_loader.state_dict(), "calib_loader": calib_loader.state_dict(),
            "rng": rng,
            "run": vars(state).copy(),
            "acc": (float(loss_acc), int(correct_acc)),
            "prev_synced": prev_synced,
            "best_model": best_state,
        }
        path = checkpoint.checkpoint_path(ckpt_dir, state.step)
        checkpoint.save(payload, path)
        last_saved = path
        checkpoint.prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)

    @contextlib.contextmanager
    def evaluated(record: dict[str, Any]) -> Iterator[None]:
        """Evaluate the synced weights into ``record`` and keep the best on validation; the body
        runs in the same synced state."""
        nonlocal best_state
        if main:
            callbacks.before_evaluation(record, model, opt)
        d.broadcast_buffers(model)  # BatchNorm statistics of rank 0 for everyone
        with synced_state(opt, model, calib_loader, cfg.bn_recalibrate):
            if val_loader is not None:
                record["val_loss"], record["val_acc"] = evaluate(model, val_loader, d)
            record["test_loss"], record["test_acc"] = evaluate(model, test_loader, d)
            if text:  # a language model's loss in bits per character
                for split in ("val", "test"):
                    if f"{split}_loss" in record:
                        record[f"{split}_bpc"] = textdata.bits_per_char(record[f"{split}_loss"])
            if val_loader is not None and record["val_acc"] > state.best.get("val_acc", -1.0):
                digest = None
                if main:
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    digest = checkpoint.save({"model": best_state, "epoch": record["epoch"], "step": state.step,
                                              "synced": True}, run_dir / "best.pt")
                state.best = {"epoch": record["epoch"], "step": state.step, "val_acc": record["val_acc"],
                              "test_acc": record["test_acc"], "sha256": digest}
            yield

    steps_per_epoch = len(train_loader)
    log(f"{cfg.run_name()}: {cfg.model} on {ds.name} ({sizes}), {_describe_optimizer(cfg, opt)}, "
        f"{parse_init(cfg.init).describe()}, {cfg.epochs} epochs x {steps_per_epoch} steps, device {device}")
    model.train()
    with _StopFlag() as stop:
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            if laperm:
                for g in laperm.param_groups:
                    g["k"] = k_for_epoch(cfg, epoch)
            train_loader.set_epoch(epoch)
            pos = train_loader.state_dict()["batch"]  # > 0 when resuming mid-epoch
            start = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, initial=pos,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                       disable=None if cfg.progress and main else True, dynamic_ncols=True)
            for xb, yb in train_loader:
                batch = train_loader.global_batch_size(pos)  # all ranks' rows of this step
                logits = forward(xb)
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
                if l2_params:
                    penalty = l2 * sum(p.pow(2).sum() for p in l2_params)
                    loss, objective = loss + penalty, objective + penalty
                opt.zero_grad(set_to_none=True)
                (objective * batch if cfg.loss_scale == "sum" else objective).backward()
                if checker is not None:
                    checker.step = state.step + 1
                try:
                    opt.step()
                except LaPermError:  # LaPerm refuses to sync NaN weights: report it as the numerical fault it is
                    bad = _first_nonfinite(model)
                    if bad is None:
                        raise
                    raise _numerical_error(f"{bad} became NaN or inf", state.step + 1, run_dir, last_saved,
                                           cfg.lr) from None
                for p, m in fixed:
                    p.data.mul_(m)
                state.step += 1
                pos += 1
                if cfg.eval_steps and state.step % cfg.eval_steps == 0 and pos < steps_per_epoch:
                    # The reference evaluates every `vali_freq` steps (= k: right after each sync).
                    step_record: dict[str, Any] = {"step": state.step, "epoch": round(epoch + pos / steps_per_epoch, 4)}
                    with evaluated(step_record):
                        pass
                    state.step_evals.append(step_record)
                    if main:
                        rundir.MetricsLog.write(run_dir / "evals.jsonl", state.step_evals)
                if checkpoint.fault_point(f"step:{state.step}"):  # test hook; True: inject a NaN
                    next(model.parameters()).data.view(-1)[0] = float("nan")
                loss_acc += loss.detach().double() * len(yb)
                correct_acc += (logits.detach().argmax(1) == yb).sum()
                state.seen += batch
                bar.update(1)
                flush = pos % 25 == 0 or pos == steps_per_epoch
                if flush:
                    # One host sync every 25 steps for the display, not one per step.
                    loss_total, correct_total = d.all_sum(float(loss_acc), float(correct_acc))
                    state.loss_sum += loss_total
                    state.correct += int(correct_total)
                    loss_acc.zero_()
                    correct_acc.zero_()
                    cur_loss = state.loss_sum / max(state.seen, 1)
                    if not math.isfinite(cur_loss):
                        raise _numerical_error(f"the training loss became {cur_loss}", state.step, run_dir,
                                               last_saved, cfg.lr)
                    post = {"loss": f"{cur_loss:.4f}", "acc": f"{state.correct / max(state.seen, 1):.2%}"}
                    if laperm:
                        post["sync in"] = laperm.steps_to_next_sync()
                    el = state.epoch_time + time.perf_counter() - start
                    post["img/s"] = f"{state.seen / max(el, 1e-9):,.0f}"
                    bar.set_postfix(post, refresh=False)
                # Ranks agree to stop only at flush points, so that they stop at the same step.
                stopping = (flush and d.any(stop.signal is not None)) if d.enabled else stop.signal is not None
                if stopping or (
                        cfg.checkpoint_steps and state.step % cfg.checkpoint_steps == 0 and pos < steps_per_epoch):
                    # (a step checkpoint on an epoch's last batch is left to the epoch-end one)
                    state.epoch_time += time.perf_counter() - start
                    start = time.perf_counter()
                    save_checkpoint()
                if stopping:
                    bar.close()
                    by = signal.Signals(stop.signal).name if stop.signal is not None else "a signal to another rank"
                    raise TrainingInterrupted(
                        f"stopped by {by} at step {state.step}; "
                        f"checkpoint saved. Continue with: laperm train --resume {run_dir}"
                    )
            bar.close()
            state.epoch_time += time.perf_counter() - start
            state.elapsed += state.epoch_time
            sched.step()
            state.epoch += 1

            record: dict[str, Any] = {
                "epoch": state.epoch, "step": state.step, "lr": opt.param_groups[0]["lr"],
                "train_loss": state.loss_sum / max(state.seen, 1), "train_acc": state.correct / max(state.seen, 1),
                "epoch_time_s": round(state.epoch_time, 3),
                "images_per_s": round(state.seen / max(state.epoch_time, 1e-9), 1),
            }
            if laperm:
                record["k"] = laperm.param_groups[0]["k"]
            if state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs:
                with evaluated(record):
                    if laperm:
                        current = {n: p.detach().clone() for n, p in laperm.permuted_parameters()}
                        if prev_synced is not None:
                            moved = sum(int((current[n] != prev_synced[n]).sum()) for n in current)
                            record["reconnected"] = moved / sum(t.numel() for t in current.values())
                        prev_synced = current
                    if main:
                        callbacks.on_epoch(record, model, opt)
                log(_epoch_line(record, cfg.epochs))
            metrics.append(record)
            checkpoint.fault_point(f"epoch-end:{state.epoch}")
            state.loss_sum, state.correct, state.seen, state.epoch_time = 0.0, 0, 0, 0.0
            if (state.epoch % cfg.checkpoint_every == 0 or state.epoch == cfg.epochs
                    or (cfg.checkpoint_steps and state.step % cfg.checkpoint_steps == 0)):
                save_checkpoint()

    # The end: a permanent sync, BN statistics for the synced weights, final numbers.
    if laperm:
        try:
            laperm.sync()  # runs the SyncChecker hook too
        except InvariantError:
            raise
        except LaPermError:  # it refuses NaN weights
            raise _numerical_error("the weights became NaN or inf", state.step, run_dir, last_saved, cfg.lr) from None
        d.broadcast_buffers(model)
        recalibrate_bn(model, calib_loader, cfg.bn_recalibrate)
    bad = _first_nonfinite(model)
    if bad is not None:
        raise _numerical_error(f"{bad} became NaN or inf", state.step, run_dir, last_saved, cfg.lr)
    final = {"model": model.state_dict(), "epoch": state.epoch, "synced": True}
    if main:
        checkpoint.save(final, run_dir / "final.pt")
    final_val_loss, final_val = evaluate(model, val_loader, d) if val_loader is not None else (None, None)
    final_test_loss, final_test = evaluate(model, test_loader, d)
    summary = {
        "run": cfg.run_name(), "run_dir": str(run_dir), "model": cfg.model, "dataset": ds.name,
        "optimizer": cfg.optimizer, "init": cfg.init, "seed": cfg.seed, "epochs": cfg.epochs,
        "steps": state.step, "final_test_acc": final_test, "final_val_acc": final_val,
        "selected_epoch": state.best.get("epoch"), "selected_val_acc": state.best.get("val_acc"),
        "selected_test_acc": state.best.get("test_acc"),
        "best_test_acc": max([final_test, *(r["test_acc"] for r in [*metrics.records, *state.step_evals]
                                            if "test_acc" in r)]),  # the final model is evaluated too
        "evaluations": sum("test_acc" in r for r in [*metrics.records, *state.step_evals]),
        "train_time_s": round(state.elapsed, 1), "device": str(device), "hardware": _hardware(device),
        "torch": torch.__version__,
        "verified": None,
    }
    if state.changes:
        summary["changed_on_resume"] = state.changes
    if isinstance(ds, textdata.TextCorpus):  # losses in bits per character, a seeded sample of the final model
        summary["final_val_bpc"] = textdata.bits_per_char(final_val_loss) if final_val_loss is not None else None
        summary["final_test_bpc"] = textdata.bits_per_char(final_test_loss)
        summary["sample"] = textdata.sample_text(model, ds.vocab, textdata.SAMPLE_PROMPT, 200,
                                                 temperature=textdata.SAMPLE_TEMPERATURE, seed=cfg.seed)
        log(f"sample (temperature {textdata.SAMPLE_TEMPERATURE}, seed {cfg.seed}, final synced model): "
            f"{summary['sample']!r}")
    if d.enabled:
        summary["nproc"] = d.world
        summary["replica_checks"] = replicas.checks if replicas is not None else 0
    if not main:
        return summary
    if laperm:
        report = rundir.verify_run(run_dir)
        if not report.ok:
            raise InvariantError(report.message())
        summary["verified"] = report.message()
    checkpoint.atomic_write_text(run_dir / "summary.json", _json(summary))
    try:
        rundir.plot_curves(metrics.records, run_dir / "curves.png", cfg.run_name())
    except Exception as e:  # a plot must never cost the run
        log(f"warning: could not draw curves.png ({e})")
    return summary


def _image_loaders(cfg: TrainConfig, ds: Dataset, augment: Any, device: torch.device,
                   d: distributed.Dist) -> tuple[tuple, str]:
    """Loaders of an image dataset: validation split from the training set, optional subset."""
    n_train = len(ds.train_y)
    train_idx, val_idx = train_val_split(n_train, cfg.val_size, derive_seed(cfg.seed, 3))
    if cfg.train_subset:
        train_idx = random_subset(train_idx, cfg.train_subset, derive_seed(cfg.seed, 8))
    common = dict(mean=ds.mean, std=ds.std, device=device)
    shard = (d.rank, d.world)
    train_x, train_y, test_x, test_y = ds.train_x, ds.train_y, ds.test_x, ds.test_y
    if device.type == "cuda":
        # Keep the uint8 images on the GPU (CIFAR-10: 180 MB): batches are gathered there,
        # not copied from the host at every step.
        train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    train_loader = BatchLoader(train_x, train_y, cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, 4),
                               augment=augment, indices=train_idx, shard=shard, **common)
    calib_loader = BatchLoader(train_x, train_y, 256, shuffle=True, seed=derive_seed(cfg.seed, 5),
                               indices=train_idx, **common)
    eval_bs = 1000
    val_loader = (BatchLoader(train_x, train_y, eval_bs, shuffle=False, indices=val_idx, shard=shard, **common)
                  if len(val_idx) else None)
    test_loader = BatchLoader(test_x, test_y, eval_bs, shuffle=False, shard=shard, **common)
    sizes = f"{len(train_idx):,} train / {len(val_idx):,} val / {len(ds.test_y):,} test"
    return (train_loader, calib_loader, val_loader, test_loader), sizes


def _text_loaders(cfg: TrainConfig, ds: textdata.TextCorpus, spec: models.ModelSpec, run_dir: Path,
                  device: torch.device, d: distributed.Dist, resume: bool) -> tuple[tuple, str]:
    """Window loaders of a text corpus; writes vocab.json (on resume: checks the corpus gives the same)."""
    loaders = textdata.text_loaders(ds, spec.input_shape[-1], cfg.batch_size, cfg.seed, device=device,
                                    shard=(d.rank, d.world), train_chars=cfg.train_subset)
    path = run_dir / "vocab.json"
    if resume and path.is_file() and textdata.read_vocab(path) != ds.vocab:
        raise ConfigError(f"the corpus now gives another vocabulary than {path} records; resume with the "
                          "run's --data-dir (or start a new run)")
    if d.is_main:
        textdata.write_vocab(path, ds.vocab)
    sizes = (f"{len(loaders[0].ids):,} train / {len(ds.val):,} val / {len(ds.test):,} test characters, "
             f"{len(ds.vocab)} symbols")
    return loaders, sizes


def _hardware(device: torch.device) -> str:
    """What the run's numbers were measured on, for reports: the GPU's name, or the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    import platform

    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} cores"


def _reconcile_init(run_dir: Path, init_record: dict[str, Any], laperm: LaPerm | None, log: Callable[[str], None]) -> None:
    """On resume: init.pt must exist and agree with the checkpoint's θ0; rebuild it from the seed if lost."""
    try:
        stored = checkpoint.load(run_dir / "init.pt")
        state = stored["state"] if isinstance(stored, dict) and isinstance(stored.get("state"), dict) else None
        if state is None:
            raise checkpoint.CheckpointError(f"{run_dir / 'init.pt'} is not an init record")
    except checkpoint.CheckpointError as e:
        if laperm is not None and _theta0_mismatch(init_record["state"], laperm) is not None:
            raise rundir.RunDirError(f"{e}, and the config's seed does not rebuild the checkpoint's initial "
                                     "weights; the run cannot be verified. Start a new run") from None
        log(f"warning: {e}; rebuilt init.pt from the seed (it matches the checkpoint's initial weights)")
        checkpoint.save(init_record, run_dir / "init.pt")
        return
    if laperm is not None and (bad := _theta0_mismatch(state, laperm)) is not None:
        raise rundir.RunDirError(f"init.pt and the newest checkpoint disagree about the initial values of {bad}; "
                                 "the run folder mixes files of different runs. Start a new run")


def _reconcile_best(run_dir: Path, state: RunState, best_state: dict[str, torch.Tensor] | None,
                    log: Callable[[str], None]) -> None:
    """On resume: make best.pt the model the checkpoint selected (a crash may have left a later or broken one)."""
    path = run_dir / "best.pt"
    if state.best.get("sha256") is not None and best_state is not None:
        if checkpoint.file_sha256(path) != state.best["sha256"]:
            log(f"restoring best.pt (epoch {state.best['epoch']}) from the checkpoint")
            checkpoint.save({"model": best_state, "epoch": state.best["epoch"], "synced": True}, path)
    elif not state.best and path.exists():
        # Written after the checkpoint, by the part of the run that is about to be redone.
        log("removing best.pt: it was selected after the checkpoint being resumed and will be chosen again")
        path.unlink()
        Path(f"{path}.sha256").unlink(missing_ok=True)


def _apply_changes(cfg: TrainConfig, old: dict[str, Any], state: RunState, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LambdaLR, log: Callable[[str], None]) -> None:
    """Apply a new lr / epochs given on resume, and record them (they end up in summary.json)."""
    if old.get("lr") != cfg.lr:
        # LambdaLR keeps the base lr in its state; replace it and the current lr of each group.
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
        for g in opt.param_groups:
            g["initial_lr"] = cfg.lr
            g["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, state.epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        state.changes.append({"step": state.step, "lr": [old.get("lr"), cfg.lr]})
        log(f"learning rate changed from {old.get('lr'):g} to {cfg.lr:g} from step {state.step} on")
    if old.get("epochs") != cfg.epochs:
        state.changes.append({"step": state.step, "epochs": [old.get("epochs"), cfg.epochs]})
        log(f"epochs changed from {old.get('epochs')} to {cfg.epochs}")


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _describe_optimizer(cfg: TrainConfig, opt: torch.optim.Optimizer) -> str:
    if isinstance(opt, LaPerm):
        ks = f"k={cfg.k}" + (f" (schedule {cfg.k_schedule})" if cfg.k_schedule else "")
        if cfg.sync_rule != "overwrite":
            ks += f", {cfg.sync_rule} sync rule"
        return f"LaPerm({cfg.inner}, {ks}, lr {cfg.lr:g} {cfg.lr_schedule}), {sum(p.numel() for p in opt.state):,} weights permuted"
    return f"{cfg.optimizer} (lr {cfg.lr:g} {cfg.lr_schedule})"


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']:>3}/{epochs}", f"loss {r['train_loss']:.4f}", f"train {r['train_acc']:.2%}"]
    if "val_acc" in r:
        parts.append(f"val {r['val_acc']:.2%}")
    parts.append(f"test {r['test_acc']:.2%}")
    if "val_bpc" in r:
        parts.append(f"val {r['val_bpc']:.3f} bits/char")
    if "reconnected" in r:
        parts.append(f"reconnected {r['reconnected']:.1%}")
    parts.append(f"{r['images_per_s']:,.0f} {'chars' if 'val_bpc' in r else 'img'}/s")  # (text: predicted chars)
    return " | ".join(parts)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"
