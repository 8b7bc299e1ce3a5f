"""Run several training commands at once on one device: the launcher behind ``laperm run --parallel N``.

Small networks at batch 50 leave most of a GPU idle; N independent runs (seeds, the Adam
baselines) side by side fill it.  Each run is its own process (its own CUDA context and caching
allocator, its own crash), started as soon as a slot is free; the launcher returns every
command's exit code, in the order given.  If the launcher is interrupted (Ctrl-C, SIGTERM raised
as an exception) it terminates the runs it started; if it dies outright, each child's
parent-death guard (:func:`laperm.launch.parent_death_preexec`) ends the child too.

``laperm run EXPERIMENT --parallel N`` builds one ``laperm train --config ...`` command per run
(:func:`laperm.experiments.base.run_experiment`) and calls :func:`run_parallel`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ..launch import parent_death_preexec

__all__ = ["run_parallel", "NOT_STARTED"]

NOT_STARTED = -1  # the exit code given to a command never started (``start_before`` passed)


def run_parallel(
    commands: Sequence[Sequence[str]],
    parallel: int,
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    poll_s: float = 0.1,
    start_before: float | None = None,
) -> list[int]:
    """Run ``commands`` (argument lists), at most ``parallel`` at a time; their exit codes, in order.

    ``log_dir``: each command's stdout and stderr go to ``log_dir/run-<i>.log`` (else inherited).
    ``start_before``: a Unix time after which no command is started (those get :data:`NOT_STARTED`).
    """
    from ..engine import guards

    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1 (runs at once), got {parallel!r}")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    codes: list[int | None] = [None] * len(commands)
    running: dict[int, subprocess.Popen] = {}
    waiting = list(range(len(commands)))
    try:
        while waiting or running:
            if start_before is not None and waiting and guards.clock() >= start_before:
                waiting.clear()  # too late to start any more
            while waiting and len(running) < parallel:
                i = waiting.pop(0)
                running[i] = _start(commands[i], env, None if log_dir is None else log_dir / f"run-{i}.log")
            for i, proc in list(running.items()):
                if proc.poll() is not None:
                    codes[i] = proc.returncode
                    del running[i]
            if running:
                time.sleep(poll_s)
    finally:
        _stop(running.values())
    return [c if c is not None else NOT_STARTED for c in codes]


def _start(command: Sequence[str], env: Mapping[str, str] | None, log: Path | None) -> subprocess.Popen:
    out = open(log, "w") if log is not None else None
    try:
        return subprocess.Popen(
            list(command),
            env=None if env is None else {**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            preexec_fn=_child_guard(os.getpid()),
        )
    finally:
        if out is not None:
            out.close()  # the child holds its own copy of the descriptor


def _child_guard(parent: int) -> Callable[[], None]:
    """What each child runs between fork and exec: it dies with this launcher, even after a SIGKILL."""
    return parent_death_preexec(parent)


def _stop(children: Iterable[subprocess.Popen]) -> None:
    """Terminate the still-running children, then wait for them (kill after 10 s)."""
    procs = list(children)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
