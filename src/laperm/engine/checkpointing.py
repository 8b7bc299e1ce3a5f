"""The training checkpoint: its format, and save / find / restore / reconcile in one place.

A checkpoint (``checkpoints/ckpt-<step>.pt``) is a dict whose keys are the
constants below.  Each component writes and reads its own part: the model,
the optimizer, the scheduler, the loaders, the RNGs, the engine's
:class:`TrainingState`, the step accumulators and the evaluator's copies.
Run folders written by earlier versions hold the same keys, and must resume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, reconnect, rundir
from ..config import RESUME_CHANGEABLE, ConfigError, TrainConfig, lr_factor
from ..optim import LaPerm
from .state import TrainingState

__all__ = [
    "CKPT_FORMAT",
    "CKPT_KEYS",
    "Key",
    "find_resume_checkpoint",
    "resume_config",
    "reconcile_init",
    "reconcile_best",
    "apply_changes",
    "rng_state",
    "restore_rng",
]

CKPT_FORMAT = "laperm-train/1"


class Key:
    """The keys of a training checkpoint (the names are the format: never rename one)."""

    FORMAT, CONFIG, MODEL, OPTIMIZER, SCHEDULER = "format", "config", "model", "optimizer", "scheduler"
    LOADER, CALIB_LOADER, RNG, RUN, ACC = "loader", "calib_loader", "rng", "run", "acc"
    PREV_SYNCED, BEST_MODEL = "prev_synced", "best_model"


# The keys every training checkpoint holds (the others were added later and may be missing).
CKPT_KEYS = (Key.FORMAT, Key.CONFIG, Key.MODEL, Key.OPTIMIZER, Key.SCHEDULER, Key.LOADER, Key.RNG, Key.RUN)


def find_resume_checkpoint(
    run_dir: Path, main: bool, log: Callable[[str], None], barrier: Callable[[], None]
) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest good checkpoint of ``run_dir`` (path, contents), or (None, None) to start afresh.

    Rank 0 sets damaged checkpoints newer than the one used aside (renamed, never tried
    again) before the other ranks look.
    """
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    if not main:
        barrier()  # rank 0 first sets damaged checkpoints aside
        found = checkpoint.latest_good(ckpt_dir, warn=log)
        return found if found is not None else (None, None)
    ckpts = checkpoint.list_checkpoints(ckpt_dir)
    found = checkpoint.latest_good(ckpt_dir, warn=log)
    for path in ckpts[: ckpts.index(found[0]) if found else len(ckpts)]:
        log(f"set {path.name} aside as {checkpoint.set_aside(path).name}")
    if found is None:
        log(f"no usable checkpoint in {run_dir}; starting it from the beginning")
        return None, None
    path, saved = found
    if not isinstance(saved, dict) or saved.get(Key.FORMAT) != CKPT_FORMAT or not set(CKPT_KEYS) <= saved.keys():
        raise checkpoint.CheckpointError(f"{path} is not a laperm training checkpoint")
    return path, saved


def resume_config(cfg: TrainConfig, saved: dict[str, Any], run_dir: Path) -> TrainConfig:
    """``cfg``, after checking it changes only what a resumed run may change."""
    try:
        old = TrainConfig(**saved).validate().to_dict()
    except (TypeError, ConfigError) as e:
        raise rundir.RunDirError(f"{run_dir / rundir.MARKER} is damaged ({e}); restore it or start a new run") from None
    new = cfg.to_dict()
    changed = [f for f in new if new[f] != old[f] and f not in RESUME_CHANGEABLE]
    if changed:
        what = ", ".join(f"{f} ({old[f]!r} -> {new[f]!r})" for f in changed)
        raise ConfigError(
            f"cannot change {what} when resuming {run_dir}; only "
            f"{', '.join(sorted(RESUME_CHANGEABLE))} may change. Start a new run instead"
        )
    return cfg


def rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(rng: dict[str, Any], device: torch.device, rank: int, world: int, distributed: bool) -> None:
    if distributed and "ranks" in rng:  # each rank continues its own random stream
        if len(rng["ranks"]) != world:
            raise ValueError(f"the checkpoint was written by {len(rng['ranks'])} processes, not {world}")
        rng = rng["ranks"][rank]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _theta0_mismatch(init_state: dict[str, torch.Tensor], opt: LaPerm) -> str | None:
    """Name of the first permuted tensor whose θ0 in ``init_state`` differs from ``opt``'s, else None."""
    for name, p in opt.permuted_parameters():
        t = init_state.get(name)
        if t is None or not torch.equal(reconnect.sorted_rows(t.to(p.device), opt.layout_of(p)), opt.initial_sorted(p)):
            return name
    return None


def reconcile_init(
    run_dir: Path, init_record: dict[str, Any], laperm: LaPerm | None, log: Callable[[str], None]
) -> None:
    """On resume: init.pt must exist and agree with the checkpoint's θ0; rebuild it from the seed if lost."""
    path = run_dir / rundir.INIT
    try:
        stored = checkpoint.load(path)
        state = stored["state"] if isinstance(stored, dict) and isinstance(stored.get("state"), dict) else None
        if state is None:
            raise checkpoint.CheckpointError(f"{path} is not an init record")
    except checkpoint.CheckpointError as e:
        if laperm is not None and _theta0_mismatch(init_record["state"], laperm) is not None:
            raise rundir.RunDirError(
                f"{e}, and the config's seed does not rebuild the checkpoint's initial "
                "weights; the run cannot be verified. Start a new run"
            ) from None
        log(f"warning: {e}; rebuilt init.pt from the seed (it matches the checkpoint's initial weights)")
        checkpoint.save(init_record, path)
        return
    if laperm is not None and (bad := _theta0_mismatch(state, laperm)) is not None:
        raise rundir.RunDirError(
            f"init.pt and the newest checkpoint disagree about the initial values of {bad}; "
            "the run folder mixes files of different runs. Start a new run"
        )


def reconcile_best(
    run_dir: Path, state: TrainingState, best_state: dict[str, torch.Tensor] | None, log: Callable[[str], None]
) -> None:
    """On resume: make best.pt the model the checkpoint selected (a crash may have left a later or broken one)."""
    path = run_dir / rundir.BEST
    if state.best.get("sha256") is not None and best_state is not None:
        if checkpoint.file_sha256(path) != state.best["sha256"]:
            log(f"restoring best.pt (epoch {state.best['epoch']}) from the checkpoint")
            checkpoint.save({"model": best_state, "epoch": state.best["epoch"], "synced": True}, path)
    elif not state.best and path.exists():
        # Written after the checkpoint, by the part of the run that is about to be redone.
        log("removing best.pt: it was selected after the checkpoint being resumed and will be chosen again")
        path.unlink()
        Path(f"{path}.sha256").unlink(missing_ok=True)


def apply_changes(
    cfg: TrainConfig,
    old: dict[str, Any],
    state: TrainingState,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    log: Callable[[str], None],
) -> None:
    """Apply a new lr / epochs given on resume, and record them (they end up in summary.json)."""
    if old.get("lr") != cfg.lr:
        # LambdaLR keeps the base lr in its state; replace it and the current lr of each group.
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
        for g in opt.param_groups:
            g["initial_lr"] = cfg.lr
            g["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, state.epoch)
        # get_last_lr() reads this (torch has no public setter); keep it equal to the groups' lr
        sched._last_lr = [g["lr"] for g in opt.param_groups]  # type: ignore[attr-defined]
        state.changes.append({"step": state.step, "lr": [old.get("lr"), cfg.lr]})
        log(f"learning rate changed from {old.get('lr'):g} to {cfg.lr:g} from step {state.step} on")
    if old.get("epochs") != cfg.epochs:
        state.changes.append({"step": state.step, "epochs": [old.get("epochs"), cfg.epochs]})
        log(f"epochs changed from {old.get('epochs')} to {cfg.epochs}")
