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
from collections.abc import Callable, Iterable
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
    on_cuda: dict[str, Any] = field(default_factory=dict)  # added where the run trains on CUDA (the fast path)

    def settings(self, cuda: bool = False) -> dict[str, Any]:
        """The overrides this run trains with: ``on_cuda`` on top where the device is a GPU.  The mode is
        eager unless the run says otherwise (mode auto would pick fast on CUDA: other random streams,
        another run name than the results already recorded)."""
        out = {**self.overrides, **self.on_cuda} if cuda else dict(self.overrides)
        out.setdefault("mode", "eager")
        return out

    def config(
        self,
        out: Path,
        seed_threads: int | None = None,
        data_dir: str | None = None,
        device: str | None = None,
        cuda: bool = False,
    ) -> TrainConfig:
        layer = dict(self.settings(cuda), out=str(out), progress=False)
        if seed_threads:
            layer["threads"] = seed_threads
        if data_dir:
            layer["data_dir"] = data_dir
        if device:
            layer["device"] = device
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


def command_for(run: Run, out: Path, cuda: bool = False) -> str:
    """The ``laperm train`` command that reproduces ``run`` (hooks add analysis files only)."""
    args = ["laperm", "train"]
    for key, value in run.settings(cuda).items():  # (the mode included: `--mode auto` would pick fast on CUDA)
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


@dataclass
class Window:
    """``laperm run --deadline``: when every run must have stopped (a Unix time), and the least time worth a start."""

    deadline: float | None = None
    min_start_s: float = 0.0

    @classmethod
    def from_seconds(cls, seconds: float | None, min_start_s: float | None) -> Window:
        from ..engine import guards

        if seconds is None:
            return cls()
        return cls(guards.clock() + seconds, MIN_START_S if min_start_s is None else min_start_s)

    def left(self) -> float:
        from ..engine import guards

        return float("inf") if self.deadline is None else self.deadline - guards.clock()

    def can_start(self) -> bool:
        return self.left() >= max(self.min_start_s, 0.0)


MIN_START_S = 30.0  # `--deadline`: no run is started with less time left than this (start-up, data, capture)
STOPPED_EXIT = 3  # `laperm train`'s exit code when a run stopped cleanly (signal or deadline): resumable


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
    deadline_s: float | None = None,
    min_start_s: float | None = None,
    device: str | None = None,
    max_runs: int | None = None,
    stack: bool | None = None,
) -> list[dict[str, Any]]:
    """Train every unfinished run of experiment ``name``; returns the manifest entries.

    ``stack``: runs that differ only in seed and optimizer train as one stacked model
    (:mod:`~laperm.experiments.stacking`), after the loop; each keeps its own run folder.
    None (default): stack the runs that train on a CUDA device (on the CPU a stack saves
    little time, and single runs give results that do not depend on what they were stacked with).

    ``parallel`` > 1: the runs without an analysis hook train as ``laperm train`` processes,
    ``parallel`` at a time (:func:`~laperm.experiments.parallel.run_parallel`), after the loop.
    ``deadline_s``: every run stops cleanly (finished, or a checkpoint saved) within that many
    seconds; runs already started go first and none starts with less than ``min_start_s`` left.
    ``device``: where the runs train (a run's ``on_cuda`` settings apply on a GPU).
    ``max_runs``: train at most this many runs this time (unfinished ones first).
    """
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    window = Window.from_seconds(deadline_s, min_start_s)
    exp = EXPERIMENTS[name]
    folder = Path(out) / name
    runs = selected_runs(exp, budget, seeds, only)
    cuda = _on_cuda(device)
    if window.deadline is not None or max_runs is not None:
        runs = unfinished_first(runs, folder, cuda)
    cfgs = [run.config(folder, threads, data_dir, device, cuda) for run in runs]  # (each config checked)
    if not dry_run:
        check_before_training(folder, runs, cfgs, stack, window)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(folder) or {"experiment": name, "runs": {}}
    manifest.update(version=exp.version, description=exp.description)
    entries, todo = [], []
    for i, (run, cfg) in enumerate(zip(runs, cfgs, strict=True), 1):
        run_dir = folder / cfg.run_name()
        entry: dict[str, Any] = {
            "folder": cfg.run_name(),
            "tags": run.tags,
            "budget": budget,
            "hook": run.hook,
            "command": command_for(run, folder, cuda),
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
        todo.append((run, cfg, entry))
    if max_runs is not None and len(todo) > max_runs:
        log(f"[{name}] {len(todo) - max_runs} runs wait for a later call (--max-runs {max_runs})")
        todo = todo[:max_runs]
    outcome = _train_all(folder, todo, parallel, manifest, window, log, stack)
    _save_manifest(folder, manifest)
    if window.deadline is not None:
        log(_window_summary(name, outcome))
    if exp.post is not None and not dry_run and not outcome["unfinished"] and not outcome["not started"]:
        exp.post(folder, entries)
    return entries


def selected_runs(exp: Experiment, budget: str, seeds: list[int] | None, only: str | None) -> list[Run]:
    """The runs of ``exp`` for ``budget`` and ``seeds``, those whose tags contain ``only`` if given; a
    filter that matches no run is an error listing the tags there are (a typo must not look like "all done")."""
    runs = exp.make_runs(budget, list(seeds) if seeds else list(exp.default_seeds))
    if not only:
        return runs
    chosen = [r for r in runs if only in _label(r)]
    if not chosen:
        tags = sorted({f"{k}={v}" for r in runs for k, v in r.tags.items()})
        there = f"its tags: {'; '.join(tags)}" if tags else "it has no runs to choose from"
        raise ConfigError(f"--only {only!r} matches none of the {len(runs)} runs of {exp.name}; {there}")
    return chosen


def check_before_training(
    folder: Path, runs: list[Run], cfgs: list[TrainConfig], stack: bool | None, window: Window
) -> None:
    """What the unfinished runs need, checked before anything is written: their data, their stacks' memory."""
    unfinished = [(r, c) for r, c in zip(runs, cfgs, strict=True) if not _finished(folder, c)]
    check_data(c for _, c in unfinished)
    check_stacks_fit(folder, unfinished, stack, window)


def _finished(folder: Path, cfg: TrainConfig) -> bool:
    return (folder / cfg.run_name() / "summary.json").is_file()


def check_data(cfgs: Iterable[TrainConfig]) -> None:
    """Every data set the runs need loads and fits its model (a missing CIFAR-10 is said before
    anything is written, not after the first runs trained)."""
    from .. import models
    from ..build import load_data

    seen = set()
    for cfg in cfgs:
        if (cfg.model, cfg.dataset, cfg.data_dir) not in seen:
            seen.add((cfg.model, cfg.dataset, cfg.data_dir))
            load_data(cfg, models.get_spec(cfg.model))


def check_stacks_fit(
    folder: Path, unfinished: list[tuple[Run, TrainConfig]], stack: bool | None, window: Window
) -> None:
    """Refuse, before anything is written, a stack of unfinished runs that would not fit in memory
    (:func:`laperm.engine.stack_memory.check_stack_memory`; the fix: --no-stack)."""
    from ..engine.stack_memory import check_stack_memory
    from .stacking import stack_groups

    jobs: list[tuple[TrainConfig, dict[str, Any]]] = [
        (cfg, {}) for run, cfg in unfinished if run.hook is None and _stacks(stack, cfg, window, lambda m: None)
    ]
    for group in stack_groups(jobs, folder)[0]:
        members = [c for c, _ in group]
        try:
            check_stack_memory(members[0], [c.optimizer for c in members], resolve_device(members[0].device))
        except ConfigError as e:
            raise ConfigError(f"{e}; or train these runs alone with --no-stack") from None


def unfinished_first(runs: list[Run], folder: Path, cuda: bool = False) -> list[Run]:
    """``runs`` with the started, unfinished ones (a run folder with a config, no summary) first, in order."""

    def started(run: Run) -> bool:
        run_dir = folder / run.config(folder, cuda=cuda).run_name()
        return (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").is_file()

    return sorted(runs, key=lambda r: not started(r))


def _on_cuda(device: str | None) -> bool:
    return resolve_device(device or "auto").type == "cuda"


def _train_all(
    folder: Path,
    todo: list[tuple[Run, TrainConfig, dict[str, Any]]],
    parallel: int,
    manifest: dict[str, Any],
    window: Window,
    log: Callable[[str], None],
    stack: bool | None = None,
) -> dict[str, list[str]]:
    """Train ``todo`` (in this process, as stacks, or ``parallel`` processes); the folders finished,
    unfinished, not started."""
    import dataclasses

    outcome: dict[str, list[str]] = {"finished": [], "unfinished": [], "not started": []}
    deferred = []
    for run, cfg, entry in todo:
        cfg = dataclasses.replace(cfg, stop_at=window.deadline)
        stacked = _stacks(stack, cfg, window, log)
        if (parallel > 1 or stacked) and run.hook is None:  # (a hook's probe rides on callbacks: in this process only)
            deferred.append((run, cfg, entry, stacked))
            continue
        if not window.can_start():
            log(f"  {entry['folder']}: not started: too little time left ({max(window.left(), 0):.0f} s)")
            outcome["not started"].append(entry["folder"])
            continue
        outcome["finished" if _train_here(folder, run, cfg, entry, manifest, log) else "unfinished"].append(
            entry["folder"]
        )
    if deferred:
        for key, folders in _train_deferred(folder, deferred, parallel, manifest, window, log).items():
            outcome[key] += folders
    return outcome


def _stacks(stack: bool | None, cfg: TrainConfig, window: Window, log: Callable[[str], None]) -> bool:
    """Whether a run joins a stack: as asked, else on a CUDA device; never under a deadline (a stack
    does not stop at one yet: its runs train alone, each stopping cleanly)."""
    wanted = stack if stack is not None else _cfg_on_cuda(cfg)
    if wanted and window.deadline is not None:
        if stack:
            log(f"  {cfg.run_name()}: trains alone: stacked runs do not stop at a --deadline yet")
        return False
    return wanted


def _cfg_on_cuda(cfg: TrainConfig) -> bool:
    try:
        return resolve_device(cfg.device).type == "cuda"
    except ConfigError:  # (the run itself reports it)
        return False


def _train_deferred(
    folder: Path,
    deferred: list[tuple[Run, TrainConfig, dict[str, Any], bool]],
    parallel: int,
    manifest: dict[str, Any],
    window: Window,
    log: Callable[[str], None],
) -> dict[str, list[str]]:
    """The runs left for after the loop: stacks first (those marked for stacking), the others as
    ``parallel`` processes or in turn in this process."""
    from .stacking import stack_groups, train_stacks

    outcome: dict[str, list[str]] = {"finished": [], "unfinished": [], "not started": []}
    stacks, jobs = stack_groups([(c, e) for _, c, e, s in deferred if s], folder)
    stopped = train_stacks(folder, stacks, manifest, lambda: _save_manifest(folder, manifest), log)
    outcome["finished"] += [
        e["folder"] for group in stacks for _, e in group if str(folder / e["folder"]) not in stopped
    ]
    run_of = {e["folder"]: r for r, _, e, _ in deferred}
    alone = [(r, c, e) for r, c, e, s in deferred if not s]
    alone += [(run_of[e["folder"]], c, e) for c, e in jobs]  # (stack_groups hands back the runs that form no stack)
    if parallel > 1 and alone:
        for key, folders in _train_parallel(
            folder, [(c, e) for _, c, e in alone], parallel, manifest, window, log
        ).items():
            outcome[key] += folders
    for run, cfg, entry in alone if parallel == 1 else []:
        done = _train_here(folder, run, cfg, entry, manifest, log)
        outcome["finished" if done else "unfinished"].append(entry["folder"])
    if stopped:
        raise ExperimentError(f"{len(stopped)} stacked runs stopped early (NaN): {', '.join(stopped)}")
    return outcome


def _train_here(
    folder: Path,
    run: Run,
    cfg: TrainConfig,
    entry: dict[str, Any],
    manifest: dict[str, Any],
    log: Callable[[str], None],
) -> bool:
    """Train one run in this process; False if it stopped at its deadline (resumable)."""
    from ..engine import DeadlineReached, train
    from . import hooks

    run_dir = folder / cfg.run_name()
    resume = (run_dir / "config.yaml").is_file()
    probe = hooks.make(run.hook, cfg, run_dir)
    t0 = time.perf_counter()
    try:
        summary = train(cfg, resume=resume, callbacks=probe, log=log)
    except DeadlineReached as stop:
        log(f"  {stop}")
        manifest["runs"][entry["folder"]] = {**manifest["runs"].get(entry["folder"], {}), **entry}
        _save_manifest(folder, manifest)
        return False
    probe.finish(summary)
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    manifest["runs"][entry["folder"]] = entry
    _save_manifest(folder, manifest)
    return True


def _window_summary(name: str, outcome: dict[str, list[str]]) -> str:
    n = {k: len(v) for k, v in outcome.items()}
    text = f"[{name}] deadline: {n['finished']} finished, {n['unfinished']} unfinished (resumable), "
    text += f"{n['not started']} not started"
    if n["unfinished"] or n["not started"]:
        text += "; run the same command again to continue"
    return text


def _train_parallel(
    folder: Path,
    jobs: list[tuple[TrainConfig, dict[str, Any]]],
    parallel: int,
    manifest: dict[str, Any],
    window: Window,
    log: Callable[[str], None],
) -> dict[str, list[str]]:
    """Train ``jobs`` as ``laperm train --config`` processes, ``parallel`` at a time; record the started ones.

    Each gets its full config as a file (k_schedule has no flag) and its output in ``logs/run-<i>.log``.
    With a deadline, a run that stopped at it (exit 3) is unfinished, not failed, and none starts late.
    """
    from .parallel import NOT_STARTED, run_parallel

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
    start_before = None if window.deadline is None else window.deadline - window.min_start_s
    codes = run_parallel(commands, parallel, log_dir=logs, start_before=start_before)
    outcome: dict[str, list[str]] = {"finished": [], "unfinished": [], "not started": []}
    for (_, entry), code in zip(jobs, codes, strict=True):
        if code == 0:
            entry["wall_s"] = round(time.perf_counter() - t0, 1)  # (the batch's wall time: runs overlap)
        if code in (0, STOPPED_EXIT):
            manifest["runs"][entry["folder"]] = {**manifest["runs"].get(entry["folder"], {}), **entry}
        key = {0: "finished", STOPPED_EXIT: "unfinished", NOT_STARTED: "not started"}.get(code)
        if key is not None and window.deadline is not None:
            outcome[key].append(entry["folder"])
            if key != "finished":
                what = "stopped before the deadline" if code == STOPPED_EXIT else "not started: too little time left"
                log(f"  {entry['folder']}: {what} (resumable)")
    _save_manifest(folder, manifest)
    ok = (0, STOPPED_EXIT, NOT_STARTED) if window.deadline is not None else (0,)
    failed = [f"{logs / f'run-{i}.log'} (exit {c})" for i, c in enumerate(codes) if c not in ok]
    if failed:
        raise ExperimentError(
            f"{len(failed)} of {len(jobs)} runs failed: see {', '.join(failed)}; `laperm run` again resumes them"
        )
    return outcome


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
