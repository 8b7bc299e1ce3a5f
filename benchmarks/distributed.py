"""Throughput of data-parallel LaPerm: 1 vs N processes on this machine.

Runs ``laperm train --nproc N`` (torchrun, gloo on CPU) for a fixed number of
epochs of lenet300 on the bundled MNIST, alternating 1 and N processes, and
compares the training images/s recorded in each run's metrics (evaluation
and start-up excluded).  On a 2-core CPU machine the processes share the same
cores, so little gain is expected; the point is that nothing breaks.

    python -m benchmarks.distributed [--nproc 2] [--epochs 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import machine_info


def run_once(nproc: int, epochs: int, out: Path, name: str) -> float:
    """Training images/s of one run, from its metrics.jsonl."""
    cmd = [
        sys.executable,
        "-m",
        "laperm",
        "train",
        "--model",
        "lenet300",
        "--epochs",
        str(epochs),
        "--batch-size",
        "128",
        "--k",
        "100",
        "--no-progress",
        "--out",
        str(out),
        "--name",
        name,
        "--eval-every",
        str(epochs),
        "--nproc",
        str(nproc),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    seen = sum(r["images_per_s"] * r["epoch_time_s"] for r in records)
    return seen / sum(r["epoch_time_s"] for r in records)


def run(nproc: int = 2, epochs: int = 1, rounds: int = 2) -> dict[str, float]:
    rates: dict[int, list[float]] = {1: [], nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for n in (1, nproc) if r % 2 == 0 else (nproc, 1):  # alternate who goes first
                rates[n].append(run_once(n, epochs, Path(tmp), f"p{n}-r{r}"))
    one, many = statistics.median(rates[1]), statistics.median(rates[nproc])
    return {
        "nproc": nproc,
        "epochs": epochs,
        "rounds": rounds,
        "images_per_s_1": one,
        f"images_per_s_{nproc}": many,
        "speedup": many / one,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    info = machine_info()
    res = run(args.nproc, args.epochs, args.rounds)
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"lenet300 on MNIST, batch 128 (global), k=100, {args.epochs} epoch(s), median of {args.rounds}:")
    print(
        f"  1 process: {res['images_per_s_1']:,.0f} img/s   {args.nproc} processes: "
        f"{res[f'images_per_s_{args.nproc}']:,.0f} img/s   ratio {res['speedup']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
