"""Stacked training throughput: N runs trained as one stacked model against one run alone (issue 22).

:func:`stacked_throughput` times the stacked training step of the engine
(:mod:`laperm.engine.stacked`): every member's batch stacked, one vmapped forward/backward
(:class:`laperm.models.stacked.StackedModel`), one Adam step over the stacked tensors, and each
LaPerm member's count and sync of its own rows every k steps. Batches are synthetic images of the
model's input shape already on the device (no loader: the step itself is measured). It warms up,
then runs whole multiples of k steps for about ``seconds``, timed with a device sync at both ends,
and reports the aggregate images/s of all members. :func:`single_throughput` is the same for one
unstacked run (LaPerm(Adam) step), the reference the ratios are taken against.

``mode`` (default: fast on CUDA, eager elsewhere) is the engine's: ``eager`` times the plain steps;
``fast`` times the fast path -- the stack's :class:`~laperm.engine.stack_step.StackStep` (on CUDA one
CUDA graph, fused capturable Adam) with every member's sync as one
(:meth:`~laperm.optim.LaPerm.sync_together`), against one run's
:class:`~laperm.fast.step.DeviceStep`.

Both are plain functions of simple arguments returning a dict, so that a harness may run each
contender in its own process. ``python -m benchmarks.stacked --device cuda`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from laperm import models
from laperm.engine.stack_step import StackStep
from laperm.fast.step import DeviceStep, make_adam
from laperm.models.stacked import LossSpec, StackedModel
from laperm.optim import LaPerm, laperm_param_groups

from . import isolate

MODELS = ("conv2", "conv7", "resnet50")
MEMBERS = (1, 4, 8, 16)
BATCH, K = 50, 20  # the presets' batch and a typical k
TIMEOUT_S = 120.0  # one measurement, its process start and warm-up included


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(name: str, n: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    spec = models.get_spec(name)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, batch, *spec.input_shape, device=device, generator=g)
    return x, torch.randint(0, spec.num_classes, (n, batch), device=device, generator=g)


def _timed(step: Any, device: torch.device, seconds: float, k: int, warmup: int) -> tuple[int, float]:
    for _ in range(warmup):
        step()
    _sync(device)
    t0, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - t0 < seconds:
        for _ in range(k):
            step()
        done += k
        _sync(device)
    return done, time.perf_counter() - t0


def default_mode(device: str) -> str:
    return "fast" if torch.device(device).type == "cuda" else "eager"


def stacked_throughput(
    model: str,
    members: int,
    device: str = "cuda",
    seconds: float = 10.0,
    batch: int = BATCH,
    k: int = K,
    mode: str | None = None,
) -> dict[str, Any]:
    """Aggregate images/s of ``members`` LaPerm(Adam) runs of ``model`` trained as one stack."""
    dev, mode = torch.device(device), mode or default_mode(device)
    nets = [models.build(model, seed=s).to(dev) for s in range(members)]
    stack = StackedModel(nets)
    x, y = _data(model, members, batch, dev)
    if mode == "fast":
        opt = make_adam(stack.parameters(), lr=1e-3, eps=1e-8, device=dev)
        totals = (
            torch.zeros(members, dtype=torch.float64, device=dev),
            torch.zeros(members, dtype=torch.int64, device=dev),
        )
        graphed = StackStep(stack, opt, LossSpec(), totals, vectorize=True, graph=dev.type == "cuda")
        # each member's LaPerm: no inner step of its own (its parameters get no gradient), its count and sync
        syncs = [LaPerm(make_adam(laperm_param_groups(m), lr=1e-3, eps=1e-8, device=dev), k=k) for m in nets]

        def step() -> None:
            graphed(x, y)
            LaPerm.sync_together(syncs)

    else:
        plain = torch.optim.Adam(stack.parameters(), lr=1e-3)
        syncs = [LaPerm(torch.optim.Adam(laperm_param_groups(m), lr=1e-3), k=k) for m in nets]

        def step() -> None:
            stack.train_pass(x, y, LossSpec(), vectorize=True)
            plain.step()
            for s in syncs:
                s.after_inner_step()

    steps, wall = _timed(step, dev, seconds, k, warmup=3 if mode == "eager" else 5)
    return {
        "model": model,
        "mode": mode,
        "members": members,
        "batch": batch,
        "k": k,
        "device": device,
        "steps": steps,
        "images_per_s": members * batch * steps / wall,
    }


def single_throughput(
    model: str, device: str = "cuda", seconds: float = 10.0, batch: int = BATCH, k: int = K, mode: str | None = None
) -> dict[str, Any]:
    """Images/s of one unstacked LaPerm(Adam) run of ``model`` (the engine's eager step, or fast mode's DeviceStep)."""
    dev, mode = torch.device(device), mode or default_mode(device)
    net = models.build(model, seed=0).to(dev)
    x, y = _data(model, 1, batch, dev)
    if mode == "fast":
        fast = DeviceStep(net, LaPerm(make_adam(laperm_param_groups(net), lr=1e-3, eps=1e-8, device=dev), k=k))

        def step() -> None:
            fast(x[0], y[0])

    else:
        opt = LaPerm(torch.optim.Adam(laperm_param_groups(net), lr=1e-3), k=k)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[0]), y[0]).backward()
            opt.step()

    steps, wall = _timed(step, dev, seconds, k, warmup=3 if mode == "eager" else 5)
    return {
        "model": model,
        "mode": mode,
        "members": 0,
        "batch": batch,
        "k": k,
        "device": device,
        "images_per_s": batch * steps / wall,
    }


def run(
    device: str = "cuda",
    quick: bool = False,
    names: tuple[str, ...] = MODELS,
    sizes: tuple[int, ...] = MEMBERS,
    seconds: float = 8.0,
    log: Any = print,
    mode: str | None = None,
) -> list[dict[str, Any]]:
    """Rows for every model and stack size, each with ``ratio``: its images/s over one run's.

    Every measurement is a process of its own (:mod:`benchmarks.isolate`): an out-of-memory stack or a
    broken CUDA context stays there, and becomes a row holding its error while the other rows still run."""
    if quick:
        names, sizes, seconds = names[:1], sizes[:2], 0.2
    (batch, k), mode = (8, 2) if quick else (BATCH, K), mode or default_mode(device)
    common = ["--device", device, "--seconds", str(seconds), "--batch", str(batch), "--k", str(k), "--mode", mode]
    rows = []
    for name in names:
        single, single_error = isolate.run_isolated("benchmarks.stacked", ["single", name, *common], TIMEOUT_S)
        for n in sizes:
            args = ["stacked", name, "--members", str(n), *common]
            r, error = isolate.run_isolated("benchmarks.stacked", args, TIMEOUT_S)
            error = single_error or error
            ident = {"model": name, "members": n, "batch": batch, "k": k, "device": device, "mode": mode}
            row = {**ident, "steps": None, "images_per_s": None, **(r or {}), "error": error}
            row["single_images_per_s"] = single["images_per_s"] if single else None
            row["ratio"] = row["images_per_s"] / single["images_per_s"] if single and r else None
            rows.append(row)
            log(f"FAILED stacked {name} N={n}:\n{error['traceback']}" if error else json.dumps(row))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | mode | runs stacked | aggregate images/s | one run images/s | ratio |\n|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r.get('mode', '')} | {r['members']} | **failed** (exit {r['error']['returncode']}) | | |\n"
        if r.get("error")
        else f"| {r['model']} | {r['mode']} | {r['members']} | {r['images_per_s']:,.0f} | {r['single_images_per_s']:,.0f} "
        f"| {r['ratio']:.2f} |\n"
        for r in rows
    )
    return head + body


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["single"], ["stacked"]):
        return _contender(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stacked", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--members", default=",".join(map(str, MEMBERS)))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mode", choices=["eager", "fast"], default=None, help="default: fast on CUDA, eager elsewhere")
    a = ap.parse_args(argv)
    models_, sizes = tuple(a.models.split(",")), tuple(int(n) for n in a.members.split(","))
    print(markdown(run(a.device, a.quick, models_, sizes, a.seconds, mode=a.mode)))
    return 0


def _contender(argv: list[str]) -> int:
    """The child side: one measurement (``single NAME`` or ``stacked NAME --members N``) into ``--result``."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stacked single|stacked")
    ap.add_argument("role", choices=["single", "stacked"])
    ap.add_argument("model")
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--mode", choices=["eager", "fast"], default=None)
    ap.add_argument("--result", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.role == "single":
        fn = lambda: single_throughput(a.model, a.device, a.seconds, batch=a.batch, k=a.k, mode=a.mode)  # noqa: E731
    else:
        fn = lambda: stacked_throughput(a.model, a.members, a.device, a.seconds, batch=a.batch, k=a.k, mode=a.mode)  # noqa: E731
    return isolate.child_main(f"stacked:{a.model}:{a.role}:{a.members}", a.result, fn)


if __name__ == "__main__":
    sys.exit(main())
