"""Training overhead: steps per second of LaPerm(Adam) against plain Adam.

For each model, Adam and LaPerm(Adam) each train their own copy of the same
initial network on the same batches (MNIST, or synthetic with ``quick``), with
the paper's batch size and the engine's optimizer settings and loss (cross
entropy plus the model's L2 term).  Contenders run in chunks of ``C`` steps;
one round runs one chunk of each, in a random order, and *every step is timed
on its own*.

On a busy machine many steps are slowed by other processes (now and then
several-fold), so each contender's cost is a *quantile* of its step times:
the lower quartile (``q = 0.25``) estimates the undisturbed cost of a step,
interference only ever adding time; the median is reported too.  A LaPerm
contender's steps are of two kinds: plain steps, and steps that end in a
sync.  Its time per step at period ``k`` is

    t(k) = Q(plain steps) + (Q(sync steps) - Q(plain steps)) / k

measured inside training (a sync's effect on the caches of its own step is
included).  The contenders are Adam; a second, identical Adam (its ratio to
the first is the noise floor of the run); LaPerm with ``k = 1`` (every step a
sync: ``t(1)`` is the quantile of all its steps) and ``k = 20``; and one LaPerm
whose step counter is set so that each chunk holds exactly one sync, which
gives ``t(250)`` and ``t(1000)`` (a contender with ``k = 1000`` would see one
sync per 1,000 steps: too few for a quantile).

Times are CPU time of the process (other processes' load disturbs it less
than wall time; equal to wall time for a single-threaded run, ``--threads 1``)
and wall time.

**Built from parts.**  On this shared machine even two *identical* Adam
contenders differ by a few per cent (see the noise-floor column: load, and
where each model's tensors happen to sit in memory and caches), more than the
overhead being measured.  So the ratio is also built from LaPerm's two costs,
each measured so that this noise cancels:

* ``per_step_us``: LaPerm's own work in a step without a sync, its ``step``
  minus its inner optimizer's, with a no-op inner optimizer over the model's
  param groups (CPU time, many repeats);
* ``sync_ms``: ``Q(sync steps) - Q(plain steps)`` of the *same* LaPerm
  contender (one model, so placement effects cancel);

and ``ratio(k) = 1 + (per_step + sync / k) / Q(plain steps)``.  Targets are
judged on it; the direct ratios are shown next to it with their noise floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from laperm import models
from laperm.config import TrainConfig, resolve_config
from laperm.data import load_dataset
from laperm.optim import LaPerm, laperm_param_groups
from laperm.train import build_model, build_optimizer

from .common import interleave, median, quantile

KS = (1, 20, 250, 1000)
CLOCKS = ("cpu", "wall")


@dataclass(frozen=True)
class Case:
    model: str
    layers: dict  # config fields: preset or model + init
    batch_size: int
    chunk: int  # steps per chunk (a multiple of 20)
    rounds: int
    targets: dict  # k -> max ratio


CASES = (
    Case("f2", {"preset": "f2"}, 128, 20, 50, {20: 1.15, 250: 1.02}),
    Case("lenet300", {"model": "lenet300"}, 128, 20, 40, {20: 1.15, 250: 1.02}),
    Case("conv7", {"preset": "conv7"}, 50, 20, 4, {250: 1.01, 1000: 1.01}),
)


def _batches(batch_size: int, n: int, quick: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed training batches, normalised as the engine's loader does."""
    ds = load_dataset("synthetic", n_train=batch_size * n, n_test=16) if quick else load_dataset("mnist")
    mean, std = ds.mean[0], ds.std[0]
    x = (ds.train_x[: batch_size * n].float() / 255 - mean) / std
    y = ds.train_y[: batch_size * n]
    return [(x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]) for i in range(n)]


class Contender:
    """A model and optimizer training on the shared batches; records every step's time.

    ``before_chunk(opt)`` runs (untimed) before every chunk.
    """

    def __init__(
        self, cfg: TrainConfig, batches: list, before_chunk: Callable[[torch.optim.Optimizer], None] | None = None
    ) -> None:
        self.model, _ = build_model(cfg, torch.device("cpu"))
        self.opt = build_optimizer(cfg, self.model)
        spec = models.get_spec(cfg.model)
        self.l2 = spec.l2 if cfg.l2 is None else cfg.l2
        self.l2_params = self.model.l2_parameters() if self.l2 else []
        self.batches, self.pos = batches, 0
        self.before_chunk = before_chunk
        # per clock: times of plain steps and of steps that ended in a sync
        self.times: dict[str, dict[bool, list[float]]] = {c: {False: [], True: []} for c in CLOCKS}
        self.model.train()

    def _synced_now(self) -> bool:
        groups = self.opt.param_groups
        return isinstance(self.opt, LaPerm) and groups[0]["laperm_step"] % groups[0]["k"] == 0

    def run(self, steps: int, record: bool = True) -> None:
        if self.before_chunk is not None:
            self.before_chunk(self.opt)
        model, opt = self.model, self.opt
        for _ in range(steps):
            x, y = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            wall, cpu = time.perf_counter(), time.process_time()
            loss = F.cross_entropy(model(x), y)
            if self.l2_params:
                loss = loss + self.l2 * sum(p.pow(2).sum() for p in self.l2_params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if record:
                synced = self._synced_now()
                self.times["cpu"][synced].append(cpu)
                self.times["wall"][synced].append(wall)

    def per_step(self, clock: str, k: int | None, q: float = 0.25) -> float:
        """Seconds per step at sync period ``k`` (None: no syncs, e.g. Adam), from quantile ``q``."""
        plain, synced = self.times[clock][False], self.times[clock][True]
        if k is None or not synced:
            return quantile(plain, q)
        if not plain:  # k = 1: every step syncs
            return quantile(synced, q)
        return quantile(plain, q) + (quantile(synced, q) - quantile(plain, q)) / k

    def sync_cost(self, clock: str, q: float = 0.25) -> float:
        return quantile(self.times[clock][True], q) - quantile(self.times[clock][False], q)


def _one_sync_per_chunk(chunk: int) -> Callable[[torch.optim.Optimizer], None]:
    """Set the step counters so that the chunk's middle step ends in a sync."""

    def before(opt: torch.optim.Optimizer) -> None:
        for g in opt.param_groups:
            g["laperm_step"] = g["k"] - chunk // 2

    return before


class _NoOp(torch.optim.Optimizer):
    """An inner optimizer that does nothing: what is left of a LaPerm step is LaPerm's own work."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    def step(self, closure=None) -> None:
        return None


def _cpu_mean(fn: Callable[[], None], number: int) -> float:
    t = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - t) / number


def per_step_cost(model: torch.nn.Module, cfg: TrainConfig, quick: bool) -> float:
    """CPU seconds LaPerm.step adds to its inner optimizer's step when no sync is due."""
    spec = models.get_spec(cfg.model)
    permute_biases = spec.permute_biases if cfg.permute_biases is None else cfg.permute_biases
    inner = _NoOp(laperm_param_groups(model, permute_biases=permute_biases))
    wrapped = LaPerm(inner, k=2**62)
    number, repeats = (200, 3) if quick else (2000, 15)
    diffs = [_cpu_mean(wrapped.step, number) - _cpu_mean(inner.step, number) for _ in range(repeats)]
    return max(median(diffs), 0.0)


def run_case(case: Case, quick: bool = False) -> dict:
    chunk, rounds = (20, 2) if quick else (case.chunk, case.rounds)
    batches = _batches(case.batch_size, 8, quick)
    base = resolve_config(case.layers)

    def cfg(optimizer: str, k: int = 1) -> TrainConfig:
        return TrainConfig(**{**base.to_dict(), "optimizer": optimizer, "k": k})

    contenders = {
        "adam": Contender(cfg("adam"), batches),
        "adam'": Contender(cfg("adam"), batches),
        1: Contender(cfg("laperm", 1), batches),
        20: Contender(cfg("laperm", 20), batches),
        "one sync per chunk": Contender(cfg("laperm", 10**6), batches, _one_sync_per_chunk(chunk)),
    }
    for c in contenders.values():  # warm-up (optimizer state, allocator, caches), not recorded
        c.run(min(chunk, 5), record=False)
    interleave({n: (lambda c=c: c.run(chunk)) for n, c in contenders.items()}, rounds)
    big = contenders["one sync per chunk"]
    row: dict = {
        "model": case.model,
        "init": base.init,
        "batch": case.batch_size,
        "chunk": chunk,
        "rounds": rounds,
        "targets": case.targets,
        "per_step_us": 1e6 * per_step_cost(big.model, base, quick),
    }
    for clock in CLOCKS:
        for q, name in ((0.25, "q1"), (0.5, "median")):
            adam = contenders["adam"].per_step(clock, None, q)
            res = {
                "adam_steps_per_s": 1 / adam,
                "control_ratio": contenders["adam'"].per_step(clock, None, q) / adam,
                "no_sync_ratio": big.per_step(clock, None, q) / adam,
                "sync_ms": 1e3 * big.sync_cost(clock, q),
            }
            for k in KS:
                t = contenders[k].per_step(clock, k, q) if k in contenders else big.per_step(clock, k, q)
                res[f"steps_per_s_k{k}"] = 1 / t
                res[f"ratio_k{k}"] = t / adam
            row[f"{clock}_{name}"] = res
    plain = big.per_step("cpu", None)  # LaPerm's own plain step (lower quartile, CPU)
    sync = big.sync_cost("cpu")
    row["plain_step_ms"], row["sync_ms"] = 1e3 * plain, 1e3 * sync
    row["parts"] = {k: 1 + (row["per_step_us"] / 1e6 + sync / k) / plain for k in KS}
    return row


def run(quick: bool = False, names: tuple[str, ...] | None = None) -> list[dict]:
    """One row per model (``quick``: F2 only, a few small chunks)."""
    names = names or (("f2",) if quick else tuple(c.model for c in CASES))
    return [run_case(c, quick) for c in CASES if c.model in names]
