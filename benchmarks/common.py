"""Shared helpers of the benchmarks: machine description, interleaved timing, tables.

The machine these numbers come from is shared and often busy, so every
benchmark times the things it compares *in the same process, interleaved*
(rotating their order each round) and reports medians and ratios: a burst of
load then slows all contenders alike instead of one of them.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import random
import statistics
from collections.abc import Callable, Sequence

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, str]:
    """What the numbers were measured on (and how busy it was when this was called)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} ({usable} usable)",
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load average (1/5/15 min)": load_average(),
    }


def interleave(samplers: dict[str, Callable[[], object]], rounds: int, seed: int = 0) -> dict[str, list]:
    """Call every sampler once per round, in a fresh random order each round; returns each one's samples.

    A sampler runs one timed piece of work and returns its timing.  Random
    orders (rather than a fixed rotation) keep any contender from always
    following the same one, whose leftovers (cold caches, garbage) it would
    otherwise pay for; a full garbage collection before every sample makes
    each contender pay for its own garbage only.
    """
    rng = random.Random(seed)
    names = list(samplers)
    out: dict[str, list] = {n: [] for n in names}
    for _ in range(rounds):
        for name in rng.sample(names, len(names)):
            gc.collect()
            out[name].append(samplers[name]())
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (linear interpolation between order statistics)."""
    return float(np.quantile(np.asarray(xs, dtype=np.float64), q))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (also readable as plain text)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def mark(ok: bool | None) -> str:
    """Target column: met, missed or no target."""
    return "" if ok is None else ("yes" if ok else "**NO**")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f}"
