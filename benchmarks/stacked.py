"""Stacked training throughput: N runs trained as one stacked model against one run alone (issue 22).

:func:`stacked_throughput` times the stacked training step of the engine
(:mod:`laperm.engine.stacked`): every member's batch stacked, one vmapped forward/backward
(:class:`laperm.models.stacked.StackedModel`), one Adam step over the stacked tensors, and each
LaPerm member's count and sync of its own rows every k steps. Batches are synthetic images of the
model's input shape already on the device (no loader: the step itself is measured). It warms up,
then runs whole multiples of k steps for about ``seconds``, timed with a device sync at both ends,
and reports the aggregate images/s of all members. :func:`single_throughput` is the same for one
unstacked run (eager LaPerm(Adam) step), the reference the ratios are taken against.

Both are plain functions of simple arguments returning a dict, so that a harness may run each
contender in its own process. ``python -m benchmarks.stacked --device cuda`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from laperm import models
from laperm.models.stacked import LossSpec, StackedModel
from laperm.optim import LaPerm, laperm_param_groups

MODELS = ("conv2", "conv7", "resnet50")
MEMBERS = (1, 4, 8, 16)
BATCH, K = 50, 20  # the presets' batch and a typical k


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


def stacked_throughput(
    model: str, members: int, device: str = "cuda", seconds: float = 10.0, batch: int = BATCH, k: int = K
) -> dict[str, Any]:
    """Aggregate images/s of ``members`` LaPerm(Adam) runs of ``model`` trained as one stack."""
    dev = torch.device(device)
    nets = [models.build(model, seed=s).to(dev) for s in range(members)]
    stack = StackedModel(nets)
    opt = torch.optim.Adam(stack.parameters(), lr=1e-3)
    # each member's LaPerm: no inner step of its own (its parameters get no gradient), its count and sync
    syncs = [LaPerm(torch.optim.Adam(laperm_param_groups(m), lr=1e-3), k=k) for m in nets]
    x, y = _data(model, members, batch, dev)

    def step() -> None:
        stack.train_pass(x, y, LossSpec(), vectorize=True)
        opt.step()
        for s in syncs:
            s.step()

    steps, wall = _timed(step, dev, seconds, k, warmup=3)
    return {
        "model": model,
        "members": members,
        "batch": batch,
        "k": k,
        "device": device,
        "steps": steps,
        "images_per_s": members * batch * steps / wall,
    }


def single_throughput(
    model: str, device: str = "cuda", seconds: float = 10.0, batch: int = BATCH, k: int = K
) -> dict[str, Any]:
    """Images/s of one unstacked eager LaPerm(Adam) run of ``model`` (the engine's eager step)."""
    dev = torch.device(device)
    net = models.build(model, seed=0).to(dev)
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(net), lr=1e-3), k=k)
    x, y = _data(model, 1, batch, dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[0]), y[0]).backward()
        opt.step()

    steps, wall = _timed(step, dev, seconds, k, warmup=3)
    return {
        "model": model,
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
) -> list[dict[str, Any]]:
    """Rows for every model and stack size, each with ``ratio``: its images/s over one run's."""
    if quick:
        names, sizes, seconds = names[:1], sizes[:2], 0.2
    rows = []
    for name in names:
        single = single_throughput(name, device, seconds, batch=8 if quick else BATCH, k=2 if quick else K)
        for n in sizes:
            try:
                r = stacked_throughput(name, n, device, seconds, batch=8 if quick else BATCH, k=2 if quick else K)
            except Exception as e:  # noqa: BLE001 (e.g. out of memory at N=16: reported, the others go on)
                log(f"FAILED stacked {name} N={n}: {type(e).__name__}: {e}")
                continue
            r["single_images_per_s"] = single["images_per_s"]
            r["ratio"] = r["images_per_s"] / single["images_per_s"]
            rows.append(r)
            log(json.dumps(r))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| model | runs stacked | aggregate images/s | one run images/s | ratio |\n|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['model']} | {r['members']} | {r['images_per_s']:,.0f} | {r['single_images_per_s']:,.0f} "
        f"| {r['ratio']:.2f} |\n"
        for r in rows
    )
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stacked", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--members", default=",".join(map(str, MEMBERS)))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    rows = run(
        a.device,
        a.quick,
        tuple(a.models.split(",")),
        tuple(int(n) for n in a.members.split(",")),
        a.seconds,
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
