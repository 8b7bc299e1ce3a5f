"""Experiments as code: a named, versioned set of runs, resumable and re-plottable.

An :class:`Experiment` turns ``(budget, seeds)`` into a list of :class:`Run`
(config overrides plus tags for tables and plots).  :func:`run_experiment`
trains each run into ``<out>/<experiment>/<run folder>`` unless it already has
a ``summary.json`` (finished) and resumes it when a folder without one exists,
so an interrupted ``laperm run`` picks up where it stopped.  A manifest,
``experiment.json``, records the version, budget, tags and the exact command of
every run, which is all ``laperm report`` needs to rebuild tables and figures
without retraining.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..build import resolve_device
from ..checkpoint import atomic_write_text
from ..config import ConfigError, TrainConfig, resolve_config

__all__ = [
    "Run",
    "Experiment",
    "EXPERIMENTS",
    "ExperimentError",
    "register",
    "run_experiment",
    "load_manifest",
    "command_for",
]

BUDGETS = ("quick", "paper")
PARALLEL_LOGS = "logs"  # <experiment folder>/logs: run-<i>.log and run-<i>.yaml of `laperm run --parallel N`


class ExperimentError(RuntimeError):
    """Some runs of an experiment failed; the message names their log files."""


@dataclass
class Run:
    """One training run of an experiment: config overrides plus tags for the report."""

    overrides: dict[str, Any]
    tags: dict[str, Any] = field(default_factory=dict)
    hook: str | None = None  # name of an analysis hook in experiments.hooks (rebuild, dynamics)

    def config(self, out: Path, seed_threads: int | None = None, data_dir: str | None = None) -> TrainConfig:
        layer = dict(self.overrides, out=str(out), progress=False)
        if seed_threads:
            layer["threads"] = seed_threads
        if data_dir:
            layer["data_dir"] = data_dir
        return resolve_config(layer)


@dataclass
class Experiment:
    name: str
    version: int
    description: str
    make_runs: Callable[[str, list[int]], list[Run]]
    default_seeds: tuple[int, ...] = (0,)
    post: Callable[[Path, list[dict[str, Any]]], None] | None = None  # analysis after training


EXPERIMENTS: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    EXPERIMENTS[exp.name] = exp
    return exp


def command_for(run: Run, out: Path) -> str:
    """The ``laperm train`` command that reproduces ``run`` (hooks add analysis files only)."""
    args = ["laperm", "train"]
    for key, value in run.overrides.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            continue  # k_schedule: only through --config
        else:
            args += [flag, str(value)]
    args += ["--out", str(out)]
    return shlex.join(args)


def load_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "experiment.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    # Merge with what is on disk: two `laperm run` processes may share an experiment folder.
    on_disk = load_manifest(folder)
    merged = {**on_disk, **{k: v for k, v in manifest.items() if k != "runs"}}
    merged["runs"] = {**on_disk.get("runs", {}), **manifest.get("runs", {})}
    atomic_write_text(folder / "experiment.json", json.dumps(merged, indent=1) + "\n")


def run_experiment(
    name: str,
    budget: str = "paper",
    seeds: list[int] | None = None,
    out: str | Path = "results",
    only: str | None = None,
    threads: int | None = None,
    data_dir: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    parallel: int = 1,
    stack: bool | None = None,
) -> list[dict[str, Any]]:
    """Train every unfinished run of experiment ``name``; returns the manifest entries.

    ``stack``: runs that differ only in seed and optimizer train as one stacked model
    (:mod:`~laperm.experiments.stacking`), after the loop; each keeps its own run folder.
    None (default): stack the runs that train on a CUDA device (on the CPU a stack saves
    little time, and single runs give results that do not depend on what they were stacked with).

    ``parallel`` > 1: the runs without an analysis hook train as ``laperm train`` processes,
    ``parallel`` at a time (:func:`~laperm.experiments.parallel.run_parallel`), after the loop.
    """
    from ..engine import train
    from . import hooks

    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    exp = EXPERIMENTS[name]
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    runs = exp.make_runs(budget, list(seeds) if seeds else list(exp.default_seeds))
    if only:
        runs = [r for r in runs if only in _label(r)]
    manifest = load_manifest(folder) or {"experiment": name, "runs": {}}
    manifest.update(version=exp.version, description=exp.description)
    entries, deferred = [], []
    for i, run in enumerate(runs, 1):
        cfg = run.config(folder, threads, data_dir)
        run_dir = folder / cfg.run_name()
        entry: dict[str, Any] = {
            "folder": cfg.run_name(),
            "tags": run.tags,
            "budget": budget,
            "hook": run.hook,
            "command": command_for(run, folder),
            "experiment_version": exp.version,
        }
        entries.append(entry)
        done = (run_dir / "summary.json").is_file()
        if not done and not dry_run and run.hook is None:
            done = _reuse(Path(out), name, run_dir, log)
        log(f"[{name} {i}/{len(runs)}] {_label(run)} -> {run_dir} ({'done' if done else 'to train'})")
        if done or dry_run:
            if run_dir.is_dir():  # a dry run registers started runs, so the report can show unfinished ones
                # (tags and command as the experiment now defines them; what training recorded is kept)
                manifest["runs"][entry["folder"]] = {**manifest["runs"].get(entry["folder"], {}), **entry}
            continue
        resume = (run_dir / "config.yaml").is_file()
        stacked = stack if stack is not None else _on_cuda(cfg)
        if (parallel > 1 or stacked) and run.hook is None:  # (a hook's probe rides on callbacks: this process only)
            deferred.append((cfg, entry, stacked))
            continue
        probe = hooks.make(run.hook, cfg, run_dir)
        t0 = time.perf_counter()
        summary = train(cfg, resume=resume, callbacks=probe, log=log)
        probe.finish(summary)
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        manifest["runs"][entry["folder"]] = entry
        _save_manifest(folder, manifest)
    if deferred:
        _train_deferred(folder, deferred, parallel, manifest, log)
    _save_manifest(folder, manifest)
    if exp.post is not None and not dry_run:
        exp.post(folder, entries)
    return entries


def _on_cuda(cfg: TrainConfig) -> bool:
    try:
        return resolve_device(cfg.device).type == "cuda"
    except ConfigError:  # (the run itself reports it)
        return False


def _train_deferred(
    folder: Path,
    deferred: list[tuple[TrainConfig, dict[str, Any], bool]],
    parallel: int,
    manifest: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """The runs left for after the loop: stacks first (those marked for stacking), the others in
    parallel or in turn."""
    from ..engine import train
    from .stacking import stack_groups, train_stacks

    stacks, jobs = stack_groups([(c, e) for c, e, s in deferred if s], folder)
    jobs += [(c, e) for c, e, s in deferred if not s]
    stopped = train_stacks(folder, stacks, manifest, lambda: _save_manifest(folder, manifest), log)
    if parallel > 1 and jobs:
        _train_parallel(folder, jobs, parallel, manifest)
    for cfg, entry in jobs if parallel == 1 else []:
        t0 = time.perf_counter()
        train(cfg, resume=(folder / cfg.run_name() / "config.yaml").is_file(), log=log)
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        manifest["runs"][entry["folder"]] = entry
        _save_manifest(folder, manifest)
    if stopped:
        raise ExperimentError(f"{len(stopped)} stacked runs stopped early (NaN): {', '.join(stopped)}")


def _train_parallel(
    folder: Path, jobs: list[tuple[TrainConfig, dict[str, Any]]], parallel: int, manifest: dict[str, Any]
) -> None:
    """Train ``jobs`` as ``laperm train --config`` processes, ``parallel`` at a time; record the finished ones.

    Each gets its full config as a file (k_schedule has no flag) and its output in ``logs/run-<i>.log``.
    """
    from .parallel import run_parallel

    logs = folder / PARALLEL_LOGS
    logs.mkdir(exist_ok=True)
    commands = []
    for i, (cfg, _) in enumerate(jobs):
        config_file = logs / f"run-{i}.yaml"
        atomic_write_text(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run_dir = folder / cfg.run_name()
        resume = ["--resume", str(run_dir)] if (run_dir / "config.yaml").is_file() else []
        commands.append([sys.executable, "-m", "laperm", "train", "--config", str(config_file), *resume])
    t0 = time.perf_counter()
    codes = run_parallel(commands, parallel, log_dir=logs)
    for (_, entry), code in zip(jobs, codes, strict=True):
        if code == 0:
            entry["wall_s"] = round(time.perf_counter() - t0, 1)  # (the batch's wall time: runs overlap)
            manifest["runs"][entry["folder"]] = entry
    _save_manifest(folder, manifest)
    failed = [f"{logs / f'run-{i}.log'} (exit {c})" for i, c in enumerate(codes) if c != 0]
    if failed:
        raise ExperimentError(
            f"{len(failed)} of {len(jobs)} runs failed: see {', '.join(failed)}; `laperm run` again resumes them"
        )


def _reuse(root: Path, name: str, run_dir: Path, log: Callable[[str], None]) -> bool:
    """Copy an identical finished run (same config digest) from another experiment instead of retraining.

    Only runs without an analysis hook are shared, since a hook adds files an
    ordinary run lacks.
    """
    import shutil

    for other in sorted(root.glob(f"*/{run_dir.name}/summary.json")):
        src = other.parent
        if (
            src == run_dir
            or src.parent.name == name
            or (src / "rebuild.jsonl").exists()
            or (src / "dynamics.json").exists()
        ):
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
        log(f"  reused the identical finished run {src}")
        return True
    return False


def _label(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.tags.items())
