"""How big is an unfinished paper run's state, raw and packed (`laperm pack`)? Prints a markdown table.

For each measured README row (F1, F2, Conv7, Conv2, Conv4, Conv13, ResNet50 at p=0% and p=50%) both runs of
``laperm run paper`` (LaPerm and its same-init Adam baseline) are trained with the row's own settings
(preset: model, init, optimizer, batch size, lr schedule, augmentation; the experiment's checkpoint and
BatchNorm options) but on a few steps of synthetic data of the row's shape (``synthetic`` 1x28x28 for the
MNIST rows, ``synthetic-cifar`` 3x32x32 for the CIFAR-10 rows), then taken away mid-run by SIGTERM through
the test fault hook (``LAPERM_TEST_FAULT=term@step:N``: the run saves a checkpoint, exactly as at a deadline)
and packed with ``laperm pack RUN --out DIR``.

Every run trains 3 steps per epoch; epoch 1 ends with an evaluation (best.pt, the previous synced weights),
then the run is stopped in epoch 2. LaPerm runs sync every 2 steps (``--k 2`` instead of the row's 250-1200,
so that syncs happen within a few steps: what a checkpoint holds does not depend on k) and are measured
twice: stopped at step 4, right after a sync (the weights are a permutation of θ0: stored as codes), and at
step 5, between syncs (the weights are plain floats). Adam runs are stopped at step 5.

    PYTHONPATH=src python scripts/measure_pack_sizes.py [--rows F1,Conv13] [--work /tmp/packsizes] [--threads 2]

It took 11.5 minutes on the 2-core CPU (AMD EPYC, torch 2.13); docs/gpu.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from laperm.config import PRESETS
from laperm.experiments.paper import PAPER_ROWS, paper_runs

MIB = 1024 * 1024
STEPS_PER_EPOCH = 3
VAL_SIZE = 64  # of the synthetic set's 512 training images; the rest is more than 3 batches of 128
LAPERM_STATES = (("at a sync", 4), ("between syncs", 5))
ADAM_STATES = (("mid-run", 5),)
DEFAULT_ROWS = ("F1", "F2", "Conv7", "Conv2", "Conv4", "Conv13", "ResNet50 p=0%", "ResNet50 p=50%")


def _label(row_label: str) -> str:
    return row_label.split(" {")[0]  # "F1 {0, 0.08}, p=40%" -> "F1"


def _flags(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _train(laperm: list[str], overrides: dict, batch: int, synthetic: str, out: Path, stop: int, threads: int) -> Path:
    """Train ``overrides`` on a few steps of synthetic data; SIGTERM at step ``stop`` leaves a checkpoint."""
    args = [*laperm, "train", *_flags(overrides), "--dataset", synthetic, "--val-size", str(VAL_SIZE)]
    args += ["--train-subset", str(STEPS_PER_EPOCH * batch), "--epochs", "4", "--threads", str(threads)]
    args += ["--no-progress", "--out", str(out.parent), "--name", out.name, "--overwrite"]
    if overrides["optimizer"] == "laperm":
        args += ["--k", "2"]
    env = dict(os.environ, LAPERM_TEST_FAULT=f"term@step:{stop}")
    res = subprocess.run(args, env=env, capture_output=True, text=True)
    if res.returncode != 3:  # 3: stopped, resumable
        sys.exit(f"{' '.join(args)}\nexited {res.returncode}, not 3 (stopped):\n{res.stderr[-3000:]}")
    return out


def _pack(laperm: list[str], run: Path, dest: Path) -> tuple[int, int, int]:
    """``(checkpoint bytes, pack folder bytes, plan.json's bytes for the run)``."""
    shutil.rmtree(dest, ignore_errors=True)
    res = subprocess.run([*laperm, "pack", str(run), "--out", str(dest)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"laperm pack {run} failed:\n{res.stderr[-3000:]}")
    (record,) = json.loads((dest / "plan.json").read_text())["runs"]
    ckpt = run / "checkpoints" / record["checkpoint"]
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return ckpt.stat().st_size, total, int(record["nbytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="row labels, comma-separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/packsizes"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    wanted = [r.strip() for r in a.rows.split(",")]
    laperm = [sys.executable, "-m", "laperm"]  # this interpreter with its PYTHONPATH: the sources measured
    rows = {_label(r.label): r for r in PAPER_ROWS}
    runs = paper_runs("paper", [0])
    print("| row | optimizer | state | checkpoint | packed (folder) | packed (plan.json, run) |")
    print("|---|---|---|---|---|---|")
    for label in wanted:
        row = rows[label]
        synthetic = "synthetic" if row.data == "MNIST" else "synthetic-cifar"
        batch = int(PRESETS[row.preset]["batch_size"])
        for run in (r for r in runs if r.tags["row"] == row.label):
            o = dict(run.overrides)
            states = LAPERM_STATES if o["optimizer"] == "laperm" else ADAM_STATES
            for state, stop in states:
                name = f"{row.preset}-{o['optimizer']}-step{stop}"
                folder = _train(laperm, o, batch, synthetic, a.work / "runs" / name, stop, a.threads)
                ckpt, total, planned = _pack(laperm, folder, a.work / "packs" / name)
                cells = [f"{n / MIB:.1f} MiB ({n:,} B)" for n in (ckpt, total, planned)]
                print(f"| {label} | {o['optimizer']} | {state} (step {stop}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
