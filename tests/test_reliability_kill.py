"""Kill `laperm train` for real, resume it, and get the uninterrupted run back bit for bit.

One run is killed with SIGKILL at three points (mid-epoch between checkpoints,
between a checkpoint's payload and its checksum, and with half a checkpoint
written), stopped once by a real SIGTERM from this process, and finished by a
last resume.  Its final weights, best weights, metrics and summary must equal
those of an uninterrupted run with the same seed (timing fields aside).

The kill points are placed by the ``LAPERM_TEST_FAULT`` hook
(:func:`laperm.checkpoint.fault_point`): the process sends SIGKILL to itself
there, which is exactly what an outside ``kill -9`` landing at that instant
does, but repeatable.  Each child is a separate Python process (a real
``python -m laperm.cli``), so nothing survives a kill except what is on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from laperm import checkpoint, rundir
from laperm.cli import main

pytestmark = pytest.mark.slow  # SIGKILLed subprocess runs

# f2 (L2, permuted layers), augmentation, an lr schedule and several syncs per epoch;
# 14 steps per epoch, a step checkpoint every 4 steps.
ARGS = [
    "--model",
    "f2",
    "--dataset",
    "synthetic",
    "--val-size",
    "64",
    "--epochs",
    "3",
    "--k",
    "5",
    "--batch-size",
    "32",
    "--checkpoint-steps",
    "4",
    "--augment",
    "mnist-paper",
    "--lr-schedule",
    "exp:0.8",
    "--threads",
    "1",
    "--no-progress",
    "--seed",
    "7",
]
TIMING = {"epoch_time_s", "images_per_s", "train_time_s"}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _child(cwd: Path, argv: list[str], fault: str | None, log: Path) -> subprocess.Popen:
    env = {**os.environ, checkpoint.FAULT_LOG_ENV: str(log)}
    env.pop(checkpoint.FAULT_ENV, None)
    if fault:
        env[checkpoint.FAULT_ENV] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "laperm.cli", "train", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_child(cwd: Path, argv: list[str], fault: str, log: Path) -> tuple[int, str, str]:
    proc = _child(cwd, argv, fault, log)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal would call -0.0 and 0.0 equal)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("final.pt", "best.pt"):
        wa, wb = checkpoint.load(a / name)["model"], checkpoint.load(b / name)["model"]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert bits_equal(wa[k], wb[k]), f"{name}: {k} differs"
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    ma, mb = rundir.read_metrics(a / "metrics.jsonl"), rundir.read_metrics(b / "metrics.jsonl")
    assert [strip(r) for r in ma] == [strip(r) for r in mb]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    ignore = TIMING | {"run", "run_dir"}
    assert {k: v for k, v in sa.items() if k not in ignore} == {k: v for k, v in sb.items() if k not in ignore}


def test_sigkill_and_sigterm_then_resume_is_bit_identical(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The uninterrupted reference, in this process (same code, same thread count).
    assert main(["train", *ARGS, "--out", "runs", "--name", "ref"]) == 0
    capsys.readouterr()
    ref, run = tmp_path / "runs" / "ref", tmp_path / "runs" / "victim"
    log = tmp_path / "faults.log"
    resume = ["--resume", str(run), "--no-progress"]

    # 1. SIGKILL mid-epoch at step 10 (checkpoints at 4 and 8 exist).
    rc, out, err = _run_child(tmp_path, [*ARGS, "--out", "runs", "--name", "victim"], "kill@step:10", log)
    assert rc == -signal.SIGKILL, err
    assert log.read_text().splitlines()[-1] == "kill@step:10"
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == [
        "ckpt-000000008.pt",
        "ckpt-000000004.pt",
    ]

    # 2. Resume; SIGKILL inside the second checkpoint write, after the payload, before its checksum.
    rc, out, err = _run_child(tmp_path, resume, "kill@sidecar:ckpt-*#2", log)
    assert rc == -signal.SIGKILL, err
    assert "resuming" in out and "from ckpt-000000008.pt: step 8" in out
    assert log.read_text().splitlines()[-1].startswith("kill@sidecar:ckpt-")

    # 3. Resume: the torn checkpoint is detected and the previous one used; SIGKILL with half a file written.
    rc, out, err = _run_child(tmp_path, resume, "kill@write:ckpt-*", log)
    assert rc == -signal.SIGKILL, err
    assert "warning: skipping checkpoint" in out and "has no checksum file" in out
    assert list((run / "checkpoints").glob(".ckpt-*.tmp")), "the kill should have left a temporary file"

    # 4. Resume; a real SIGTERM from here while the run waits at step 30: it saves and exits with code 3.
    proc = _child(tmp_path, resume, "pause@step:30", log)
    while "pause@step:30" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert err.strip().splitlines() == [
        f"laperm: error: stopped by SIGTERM at step 30; checkpoint saved. Continue with: laperm train --resume {run}"
    ]
    assert checkpoint.list_checkpoints(run / "checkpoints")[0].name == "ckpt-000000030.pt"
    assert not list((run / "checkpoints").glob(".ckpt-*.tmp")), "stale temporary files are cleaned on resume"

    # 5. The last resume (in this process) finishes the run.
    assert main(["train", *resume]) == 0
    out = capsys.readouterr().out
    assert "from ckpt-000000030.pt: step 30, epoch 3 at batch 2/14" in out
    assert "verified:" in out
    assert_same_run(ref, run)
    # Each epoch is listed once, in order, although epochs 1-3 were each started more than once.
    assert [r["epoch"] for r in rundir.read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert main(["verify", str(run)]) == 0
