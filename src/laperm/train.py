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
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from . import checkpoint, init as winit, models, rundir
from .config import ConfigError, TrainConfig, k_for_epoch, lr_factor, parse_init
from .data import BatchLoader, Dataset, load_dataset, make_augment, train_val_split
from .data.loader import derive_seed
from .optim import LaPerm, laperm_param_groups

__all__ = ["train", "TrainingInterrupted", "NumericalError", "resolve_device", "evaluate"]

CKPT_FORMAT = "laperm-train/1"


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was saved."""


class NumericalError(RuntimeError):
    """The loss or the weights became NaN/inf."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} not understood; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu")
    return device


# -- building blocks ----------------------------------------------------------------


def load_data(cfg: TrainConfig, spec: models.ModelSpec) -> Dataset:
    name = cfg.dataset or spec.dataset
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


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The Keras-initialised model with the configured init applied; returns (model, masks)."""
    model = models.build(cfg.model, seed=derive_seed(cfg.seed, 1))
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
    return LaPerm(inner, k=k_for_epoch(cfg, 0), granularity=cfg.granularity)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over ``loader``."""
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
    return float(loss_sum) / max(n, 1), int(correct) / max(n, 1)


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


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps."""

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

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict[str, Any], nn.Module, torch.optim.Optimizer], None] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing the run folder; returns the summary dict."""
    cfg.validate()
    run_dir = rundir.prepare_run_dir(Path(cfg.out) / cfg.run_name(), resume=resume, overwrite=overwrite)
    saved = None
    if resume:
        saved_cfg = yaml.safe_load((run_dir / rundir.MARKER).read_text())
        cfg = TrainConfig(**{**saved_cfg, "progress": cfg.progress, "device": cfg.device,
                             "data_dir": cfg.data_dir or saved_cfg.get("data_dir"),
                             "threads": cfg.threads, "out": cfg.out, "name": run_dir.name}).validate()
        found = checkpoint.latest_good(run_dir / "checkpoints", warn=log)
        if found is None:
            log(f"no usable checkpoint in {run_dir}; starting it from the beginning")
        else:
            log(f"resuming {run_dir} from {found[0].name}")
            saved = found[1]
            if saved.get("format") != CKPT_FORMAT:
                raise checkpoint.CheckpointError(f"{found[0]} is not a laperm training checkpoint")
    else:
        rundir.write_config(run_dir, cfg.to_dict())

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    spec = models.get_spec(cfg.model)
    ds = load_data(cfg, spec)

    # Data: validation split from the training set, optional subset, loaders.
    n_train = len(ds.train_y)
    if cfg.val_size >= n_train:
        raise ConfigError(f"val_size {cfg.val_size} leaves no training data ({n_train} images); lower --val-size")
    train_idx, val_idx = train_val_split(n_train, cfg.val_size, derive_seed(cfg.seed, 3))
    if cfg.train_subset:
        train_idx = train_idx[: cfg.train_subset]
    common = dict(mean=ds.mean, std=ds.std, device=device)
    try:
        augment = make_augment(cfg.augment)
    except ValueError as e:
        raise ConfigError(f"augment: {e}") from None
    train_loader = BatchLoader(ds.train_x, ds.train_y, cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, 4),
                               augment=augment, indices=train_idx, **common)
    calib_loader = BatchLoader(ds.train_x, ds.train_y, 256, shuffle=True, seed=derive_seed(cfg.seed, 5),
                               indices=train_idx, **common)
    eval_bs = 1000
    val_loader = (BatchLoader(ds.train_x, ds.train_y, eval_bs, shuffle=False, indices=val_idx, **common)
                  if len(val_idx) else None)
    test_loader = BatchLoader(ds.test_x, ds.test_y, eval_bs, shuffle=False, **common)

    # Model, θ0, optimizer.
    torch.manual_seed(derive_seed(cfg.seed, 6))  # dropout and anything else on the global RNG
    model, masks = build_model(cfg, device)
    opt = build_optimizer(cfg, model)
    laperm = opt if isinstance(opt, LaPerm) else None
    l2 = spec.l2 if cfg.l2 is None else cfg.l2
    l2_params = model.l2_parameters() if l2 else []
    # Baselines on a pruned/shared init keep the pruned weights at zero (a fixed mask).
    fixed = [(p, masks[n]) for n, p in model.named_parameters() if n in masks] if laperm is None else []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg.lr_schedule, e))
    if not resume or saved is None:
        init_record = {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                       "permuted": rundir.layout_records(laperm) if laperm else [],
                       "optimizer": cfg.optimizer, "seed": cfg.seed, "model": cfg.model, "init": cfg.init}
        checkpoint.save(init_record, run_dir / "init.pt")

    state = RunState()
    prev_synced: dict[str, torch.Tensor] | None = None  # for the "reconnected" metric
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        train_loader.load_state_dict(saved["loader"])
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        state = RunState(**saved["run"])
        prev_synced = saved.get("prev_synced")
    metrics = rundir.MetricsLog(run_dir / "metrics.jsonl", state.records)

    def save_checkpoint() -> None:
        state.records = metrics.records
        payload = {
            "format": CKPT_FORMAT, "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "loader": train_loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "run": vars(state).copy(),
            "prev_synced": prev_synced,
        }
        checkpoint.save(payload, checkpoint.checkpoint_path(run_dir / "checkpoints", state.step))
        checkpoint.prune_checkpoints(run_dir / "checkpoints", cfg.keep_checkpoints)

    steps_per_epoch = len(train_loader)
    log(f"{cfg.run_name()}: {cfg.model} on {ds.name} ({len(train_idx):,} train / {len(val_idx):,} val / "
        f"{len(ds.test_y):,} test), {_describe_optimizer(cfg, opt)}, {parse_init(cfg.init).describe()}, "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps, device {device}")
    model.train()
    with _StopFlag() as stop:
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            if laperm:
                for g in laperm.param_groups:
                    g["k"] = k_for_epoch(cfg, epoch)
            train_loader.set_epoch(epoch)
            start = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, initial=train_loader.state_dict()["batch"] if saved else 0,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                       disable=None if cfg.progress else True, dynamic_ncols=True)
            saved = None
            loss_acc = torch.zeros((), dtype=torch.float64, device=device)
            correct_acc = torch.zeros((), dtype=torch.int64, device=device)
            for xb, yb in train_loader:
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if l2_params:
                    loss = loss + l2 * sum(p.pow(2).sum() for p in l2_params)
                opt.zero_grad(set_to_none=True)
                (loss * len(yb) if cfg.loss_scale == "sum" else loss).backward()
                opt.step()
                for p, m in fixed:
                    p.data.mul_(m)
                state.step += 1
                loss_acc += loss.detach().double() * len(yb)
                correct_acc += (logits.detach().argmax(1) == yb).sum()
                state.seen += len(yb)
                bar.update(1)
                if bar.n % 25 == 0 or bar.n == steps_per_epoch:
                    # One host sync every 25 steps for the display, not one per step.
                    state.loss_sum += float(loss_acc)
                    state.correct += int(correct_acc)
                    loss_acc.zero_()
                    correct_acc.zero_()
                    cur_loss = state.loss_sum / max(state.seen, 1)
                    if not math.isfinite(cur_loss):
                        raise NumericalError(
                            f"the training loss became {cur_loss} at step {state.step}; "
                            f"the last good checkpoint is in {run_dir / 'checkpoints'} — resume with "
                            "`laperm train --resume` after lowering the learning rate in config.yaml"
                        )
                    post = {"loss": f"{cur_loss:.4f}", "acc": f"{state.correct / max(state.seen, 1):.2%}"}
                    if laperm:
                        post["sync in"] = laperm.steps_to_next_sync()
                    el = state.epoch_time + time.perf_counter() - start
                    post["img/s"] = f"{state.seen / max(el, 1e-9):,.0f}"
                    bar.set_postfix(post, refresh=False)
                if stop.signal is not None:
                    state.loss_sum += float(loss_acc)
                    state.correct += int(correct_acc)
                    state.epoch_time += time.perf_counter() - start
                    bar.close()
                    save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(stop.signal).name} at step {state.step}; "
                        f"checkpoint saved. Continue with: laperm train --resume {run_dir}"
                    )
            bar.close()
            state.loss_sum += float(loss_acc)
            state.correct += int(correct_acc)
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
                with synced_state(opt, model, calib_loader, cfg.bn_recalibrate):
                    if val_loader is not None:
                        record["val_loss"], record["val_acc"] = evaluate(model, val_loader)
                    record["test_loss"], record["test_acc"] = evaluate(model, test_loader)
                    if laperm:
                        current = {n: p.detach().clone() for n, p in laperm.permuted_parameters()}
                        if prev_synced is not None:
                            moved = sum(int((current[n] != prev_synced[n]).sum()) for n in current)
                            record["reconnected"] = moved / sum(t.numel() for t in current.values())
                        prev_synced = current
                    if val_loader is not None and record["val_acc"] > state.best.get("val_acc", -1.0):
                        state.best = {"epoch": state.epoch, "val_acc": record["val_acc"],
                                      "test_acc": record["test_acc"]}
                        checkpoint.save({"model": model.state_dict(), "epoch": state.epoch, "synced": True},
                                        run_dir / "best.pt")
                    if on_epoch is not None:
                        on_epoch(record, model, opt)
                log(_epoch_line(record, cfg.epochs))
            metrics.append(record)
            state.loss_sum, state.correct, state.seen, state.epoch_time = 0.0, 0, 0, 0.0
            if state.epoch % cfg.checkpoint_every == 0 or state.epoch == cfg.epochs:
                save_checkpoint()

    # The end: a permanent sync, BN statistics for the synced weights, final numbers.
    if laperm:
        laperm.sync()
        recalibrate_bn(model, calib_loader, cfg.bn_recalibrate)
    final = {"model": model.state_dict(), "epoch": state.epoch, "synced": True}
    checkpoint.save(final, run_dir / "final.pt")
    final_val = evaluate(model, val_loader)[1] if val_loader is not None else None
    final_test = evaluate(model, test_loader)[1]
    summary = {
        "run": cfg.run_name(), "run_dir": str(run_dir), "model": cfg.model, "dataset": ds.name,
        "optimizer": cfg.optimizer, "init": cfg.init, "seed": cfg.seed, "epochs": cfg.epochs,
        "steps": state.step, "final_test_acc": final_test, "final_val_acc": final_val,
        "selected_epoch": state.best.get("epoch"), "selected_val_acc": state.best.get("val_acc"),
        "selected_test_acc": state.best.get("test_acc"),
        "best_test_acc": max((r["test_acc"] for r in metrics.records if "test_acc" in r), default=final_test),
        "train_time_s": round(state.elapsed, 1), "device": str(device), "torch": torch.__version__,
        "verified": None,
    }
    if laperm:
        report = rundir.verify_run(run_dir)
        if not report.ok:
            raise rundir.RunDirError(report.message())
        summary["verified"] = report.message()
    checkpoint.atomic_write_text(run_dir / "summary.json", _json(summary))
    try:
        rundir.plot_curves(metrics.records, run_dir / "curves.png", cfg.run_name())
    except Exception as e:  # a plot must never cost the run
        log(f"warning: could not draw curves.png ({e})")
    return summary


def _describe_optimizer(cfg: TrainConfig, opt: torch.optim.Optimizer) -> str:
    if isinstance(opt, LaPerm):
        ks = f"k={cfg.k}" + (f" (schedule {cfg.k_schedule})" if cfg.k_schedule else "")
        return f"LaPerm({cfg.inner}, {ks}, lr {cfg.lr:g} {cfg.lr_schedule}), {sum(p.numel() for p in opt.state):,} weights permuted"
    return f"{cfg.optimizer} (lr {cfg.lr:g} {cfg.lr_schedule})"


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']:>3}/{epochs}", f"loss {r['train_loss']:.4f}", f"train {r['train_acc']:.2%}"]
    if "val_acc" in r:
        parts.append(f"val {r['val_acc']:.2%}")
    parts.append(f"test {r['test_acc']:.2%}")
    if "reconnected" in r:
        parts.append(f"reconnected {r['reconnected']:.1%}")
    parts.append(f"{r['images_per_s']:,.0f} img/s")
    return " | ".join(parts)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"
