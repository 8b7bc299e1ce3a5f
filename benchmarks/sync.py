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

A second table (:func:`run_many`) times the batched syncs of many tensors at
once, on every permuted tensor of a model as ``LaPerm`` picks them (ResNet50:
52 tensors, 7 row lengths): ``flat`` (:func:`laperm.flat_sync.sync_flat_`, LaPerm's
CUDA path, both strategies: ``flat_global``, ``flat_by_length``), ``per_length`` (:func:`laperm.reconnect.sync_many_`, the former CUDA
path), ``per_tensor`` (``sync_tensor_`` on each, LaPerm's CPU path), against
``sort_by_length`` (one stable ``torch.sort`` per row length of the stacked rows:
the floor ``benchmarks.gpu.sync_one`` compares with) and ``sort_flat`` (one
stable ``torch.sort`` of all values as one 1-D tensor).

    python -m benchmarks.sync [--quick] [--repeats N] [--models conv13,lenet300,f2] [--many resnet50] [--threads N]
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

from laperm import flat_sync, models, reconnect
from laperm.optim import LaPerm, laperm_param_groups

MODELS = ("conv13", "lenet300", "f2")
MANY = ("resnet50",)


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


def _many_case(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list]:
    """LaPerm's permuted tensors of ``name``: (θ0-sorted rows, inner weights, working tensors, layouts)."""
    net = models.build(name, seed=0)
    opt = LaPerm(torch.optim.SGD(laperm_param_groups(net), lr=0.1), k=1000)
    g = torch.Generator().manual_seed(1)
    sorted_vals, inner, work, layouts = [], [], [], []
    for _, p in opt.permuted_parameters():
        w0 = p.detach().clone()
        sorted_vals.append(opt.initial_sorted(p))
        inner.append(w0 + 1e-3 * w0.abs().mean() * torch.randn(w0.shape, generator=g))
        work.append(torch.empty_like(w0))
        layouts.append(opt.layout_of(p))
    return sorted_vals, inner, work, layouts


def _many_methods(sorted_vals, inner, work, layouts) -> dict[str, Callable[[], None]]:  # type: ignore[no-untyped-def]
    by_length: dict[int, list[torch.Tensor]] = {}
    for w, lay in zip(inner, layouts):
        rows = reconnect.to_rows(w, lay)
        by_length.setdefault(rows.shape[1], []).append(rows)
    stacks = [torch.cat(rs) for rs in by_length.values()]
    every_value = torch.cat([w.reshape(-1) for w in inner])

    def per_tensor() -> None:
        for w, s, lay in zip(work, sorted_vals, layouts):
            reconnect.sync_tensor_(w, s, lay)

    def sort_by_length() -> None:
        for st in stacks:
            torch.sort(st, dim=1, stable=True)

    def flat(strategy: str) -> Callable[[], None]:
        def fn() -> None:
            saved, flat_sync.STRATEGY = flat_sync.STRATEGY, strategy
            try:
                flat_sync.sync_flat_(work, sorted_vals, layouts)
            finally:
                flat_sync.STRATEGY = saved

        return fn

    return {
        "flat_global": flat("global"),
        "flat_by_length": flat("by_length"),
        "per_length": lambda: reconnect.sync_many_(work, sorted_vals, layouts),
        "per_tensor": per_tensor,
        "sort_by_length": sort_by_length,
        "sort_flat": lambda: torch.sort(every_value, stable=True) and None,
    }


def run_many(quick: bool = False, repeats: int | None = None, names=MANY) -> list[dict]:
    """Time the syncs of all of a model's permuted tensors at once; one dict per model.

    Keys: ``model``, ``weights``, ``tensors``, ``row_lengths``, ``repeats``, ``<method>_ms``
    (median) for :func:`_many_methods`' methods, ``<method>_over_sort_by_length`` for the four
    syncs, and ``flat_global_over_sort_flat``.
    """
    repeats = repeats or (3 if quick else 11)
    out = []
    for name in names:
        sorted_vals, inner, work, layouts = _many_case(name)
        methods = _many_methods(sorted_vals, inner, work, layouts)
        want = [reconnect.reference_sync(i, s, lay) for i, s, lay in zip(inner, sorted_vals, layouts)]
        times: dict[str, list[float]] = {m: [] for m in methods}
        order = list(methods)
        for k in range(repeats + 1):  # round 0: warm-up (and the flat plan built), not timed
            for m in order[k % len(order) :] + order[: k % len(order)]:
                for w, i in zip(work, inner):
                    w.copy_(i)
                t = time.perf_counter()
                methods[m]()
                if k:
                    times[m].append(time.perf_counter() - t)
                if not m.startswith("sort"):  # exactness, every time
                    assert all(torch.equal(w, x) for w, x in zip(work, want)), (name, m)
        med = {m: 1e3 * statistics.median(t) for m, t in times.items()}
        row = {
            "model": name,
            "weights": sum(w.numel() for w in inner),
            "tensors": len(inner),
            "row_lengths": len({s.shape[1] for s in sorted_vals}),
            "repeats": repeats,
        }
        row.update({f"{m}_ms": t for m, t in med.items()})
        for m in ("flat_global", "flat_by_length", "per_length", "per_tensor"):
            row[f"{m}_over_sort_by_length"] = med[m] / med["sort_by_length"]
        row["flat_global_over_sort_flat"] = med["flat_global"] / med["sort_flat"]
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


def format_many_table(rows: list[dict]) -> str:
    cols = ("flat_global", "flat_by_length", "per_length", "per_tensor", "sort_by_length", "sort_flat")
    short = ("flat_gl", "flat_bl", "per_len", "per_ten", "sort_len", "sort_1")
    head = f"{'model':9} {'weights':>9} {'tensors':>7} {'lengths':>7} " + " ".join(f"{c:>8}" for c in short)
    head += " | " + " ".join(f"{c + '/sort_len':>16}" for c in short[:4]) + f" {'flat_gl/sort_1':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['model']:9} {r['weights']:>9,} {r['tensors']:>7} {r['row_lengths']:>7} "
        line += " ".join(f"{r[c + '_ms']:>8.2f}" for c in cols) + " | "
        line += " ".join(f"{r[c + '_over_sort_by_length']:>16.2f}" for c in cols[:4])
        lines.append(line + f" {r['flat_global_over_sort_flat']:>14.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per method")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    ap.add_argument(
        "--many", default=",".join(MANY), help="models for the many-tensor table (comma-separated; '' for none)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(" ".join(f"{k}={v}" for k, v in machine_info().items()))
    rows = run(args.quick, args.repeats, args.models.split(","))
    print(
        f"times: median of {rows[0]['repeats']} interleaved runs, ms; ratios against "
        "single-threaded np.argsort of the same rows"
    )
    print(format_table(rows))
    if args.many:
        many = run_many(args.quick, args.repeats, args.many.split(","))
        print(
            f"\nall permuted tensors at once (torch threads {torch.get_num_threads()}): median of "
            f"{many[0]['repeats']} interleaved runs, ms"
        )
        print(format_many_table(many))


if __name__ == "__main__":
    main()
