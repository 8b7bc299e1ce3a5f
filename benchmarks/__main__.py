"""Run every benchmark, print the tables and write ``docs/benchmarks.md``.

    python -m benchmarks                  # the full suite (about 10 minutes on 2 cores)
    python -m benchmarks --quick          # a smoke run (seconds); numbers are meaningless
    python -m benchmarks --threads 1 --only overhead,engine --output /tmp/b.md
    python -m benchmarks --device cuda    # the GPU section only (docs/benchmarks-gpu.json; needs CUDA)

Everything compared is measured side by side in one process (peak memory:
in fresh subprocesses), interleaved, and reported as medians and ratios; see
each module's docstring for its method.  The GPU section is the exception: each
of its contenders runs in its own process (benchmarks/isolate.py), and a failed
one becomes a row with its traceback.  No test asserts on these timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from laperm import reconnect

from . import compact, engine, gpu, memory, overhead, stacked, sync
from .common import fmt_bytes, load_average, machine_info, mark, md_table

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("sync", "overhead", "memory", "engine", "compact")


# -- sections: each returns markdown ----------------------------------------------------------


def section_sync(quick: bool) -> tuple[list, str]:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    saved = reconnect._num_threads
    reconnect.set_num_threads(threads)  # the kernel's own threads: all usable cores
    try:
        rows = sync.run(quick, names=("lenet300", "f2") if quick else sync.MODELS)
    finally:
        reconnect.set_num_threads(saved)
    table = md_table(
        [
            "model",
            "weights",
            "longest row",
            f"laperm ({threads} threads) ms",
            "laperm 1 thread ms",
            "np.argsort ms",
            "reference ms",
            "laperm / np.argsort",
            "1 thread / np.argsort",
            "reference / np.argsort",
            "target",
            "met",
        ],
        [
            [
                r["model"],
                f"{r['weights']:,}",
                r["max_row"],
                f"{r['laperm_ms']:.2f}",
                f"{r['laperm_1t_ms']:.2f}",
                f"{r['numpy_argsort_ms']:.2f}",
                f"{r['reference_ms']:.2f}",
                f"{r['ratio_laperm']:.3f}",
                f"{r['ratio_laperm_1t']:.3f}",
                f"{r['ratio_reference']:.3f}",
                "<= 1.0" if r["model"] == "conv13" else "",
                mark(r["ratio_laperm"] <= 1.0) if r["model"] == "conv13" else "",
            ]
            for r in rows
        ],
    )
    goals = [
        [
            "Conv13 full sync / single-threaded np.argsort",
            f"{r['ratio_laperm']:.3f}",
            "<= 1.0",
            mark(r["ratio_laperm"] <= 1.0),
        ]
        for r in rows
        if r["model"] == "conv13"
    ]
    return goals, (
        "One full synchronisation of every permuted tensor (`reconnect.sync_tensor_`, as `LaPerm` calls it) "
        "against a plain single-threaded `numpy.argsort` of the same rows (the practical floor of any "
        "rank-based sync on CPU) and the reference's argsort-of-argsort + gather (torch). Median of "
        f"{rows[0]['repeats']} interleaved repeats (`benchmarks/sync.py`).\n\n{table}\n"
    )


def section_overhead(quick: bool) -> tuple[list, str]:
    rows = overhead.run(quick)
    lines, goals = [], []
    for r in rows:
        for k in overhead.KS:
            target = r["targets"].get(k)
            parts, q1, wall = r["parts"][k], r["cpu_q1"], r["wall_median"]
            met = None if target is None else parts <= target
            lines.append(
                [
                    r["model"],
                    k,
                    f"{q1['adam_steps_per_s']:,.1f}",
                    f"{q1[f'steps_per_s_k{k}']:,.1f}",
                    f"{q1[f'ratio_k{k}']:.4f}",
                    f"{wall[f'ratio_k{k}']:.4f}",
                    f"{parts:.4f}",
                    "" if target is None else f"<= {target:g}",
                    mark(met),
                ]
            )
            if target is not None:
                goals.append(
                    [
                        f"LaPerm(Adam) / Adam step time, {r['model']}, k={k} (from parts; direct CPU q1)",
                        f"{parts:.4f}; {q1[f'ratio_k{k}']:.4f}",
                        f"<= {target:g}",
                        mark(met),
                    ]
                )
    table = md_table(
        [
            "model",
            "k",
            "Adam steps/s",
            "LaPerm steps/s",
            "ratio direct (CPU, q1)",
            "ratio direct (wall, median)",
            "ratio from parts",
            "target",
            "met",
        ],
        lines,
    )
    detail = md_table(
        [
            "model",
            "init",
            "batch",
            "steps per contender",
            "noise floor: Adam' / Adam (CPU q1; wall median)",
            "LaPerm plain step (ms)",
            "LaPerm.step own work (µs)",
            "one sync (ms)",
            "sync / plain step",
        ],
        [
            [
                r["model"],
                f"`{r['init']}`",
                r["batch"],
                r["chunk"] * r["rounds"],
                f"{r['cpu_q1']['control_ratio']:.4f}; {r['wall_median']['control_ratio']:.4f}",
                f"{r['plain_step_ms']:.3f}",
                f"{r['per_step_us']:.1f}",
                f"{r['sync_ms']:.2f}",
                f"{r['sync_ms'] / r['plain_step_ms']:.2f}",
            ]
            for r in rows
        ],
    )
    return goals, (
        "Time per training step of LaPerm(Adam) over plain Adam (lower is better), same model, data and batch "
        "size (the paper's: 128 for F2 and lenet300, 50 for Conv7), Adam settings and loss as `laperm train` "
        "uses them; steps/s are from the lower quartile of CPU step times. Every step is timed; a LaPerm "
        "contender's cost at period k is its plain-step time plus the extra time of its sync steps divided by "
        "k. 'Direct' ratios compare separate Adam and LaPerm contenders, and are only as good as the noise "
        "floor (two identical Adam contenders) of the same run; 'from parts' adds LaPerm's two measured costs "
        "(its own per-step work and one sync) to its plain step, which cancels that noise, and is what the "
        "targets are judged on. Method: `benchmarks/overhead.py`.\n\n"
        f"{table}\n\n{detail}\n"
    )


def section_memory(quick: bool) -> tuple[list, str]:
    kept = memory.kept_state(quick)
    scratch, peak = memory.subprocess_measurements(quick)
    t1 = md_table(
        ["init", "model", "storage of sorted θ0", "permuted params", "LaPerm keeps", "ratio", "target", "met"],
        [
            [
                r["init"],
                r["model"],
                r["storage"],
                fmt_bytes(r["permuted_bytes"]),
                fmt_bytes(r["extra_bytes"]),
                f"{r['ratio']:.4f}",
                "" if r["target"] is None else f"<= {r['target']:g}",
                mark(r["met"]),
            ]
            for r in kept
        ],
    )
    t2 = md_table(
        ["after syncing (in turn, one process)", "model", "kernel scratch kept", "transient peak of a sync"],
        [
            [a["init"], a["model"], fmt_bytes(a["kept_bytes"]), fmt_bytes(a["transient_peak_bytes"])]
            for a in scratch["after"]
        ],
    )
    adam = next(r for r in peak if r["optimizer"] == "adam")
    lap = next(r for r in peak if r["optimizer"] == "laperm")
    diff = lap["peak_rss_bytes"] - adam["peak_rss_bytes"]
    t3 = md_table(
        ["run", "model", "peak RSS", "LaPerm - Adam", "of which sorted θ0 (`extra_memory_bytes`)"],
        [
            ["Adam", adam["model"], fmt_bytes(adam["peak_rss_bytes"]), "", ""],
            [
                "LaPerm(Adam), k=2",
                lap["model"],
                fmt_bytes(lap["peak_rss_bytes"]),
                fmt_bytes(diff),
                fmt_bytes(lap["extra_bytes"]),
            ],
        ],
    )
    goals = [
        [
            f"LaPerm's extra memory / permuted bytes, {r['init']} ({r['model']})",
            f"{r['ratio']:.4f}",
            f"<= {r['target']:g}",
            mark(r["met"]),
        ]
        for r in kept
        if r["target"] is not None
    ]
    return goals, (
        "**Kept state.** Bytes `LaPerm.extra_memory_bytes()` reports (the sorted θ0: dense, or run-length "
        "encoded for repeated values) over the bytes of the permuted parameters.\n\n"
        f"{t1}\n\n"
        "**Kernel scratch.** The CPU sync kernel keeps reusable per-thread block buffers (int64 keys and two "
        "int32 halves of at most 64 Ki elements: about 1 MiB per kernel thread) plus a shared int32 `arange` "
        f"({fmt_bytes(scratch['arange_bytes'])}); their size does not depend on the model, so they are reported "
        "apart from the ratio above: a fixed cost per process, large next to a 1 MB model, ~2% of Conv13's "
        f"60 MB. Measured with `tracemalloc` in a fresh process ({scratch['threads']} kernel thread(s)); "
        "'kept' is cumulative (buffers are reused by later syncs), the transient peak includes the rows rebuilt "
        "from a run-length encoding for the sync.\n\n"
        f"{t2}\n\n"
        f"**Peak RSS** of {lap['steps']} training steps (batch {lap['batch']}, synthetic data) in fresh "
        "subprocesses, median of the repeats. The difference should be about the sorted θ0 plus the kernel "
        "scratch.\n\n"
        f"{t3}\n"
    )


def section_engine(quick: bool) -> tuple[list, str]:
    res = engine.run(quick)
    goals = [
        [
            f"{r['runner']} / bare loop, images/s (CPU q1; wall median; whole epochs)",
            f"{r['ratio']:.3f}; {r['ratio_wall']:.3f}; {r['ratio_epoch']:.3f}",
            f">= {engine.TARGET}",
            mark(r["met"]),
        ]
        for r in res["rows"]
        if r["met"] is not None
    ]
    table = md_table(
        [
            "runner",
            "images/epoch",
            "images/s (CPU q1)",
            "ratio (CPU q1)",
            "ratio (wall median)",
            "ratio of whole-epoch times",
            "target",
            "met",
            "whole call (s)",
        ],
        [
            [
                r["runner"],
                f"{r['images']:,}",
                f"{r['images_per_s']:,.0f}",
                f"{r['ratio']:.3f}",
                f"{r['ratio_wall']:.3f}",
                f"{r['ratio_epoch']:.3f}",
                "" if r["met"] is None else f">= {engine.TARGET}",
                mark(r["met"]),
                f"{r['end_to_end_s']:.1f}",
            ]
            for r in res["rows"]
        ],
    )
    return goals, (
        f"`laperm.train.train` (what `laperm train` runs) against a bare hand-written loop: lenet300, "
        f"LaPerm(Adam) k={engine.K}, batch 128, {res['dataset']}, {res['epochs']} epoch(s) per run, "
        f"{res['rounds']} interleaved rounds. Ratios are throughput over the bare loop's (higher is better), "
        "from per-step times (every loop iteration timed by a forward hook, grouped into sync, display-update "
        "and plain steps so that periodic costs count; method in `benchmarks/engine.py`); the target is judged "
        "on the CPU-time ratio. 'Whole-epoch' is the plain ratio of loop times per round (noisier); 'whole "
        "call' adds what the bare loop does not do (loading data, evaluation on validation and test sets, "
        "checkpoints, the final verification, the plot).\n\n"
        f"{table}\n"
    )


def section_compact(quick: bool) -> tuple[list, str]:
    rows = compact.run(quick)
    goals = [
        [
            f"compact checkpoint / float32 state_dict, {r['case']} (bit-exact: {'yes' if r['bit_exact'] else 'NO'})",
            f"{r['ratio']:.4f}",
            f"<= {r['target']:.4g}",
            mark(r["met"]),
        ]
        for r in rows
        if r["target"] is not None
    ]
    table = md_table(
        [
            "network",
            "compact file",
            "float32 state_dict file",
            "ratio",
            "1/ratio",
            "code bits per permuted weight",
            "reloads bit-exactly",
            "target",
            "met",
        ],
        [
            [
                r["case"],
                fmt_bytes(r["bytes"]),
                fmt_bytes(r["state_dict_bytes"]),
                f"{r['ratio']:.4f}",
                f"{1 / r['ratio']:.1f}",
                f"{r['bits_per_weight']:.2f}",
                "yes" if r["bit_exact"] else "NO",
                "" if r["target"] is None else f"<= {r['target']:.4g}",
                mark(r["met"]),
            ]
            for r in rows
        ],
    )
    return goals, (
        "`laperm export` stores θ0's recipe (model, init, seed) plus, per permuted row, each position's index "
        "among the row's distinct initial values, bit-packed at ceil(log2(distinct values)) bits (1 bit for "
        "0/v rows); unpermuted tensors as they are (format in `src/laperm/export.py`). Sizes for simulated "
        "training (random row permutations; `benchmarks/compact.py`), every file decoded again with θ0 "
        "rebuilt from its recipe and compared bit for bit. Tested in `tests/test_export.py`.\n\n"
        f"{table}\n"
    )


SECTION_FUNCS: dict[str, tuple[str, Callable[[bool], tuple[list, str]]]] = {
    "sync": ("Sync against the sorting limit", section_sync),
    "overhead": ("Training overhead: LaPerm(Adam) vs Adam", section_overhead),
    "memory": ("Memory", section_memory),
    "engine": ("Engine throughput: `laperm train` vs a bare loop", section_engine),
    "compact": ("Compact checkpoints", section_compact),
}

DISTRIBUTED = (
    "## Distributed: 1 vs 2 processes\n\n"
    "Measured separately, since it launches whole training runs: "
    "`python -m benchmarks.distributed --nproc 2 --epochs 1 --rounds 2` (paste its output here).\n"
)


GPU_START, GPU_END = "<!-- gpu section: python -m benchmarks --device cuda -->", "<!-- end of gpu section -->"


def run_gpu(device: str, quick: bool, output: Path, gpu_json: Path) -> int:
    """The GPU section: figures to ``gpu_json``, their tables spliced into ``output`` (the CPU sections stay)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "error: python -m benchmarks --device cuda needs a CUDA GPU, and torch sees none "
            "(torch.cuda.is_available() is False); run it on a GPU machine (scripts/gpu_bench.sh), "
            "or smoke-test the same code on CPU with --device cpu --only gpu --quick",
            file=sys.stderr,
        )
        return 2
    if device == "cpu" and not quick:
        print("error: the GPU section measures a GPU; on CPU only its smoke run exists: add --quick", file=sys.stderr)
        return 2

    def save(res: dict) -> None:  # after every row: a run cut off by a time limit keeps what it measured
        _write_gpu(res, output, gpu_json)

    res = gpu.run(torch.device(device), quick, log=lambda m: print(m, flush=True), save=save)
    # stacked training (issue 22): N runs as one stacked model against one run alone, each row its own process
    res["stacked"] = stacked.run(device, quick, seconds=4.0, log=lambda m: print(m, flush=True))
    save(res)
    failed = sum(
        bool(r.get("error")) for key in ("sync", "throughput", "parallel", "stacked") for r in res.get(key, [])
    )
    print(f"\n{gpu.markdown(res)}\nwrote {gpu_json} and the GPU section of {output}; {failed} contender(s) failed")
    return 0


def _write_gpu(res: dict, output: Path, gpu_json: Path) -> None:
    """The figures to ``gpu_json``; the GPU section spliced into ``output`` (its other sections stay)."""
    gpu_json.parent.mkdir(parents=True, exist_ok=True)
    gpu_json.write_text(json.dumps(res, indent=1) + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(splice_gpu_section(output.read_text() if output.exists() else "# Benchmarks\n\n", res))


def splice_gpu_section(doc: str, res: dict) -> str:
    """``doc`` with its GPU section replaced by (or, without one, ended with) the one for ``res``."""
    stack_table = f"**Stacked runs** (`benchmarks/stacked.py`)\n\n{stacked.markdown(res.get('stacked', []))}"
    section = f"{GPU_START}\n## GPU fast path\n\n{gpu.markdown(res)}\n{stack_table}\n{GPU_END}\n"
    if GPU_START in doc and GPU_END in doc:
        head, rest = doc.split(GPU_START, 1)
        return head + section + rest.split(GPU_END, 1)[1].lstrip("\n")
    return doc.rstrip("\n") + "\n\n" + section


KEPT = "<!-- below: hand-written sections and the GPU section, which `python -m benchmarks` keeps as they are -->"


def kept_sections(output: Path) -> str:
    """What a regeneration of the CPU sections keeps of ``output``: everything after the ``KEPT`` line."""
    text = output.read_text() if output.exists() else ""
    return KEPT + (text.split(KEPT, 1)[1].rstrip("\n") + "\n" if KEPT in text else "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, meaningless numbers")
    ap.add_argument("--threads", type=int, help="torch threads for the training benchmarks (default: torch's)")
    ap.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown file to write")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the GPU section (issue 13) alone; cpu (default): the CPU sections",
    )
    ap.add_argument(
        "--gpu-json",
        type=Path,
        default=ROOT / "docs" / "benchmarks-gpu.json",
        help="where the GPU section writes its figures",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" or args.only == "gpu":
        return run_gpu(args.device, args.quick, args.output, args.gpu_json)
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)} (or gpu, alone)")
    command = "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    info = machine_info()
    print(f"{command}\n" + "\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    start = time.perf_counter()
    parts, goals = [], []
    for i, name in enumerate(names, 1):
        title, fn = SECTION_FUNCS[name]
        t = time.perf_counter()
        section_goals, body = fn(args.quick)
        goals += section_goals
        text = f"## {i}. {title}\n\n{body}\n_({time.perf_counter() - t:.0f} s, load average after: {load_average()})_\n"
        print("\n" + text, flush=True)
        parts.append(text)
    info["load average at the end"] = load_average()
    info["duration"] = f"{time.perf_counter() - start:.0f} s"
    doc = "\n".join(
        [
            "# Benchmarks",
            "",
            f"Generated by `{command}` (from the repository root; `--quick` numbers are a smoke run only). "
            "Regenerate with the same command; absolute times depend on the machine, the ratios are what to "
            "compare. Everything compared runs side by side in one process, interleaved in random order, and is "
            "reported as medians or quantiles of many samples (each section says which), because this 2-core "
            "machine is shared: the load average below shows how busy it was. The training sections use the "
            "torch threads named below (`--threads`; with torch's default of 2 threads, a training step was up to "
            "100x slower whenever other processes kept a core busy, OpenMP threads waiting for each other); the "
            "sync kernel uses every usable core.",
            "",
            "What made the targets: the sync kernel (`reconnect.py`: int64 keys, blocked, threaded); and in "
            "`LaPerm` (`optim.py`) a finite check by `aminmax` instead of `isfinite(p).all()` (~15x faster, one "
            "host sync per group instead of per tensor), run-length-encoded θ0 expanded with `numpy.repeat`, and "
            "torch's per-step profiler/hook wrapper (~10 µs) entered only when a hook or the profiler is active.",
            "",
            md_table(["", ""], [[k, v] for k, v in info.items()]),
            "",
            "## Targets (issue 3)",
            "",
            md_table(["what", "measured", "target", "met"], goals),
            "",
            *parts,
            DISTRIBUTED,
            kept_sections(args.output),
        ]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(doc)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
