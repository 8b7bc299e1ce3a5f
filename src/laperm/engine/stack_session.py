"""``train_stack(cfgs)``: plan a stack of runs, check it, claim every member's run folder, train them as one.

The stacked counterpart of :mod:`laperm.engine.session`: the same checks before anything is
written, one run folder per member (named, written and verified as its single run's), and on
resume the newest checkpoint step that every running member has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import build, checkpoint, distributed, models, provenance, rundir
from ..config import ConfigError, TrainConfig
from ..data import Dataset
from .callbacks import Callbacks
from .checkpointing import find_resume_checkpoint, resume_config
from .stack_memory import check_stack_memory
from .stacked import Member, StackTrainer, read_stack_file, write_stack_file
from .summary import hardware

__all__ = ["parse_seeds", "plan_stack", "check_stackable", "stackable_reason", "train_stack", "resume_configs"]

VARYING = ("seed", "optimizer", "name")  # what may differ between the members of a stack (name: on resume)


MAX_SEEDS = 10**7  # more seeds than any memory holds as one stack: refused before the list is made


def parse_seeds(text: str) -> list[int]:
    """``"0-7"``, ``"0,3,5"`` or ``"0-3,8"`` as a list of distinct seeds, else a ConfigError."""
    spans: list[range] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            spans.append(range(int(lo), int(hi) + 1) if hi else range(int(lo), int(lo) + 1))
    except ValueError:
        raise ConfigError(f"--seeds {text!r} not understood; give e.g. 0-7, 0,3,5 or 0-3,8") from None
    count = sum(len(r) for r in spans)
    if count > MAX_SEEDS:
        raise ConfigError(f"--seeds {text!r} names {count:,} seeds; a stack holds at most {MAX_SEEDS:,}")
    seeds = [s for r in spans for s in r]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= 2**63:
        raise ConfigError(f"--seeds {text!r} must name distinct seeds from 0 to 2**63 - 1, e.g. 0-7")
    return seeds


def plan_stack(base: TrainConfig, seeds: list[int] | None, optimizers: list[str]) -> list[TrainConfig]:
    """One member per (optimizer, seed): ``base`` with that seed and optimizer; a stack that would not
    fit in memory is refused first (from one model's size: no member is made)."""
    base.validate()
    n = len(seeds) if seeds is not None else 1
    check_stack_memory(base, [o for o in optimizers for _ in range(n)], build.resolve_device(base.device))
    return [
        dataclasses.replace(base, seed=s, optimizer=o).validate()
        for o in optimizers
        for s in (seeds if seeds is not None else [base.seed])
    ]


def stackable_reason(cfgs: list[TrainConfig]) -> str | None:
    """Why ``cfgs`` cannot train as one stack (None: they can)."""
    first = cfgs[0]
    base = {k: v for k, v in first.to_dict().items() if k not in VARYING}
    for c in cfgs[1:]:
        other = {k: v for k, v in c.to_dict().items() if k not in VARYING}
        diff = [k for k in base if base[k] != other.get(k)]
        if diff:
            return f"members differ in {', '.join(diff)}; a stack's runs may differ only in seed and optimizer"
    if len({c.run_name() for c in cfgs}) != len(cfgs):
        return "two members would share a run folder (the same seed and optimizer twice, or a fixed --name)"
    if models.get_spec(first.model).dataset == "text":
        return f"model {first.model} is a language model; stacking supports the image models"
    if first.nproc != 1:
        return "a stack runs in one process; drop --nproc"
    if any(c.optimizer == "laperm" for c in cfgs) and first.sync_rule != "overwrite":
        return "stacked LaPerm supports the overwrite sync rule only; drop --sync-rule"
    kinds = {c.inner if c.optimizer == "laperm" else c.optimizer for c in cfgs}
    if len(kinds) > 1:
        return (
            f"the members' inner optimizers differ ({', '.join(sorted(kinds))}); one stacked optimizer needs one kind"
        )
    return None


def check_stackable(cfgs: list[TrainConfig]) -> None:
    if not cfgs:
        raise ConfigError("a stack needs at least one run")
    reason = stackable_reason(cfgs)
    if reason is not None:
        raise ConfigError(f"cannot stack these runs: {reason}")


def resume_configs(run_dir: Path, make: Callable[[dict[str, Any], str], TrainConfig]) -> list[TrainConfig] | None:
    """The configs of the running members of the stack ``run_dir`` belongs to (None: a single run).

    ``make(saved_config, folder_name)`` applies what was given on the command line to a saved config."""
    body = read_stack_file(run_dir)
    if body is None:
        return None
    stopped = body.get("stopped") or {}
    return [
        make(rundir.read_run_config(run_dir.parent / name), name) for name in body["members"] if name not in stopped
    ]


def train_stack(
    cfgs: list[TrainConfig],
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    vectorize: bool = True,
) -> list[dict[str, Any]]:
    """Train ``cfgs`` as one stacked model, one run folder each; the summaries of the members that finished.

    ``vectorize=False`` runs the members one by one inside each step (bit for bit the single runs' computation;
    in fast mode it never captures a CUDA graph)."""
    if cfgs:
        cfgs[0].validate()
    device = build.resolve_device(cfgs[0].device) if cfgs else torch.device("cpu")
    if cfgs:  # (first: it is quick however many members there are)
        check_stack_memory(cfgs[0], [c.optimizer for c in cfgs], device)
    for c in cfgs:
        c.validate()
    cfgs = [build.resolve_mode(c, device) for c in cfgs]  # mode auto: fast on CUDA, as for a single run
    check_stackable(cfgs)
    dirs = [Path(c.out) / c.run_name() for c in cfgs]
    for d in dirs:
        rundir.check_run_dir(d, resume=resume, overwrite=overwrite)
    if resume:
        cfgs = [resume_config(c, rundir.read_run_config(d), d) for c, d in zip(cfgs, dirs, strict=True)]
    spec = models.get_spec(cfgs[0].model)
    ds = build.load_data(cfgs[0], spec)
    if isinstance(ds, Dataset) and cfgs[0].val_size >= len(ds.train_y):
        raise ConfigError(f"val_size {cfgs[0].val_size} leaves no training data; lower --val-size")
    build.build_augment(cfgs[0])
    with undone_unless_started(dirs, enabled=not resume) as made:
        for d in dirs:
            made.append(d)  # (before it exists: an interrupt may come while it is being made)
            rundir.prepare_run_dir(d, resume=resume, overwrite=overwrite)
        with contextlib.ExitStack() as locks:
            for d in dirs:
                locks.enter_context(rundir.locked(d))
            with rundir.write_errors_explained(dirs[0]):  # (any member's folder resumes the stack)
                return _run(cfgs, dirs, resume, device, spec, ds, log, vectorize)


@contextlib.contextmanager
def undone_unless_started(dirs: list[Path], enabled: bool = True) -> Iterator[list[Path]]:
    """Nothing half-made: if the block fails (an error, Ctrl-C) before any member saved a checkpoint,
    remove the member folders it made (the list it fills) and the output folders made for them.
    After a checkpoint the folders stay: ``laperm train --resume`` continues them."""
    made: list[Path] = []
    parents = rundir.missing_folders(dirs[0].parent) if dirs and enabled else []
    empty = {d for d in dirs if d.is_dir()} if enabled else set()  # (check_run_dir let only empty ones through)
    try:
        yield made
    except BaseException:
        if enabled and not any(_started(d) for d in made):
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
                if d in empty:  # it was there, empty (or overwritten: its old run is gone either way)
                    d.mkdir(exist_ok=True)
            rundir.remove_empty(parents)  # (only while empty: another run may have used them)
        raise


def _started(run_dir: Path) -> bool:
    """A member folder that holds a checkpoint or a summary: resumable work, never removed."""
    return bool(checkpoint.list_checkpoints(run_dir / rundir.CHECKPOINTS)) or (run_dir / rundir.SUMMARY).exists()


def _run(
    cfgs: list[TrainConfig],
    dirs: list[Path],
    resume: bool,
    device: torch.device,
    spec: models.ModelSpec,
    ds: Any,
    log: Callable[[str], None],
    vectorize: bool,
) -> list[dict[str, Any]]:
    resumed: list[tuple[Path | None, dict[str, Any] | None]] = [(None, None)] * len(cfgs)
    if resume:
        resumed = aligned_checkpoints(dirs, log)
    for c, d in zip(cfgs, dirs, strict=True):
        if not resume or c.to_dict() != rundir.read_run_config(d):
            rundir.write_config(d, c.to_dict())
    if not resume:
        write_stack_file(dirs, {})
    if cfgs[0].threads:
        torch.set_num_threads(cfgs[0].threads)
    if device.type == "cuda" and isinstance(ds, Dataset):  # one copy on the GPU for every member's loaders
        ds = dataclasses.replace(
            ds, **{f: getattr(ds, f).to(device) for f in ("train_x", "train_y", "test_x", "test_y")}
        )
    members = [
        Member(c, d, device, spec, ds, build.build_loaders(c, ds, device), log, Callbacks(), distributed.Dist(), r)
        for c, d, r in zip(cfgs, dirs, resumed, strict=True)
    ]
    trainer = StackTrainer(members, vectorize, log)
    for m, d in zip(trainer.members, dirs, strict=True):  # each member's own record of where it trains
        provenance.record(d, step=m.state.step, device=device, hardware=hardware(device))
    return trainer.fit()


def _step_of(path: Path) -> int:
    return int(path.stem.rpartition("-")[2])


def aligned_checkpoints(
    dirs: list[Path], log: Callable[[str], None]
) -> list[tuple[Path | None, dict[str, Any] | None]]:
    """Each member's checkpoint to resume, all of one step: the newest step every member has (a stack
    killed while its members were saving leaves some one checkpoint ahead; those are set aside)."""
    steps = [{_step_of(p) for p in checkpoint.list_checkpoints(d / rundir.CHECKPOINTS)} for d in dirs]
    common = set.intersection(*steps)
    target = max(common) if common else -1
    for d in dirs:
        for p in checkpoint.list_checkpoints(d / rundir.CHECKPOINTS):
            if _step_of(p) > target:
                log(f"set {d.name}/{p.name} aside: not every member of the stack reached step {_step_of(p)}")
                checkpoint.set_aside(p)
    found = [find_resume_checkpoint(d, True, log, lambda: None) for d in dirs]
    if len({None if p is None else _step_of(p) for p, _ in found}) > 1:
        raise checkpoint.CheckpointError(
            "the members' usable checkpoints are of different steps (one was damaged); "
            "start the stack again with --overwrite"
        )
    return found
