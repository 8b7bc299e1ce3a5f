"""``laperm run``'s stacks: an experiment's runs that differ only in seed and optimizer train as one
stacked model (:func:`laperm.engine.stack_session.train_stack`), each still in its own run folder.

Runs in fast mode stack too (e.g. the paper experiment's ``on_cuda`` settings, mode fast with
channels_last): the stack then trains on the fast path. Runs that cannot stack (a different model,
a language model, an analysis hook, a run already started alone) train one by one as before.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..engine.stack_session import VARYING, stackable_reason, train_stack
from ..engine.stacked import read_stack_file

__all__ = ["stack_groups", "train_stacks"]

Job = tuple[TrainConfig, dict[str, Any]]  # a run's config and its manifest entry


def stack_groups(jobs: list[Job], folder: Path) -> tuple[list[list[Job]], list[Job]]:
    """``jobs`` as stacks (two or more runs that can train as one) and the runs left to train alone."""
    by_key: dict[str, list[Job]] = {}
    for job in jobs:
        key = json.dumps({k: v for k, v in job[0].to_dict().items() if k not in VARYING}, sort_keys=True, default=str)
        by_key.setdefault(key, []).append(job)
    stacks, alone = [], []
    for group in by_key.values():
        cfgs = [c for c, _ in group]
        if len(group) > 1 and stackable_reason(cfgs) is None and _fresh_or_one_stack(cfgs, folder):
            stacks.append(group)
        else:
            alone += group
    return stacks, alone


def _fresh_or_one_stack(cfgs: list[TrainConfig], folder: Path) -> bool:
    """None of the runs started yet, or all of them started as this very stack (it resumes)."""
    dirs = [folder / c.run_name() for c in cfgs]
    started = [(d / "config.yaml").is_file() for d in dirs]
    if not any(started):
        return True
    if not all(started):
        return False
    bodies = [read_stack_file(d) for d in dirs]
    names = {d.name for d in dirs}
    return all(b is not None and set(b["members"]) == names for b in bodies)


def train_stacks(
    folder: Path,
    stacks: list[list[Job]],
    manifest: dict[str, Any],
    save: Callable[[], None],
    log: Callable[[str], None],
) -> list[str]:
    """Train each stack; record the finished runs in ``manifest``; the folders of runs that stopped early."""
    stopped: list[str] = []
    for group in stacks:
        cfgs = [c for c, _ in group]
        resume = (folder / cfgs[0].run_name() / "config.yaml").is_file()
        body = read_stack_file(folder / cfgs[0].run_name()) if resume else None
        gone = set((body or {}).get("stopped") or {})  # members that stopped early stay stopped
        cfgs = [c for c in cfgs if c.run_name() not in gone]
        log(f"stacking {len(cfgs)} runs: {', '.join(c.run_name() for c in cfgs)}")
        t0 = time.perf_counter()
        summaries = train_stack(cfgs, resume=resume, log=log)
        finished = {s["run"] for s in summaries}
        for cfg, entry in group:
            if cfg.run_name() in finished:
                entry["wall_s"] = round(time.perf_counter() - t0, 1)  # (the stack's wall time: its runs overlap)
                entry["stacked"] = len(cfgs)
                manifest["runs"][entry["folder"]] = entry
            else:
                stopped.append(str(folder / cfg.run_name()))
        save()
    return stopped
