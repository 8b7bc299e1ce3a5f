"""Engine throughput: ``laperm train`` against a bare hand-written PyTorch loop.

Both train the same lenet300 (same θ0), with the same LaPerm(Adam) optimizer
(k = 100, the default), batch size (128) and training images (MNIST minus the
5,000 held out for validation; synthetic data with ``quick``), for the same
number of epochs.  The bare loop indexes a pre-normalised float tensor with a
fresh permutation per epoch: about the fastest loop one would write by hand.
The engine runs twice, with ``--no-progress`` and with its progress bar drawn
(to a stand-in terminal: tqdm switches itself off when stderr is not one).  A
second bare loop gives the noise floor.  Contenders run interleaved in random
order, ``rounds`` times.

**Per-step timing.**  A forward pre-hook on each model stamps the time of
every training forward pass, so the interval between two of them is one whole
iteration of the loop: data, forward, backward, LaPerm step and sync, and (in
the engine) its sync check, loss/accuracy bookkeeping, progress bar.  Steps
are grouped by what happens in them: a LaPerm sync (every 100th step), the
engine's display update with its host sync (every 25th), or nothing special;
the time per step is the frequency-weighted sum of each group's quantile (lower
quartile of CPU time, median of wall time).  Quantiles ignore the steps that
other processes' load slowed down; the grouping keeps the periodic costs in.
Time outside the loop (building the model, evaluation, checkpoints) is not
training throughput; the whole ``train()`` call is reported for information,
and so is the plain ratio of whole-epoch times (noisier).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import laperm.engine.trainer as trainer_module
import laperm.train as engine_module
from laperm.config import resolve_config
from laperm.data import load_dataset, train_val_split
from laperm.data.loader import derive_seed
from laperm.rundir import read_metrics

from .common import interleave, median, quantile

TARGET = 0.95
K = 100  # the default sync period of `laperm train`
DISPLAY_EVERY = 25  # the engine's display update (a host sync) period


class _FakeTTY(io.StringIO):
    """A stderr that claims to be a terminal, so that tqdm draws its bar (into memory)."""

    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def _progress_to_fake_tty() -> Iterator[None]:
    saved, sys.stderr = sys.stderr, _FakeTTY()
    try:
        yield
    finally:
        sys.stderr = saved


class StepClock:
    """Forward pre-hook recording (wall, cpu) at every training forward pass."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        model.register_forward_pre_hook(self._hook)
        return model

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        if module.training:
            self.stamps.append((time.perf_counter(), time.process_time()))

    def intervals(self) -> list[tuple[int, float, float]]:
        """(step number, wall s, cpu s) of every step followed by another forward (1 epoch runs)."""
        s = self.stamps
        return [(i + 1, s[i + 1][0] - s[i][0], s[i + 1][1] - s[i][1]) for i in range(len(s) - 1)]


def _config(out: Path, quick: bool, progress: bool, epochs: int):
    layers = {
        "model": "lenet300",
        "epochs": epochs,
        "out": str(out),
        "name": f"engine-{int(progress)}",
        "progress": progress,
        "device": "cpu",
        "lr_schedule": "constant",
        "k": K,
    }
    if quick:
        layers.update(dataset="synthetic", val_size=64)
    return resolve_config(layers)


def engine_run(out: Path, quick: bool, progress: bool, epochs: int) -> dict:
    """One ``train()``: its step intervals, loop seconds (its own record) and whole-call seconds."""
    cfg = _config(out, quick, progress, epochs)
    clock = StepClock()
    build = engine_module.build_model

    def build_and_clock(*args, **kwargs):
        model, masks = build(*args, **kwargs)
        return clock.attach(model), masks

    start = time.perf_counter()
    with (
        mock.patch.object(trainer_module, "build_model", build_and_clock),
        _progress_to_fake_tty() if progress else contextlib.nullcontext(),
    ):
        engine_module.train(cfg, overwrite=True, log=lambda line: None)
    total = time.perf_counter() - start
    records = read_metrics(out / cfg.run_name() / "metrics.jsonl")
    return {"steps": clock.intervals(), "loop_s": sum(r["epoch_time_s"] for r in records), "total_s": total}


class BareLoop:
    """The hand-written loop: same model, optimizer, batches and images as the engine."""

    def __init__(self, quick: bool, epochs: int) -> None:
        self.cfg = _config(Path("unused"), quick, False, epochs)
        ds = load_dataset(self.cfg.dataset or "mnist")
        idx, _ = train_val_split(len(ds.train_y), self.cfg.val_size, derive_seed(self.cfg.seed, 3))
        self.x = ((ds.train_x[idx].float() / 255 - ds.mean[0]) / ds.std[0]).contiguous()
        self.y = ds.train_y[idx]

    def run(self) -> dict:
        clock = StepClock()
        model, _ = engine_module.build_model(self.cfg, torch.device("cpu"))
        clock.attach(model)
        opt = engine_module.build_optimizer(self.cfg, model)
        g = torch.Generator().manual_seed(0)
        n, bs = len(self.y), self.cfg.batch_size
        model.train()
        start = time.perf_counter()
        for _ in range(self.cfg.epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, bs):
                rows = order[i : i + bs]
                loss = F.cross_entropy(model(self.x[rows]), self.y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        opt.sync()  # the engine ends on a sync too
        loop = time.perf_counter() - start
        return {"steps": clock.intervals(), "loop_s": loop, "total_s": loop}


def _kind(step: int) -> str:
    return "sync" if step % K == 0 else "display" if step % DISPLAY_EVERY == 0 else "plain"


def seconds_per_step(runs: list[dict], clock: int, q: float) -> float:
    """Frequency-weighted quantiles of the step groups, pooled over ``runs`` (clock 1: wall, 2: cpu)."""
    groups: dict[str, list[float]] = {}
    for run in runs:
        for step in run["steps"]:
            groups.setdefault(_kind(step[0]), []).append(step[clock])
    n = sum(len(v) for v in groups.values())
    return sum(len(v) / n * quantile(v, q) for v in groups.values())


def run(quick: bool = False) -> dict:
    epochs, rounds = (1, 1) if quick else (1, 5)
    bare = BareLoop(quick, epochs)
    with tempfile.TemporaryDirectory(prefix="laperm-bench-") as tmp:
        out = Path(tmp)
        samples = interleave(
            {
                "bare loop": bare.run,
                "bare loop, again (noise floor)": bare.run,
                "laperm train --no-progress": lambda: engine_run(out, quick, False, epochs),
                "laperm train (progress bar)": lambda: engine_run(out, quick, True, epochs),
            },
            rounds,
        )
    images = len(bare.y) * epochs  # the engine trains on the same images
    base = samples["bare loop"]
    t_cpu, t_wall = seconds_per_step(base, 2, 0.25), seconds_per_step(base, 1, 0.5)
    rows = []
    for name, runs in samples.items():
        cpu, wall = seconds_per_step(runs, 2, 0.25), seconds_per_step(runs, 1, 0.5)
        ratio = t_cpu / cpu  # throughput ratio: > 1 is faster than the bare loop
        epoch_ratio = median([b["loop_s"] / r["loop_s"] for r, b in zip(runs, base)])
        rows.append(
            {
                "runner": name,
                "images": images,
                "batch": bare.cfg.batch_size,
                "images_per_s": bare.cfg.batch_size / cpu,
                "ratio": ratio,
                "ratio_wall": t_wall / wall,
                "ratio_epoch": epoch_ratio,
                "end_to_end_s": median([r["total_s"] for r in runs]),
                "met": None if name.startswith("bare") else ratio >= TARGET,
            }
        )
    return {"epochs": epochs, "rounds": rounds, "dataset": "synthetic" if quick else "mnist", "rows": rows}
