"""Cost of one full LaPerm synchronisation, against the floor and the reference.

For each model, every parameter with >= 2 dims is a row matrix
``weight.reshape(out, -1)``.  One full sync is timed three ways on the same rows:

* ``laperm``: :func:`laperm.reconnect.sync_tensor_` on every tensor, as
  :class:`laperm.optim.LaPerm` calls it (``laperm_1t``: the same with one thread);
* ``numpy_argsort``: a plain single-threaded ``np.argsort(rows, axis=1)``
  (default kind), the practical floor of any rank-based sync on CPU;
* ``reference``: :func:`laperm.reconnect.reference_sync`, torch
  argsort-of-argsort + gather.

The methods run interleaved (rotating order) in one process and each time is
the median over the repeats, so that the ratios stay meaningful on a noisy,
shared machine; absolute times are not comparable across machines.

    python -m benchmarks.sync [--quick] [--repeats N] [--models conv13,lenet300,f2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from laperm import models, reconnect

MODELS = ("conv13", "lenet300", "f2")


def _case(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(θ0-sorted rows, inner weights to restore before each run, working tensors)."""
    net = models.build(name, seed=0)
    g = torch.Generator().manual_seed(1)
    sorted_vals, inner, work = [], [], []
    for p in net.parameters():
        if p.dim() < 2:
            continue
        w0 = p.detach().clone()
        sorted_vals.append(reconnect.sorted_rows(w0))
        # Inner weights some steps after a sync: θ0 values, slightly moved.
        inner.append(w0 + 1e-3 * w0.abs().mean() * torch.randn(w0.shape, generator=g))
        work.append(torch.empty_like(w0))
    return sorted_vals, inner, work


def _methods(sorted_vals, inner, work, threads: int) -> dict[str, Callable[[int], float]]:
    """Per method: ``run(number)``, the mean time of ``number`` full syncs."""
    rows = [w.reshape(w.shape[0], -1).numpy() for w in inner]

    def timed(fn: Callable[[], None], restore: bool = True) -> Callable[[int], float]:
        def run(number: int) -> float:
            total = 0.0
            for _ in range(number):
                if restore:  # the kernel works in place: start from the same weights
                    for w, i in zip(work, inner):
                        w.copy_(i)
                t = time.perf_counter()
                fn()
                total += time.perf_counter() - t
            return total / number

        return run

    def laperm(n: int) -> Callable[[], None]:
        def fn() -> None:
            reconnect.set_num_threads(n)
            for w, s in zip(work, sorted_vals):
                reconnect.sync_tensor_(w, s)

        return fn

    def numpy_argsort() -> None:
        for r in rows:
            np.argsort(r, axis=1)

    def reference() -> None:
        for w, s in zip(inner, sorted_vals):
            reconnect.reference_sync(w, s)

    return {
        "laperm": timed(laperm(threads)),
        "laperm_1t": timed(laperm(1)),
        "numpy_argsort": timed(numpy_argsort, restore=False),
        "reference": timed(reference, restore=False),
    }


def run(quick: bool = False, repeats: int | None = None, names=MODELS) -> list[dict]:
    """Time one full sync of each model; one dict per model.

    Keys: ``model``, ``weights``, ``tensors``, ``max_row``, ``threads`` (of the
    ``laperm`` kernel), ``repeats``, ``syncs_per_sample``, ``<method>_ms`` (median
    time of one full sync) and ``ratio_<method>`` (that over ``numpy_argsort_ms``)
    for the methods ``laperm``, ``laperm_1t``, ``numpy_argsort``, ``reference``.
    """
    repeats = repeats or (3 if quick else 11)
    sample_s = 0.01 if quick else 0.05
    threads = reconnect.get_num_threads()
    saved_threads = reconnect._num_threads
    out = []
    for name in names:
        sorted_vals, inner, work = _case(name)
        methods = _methods(sorted_vals, inner, work, threads)
        # Exactness check (and warm-up): the kernel equals the reference rule.
        methods["laperm"](1)
        for w, i, s in zip(work, inner, sorted_vals):
            assert torch.equal(w, reconnect.reference_sync(i, s)), name
        # Small models: average several syncs per sample, to sample >= ~sample_s each.
        number = max(1, round(sample_s / methods["numpy_argsort"](3)))
        times: dict[str, list[float]] = {m: [] for m in methods}
        order = list(methods)
        try:
            for k in range(repeats):
                for m in order[k % len(order) :] + order[: k % len(order)]:
                    times[m].append(methods[m](number))
        finally:
            reconnect.set_num_threads(saved_threads)
        med = {m: statistics.median(t) for m, t in times.items()}
        base = med["numpy_argsort"]
        row = {
            "model": name,
            "weights": sum(w.numel() for w in inner),
            "tensors": len(inner),
            "max_row": max(w[0].numel() for w in inner),
            "threads": threads,
            "repeats": repeats,
            "syncs_per_sample": number,
        }
        row.update({f"{m}_ms": 1e3 * t for m, t in med.items()})
        row.update({f"ratio_{m}": t / base for m, t in med.items() if m != "numpy_argsort"})
        out.append(row)
    return out


def machine_info() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':9} {'weights':>11} {'max_row':>7} {'laperm':>9} {'laperm_1t':>9} "
        f"{'np.argsort':>10} {'reference':>9} | {'laperm/np':>9} {'1t/np':>6} {'ref/np':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:9} {r['weights']:>11,} {r['max_row']:>7} {r['laperm_ms']:>9.2f} "
            f"{r['laperm_1t_ms']:>9.2f} {r['numpy_argsort_ms']:>10.2f} {r['reference_ms']:>9.2f} | "
            f"{r['ratio_laperm']:>9.3f} {r['ratio_laperm_1t']:>6.3f} {r['ratio_reference']:>6.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per method")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    args = ap.parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in machine_info().items()))
    rows = run(args.quick, args.repeats, args.models.split(","))
    print(
        f"times: median of {rows[0]['repeats']} interleaved runs, ms; ratios against "
        "single-threaded np.argsort of the same rows"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
