"""`scripts/gpu_window.sh` on CPU (QUICK=1): two windows in a row, the second continuing the first (issue 23)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("laperm.pack")  # `laperm pack` / `laperm unpack` (branch i23pack)

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _window(tmp: Path, n: int, state: Path | None = None, **extra: str) -> tuple[Path, Path]:
    out, work = tmp / f"out{n}", tmp / f"work{n}"
    env = {
        **os.environ,
        "QUICK": "1",
        "DEVICE": "cpu",
        "OUT": str(out),
        "WORK": str(work),
        "WINDOW_S": "400",
        "PACK_S": "60",
        "MIN_START": "1",
        "ONLY": "model=f1",
        "SEEDS": "0",
        "PYTHON": sys.executable,
        "LAPERM_CACHE": str(tmp / "cache"),
        "COMMIT": "test",
        **extra,
    }
    args = ["bash", "scripts/gpu_window.sh"] + ([str(state)] if state else [])
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = (out / "window.log").read_text() if (out / "window.log").is_file() else ""
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + log[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "state" / "plan.json").is_file() and len(files) <= 8, files
    assert all(p.stat().st_size <= 16 * MIB for p in files) and sum(p.stat().st_size for p in files) <= 64 * MIB
    return out, work / "paper"


def _runs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if (p / "config.yaml").is_file()}


@pytest.mark.slow
def test_two_windows_in_a_row_continue_and_finish_the_runs(tmp_path: Path):
    # Window 1: the F1 row's two runs (3 epochs of 79 steps) side by side. Each is taken away at step 100, as a
    # preempted machine would (SIGTERM through the fault hook: a time-based stop would depend on the machine's
    # speed); test_deadline.py covers the deadline itself. Every run ends resumable, none finished.
    out1, work1 = _window(tmp_path, 1, LAPERM_TEST_FAULT="term@step:100")
    started = _runs(work1)
    unfinished = {n for n, p in started.items() if not (p / "summary.json").is_file()}
    assert len(started) == 2 and unfinished == set(started), started
    assert all(list((p / "checkpoints").glob("ckpt-*.pt")) for p in started.values())
    # Window 2, on a fresh work folder: unpacks window 1's state, continues it and finishes every run.
    out2, work2 = _window(tmp_path, 2, out1 / "state")
    runs = _runs(work2)
    assert len(runs) == 2 and all((p / "summary.json").is_file() for p in runs.values()), runs
    logs = "".join(p.read_text() for p in (work2 / "logs").glob("run-*.log"))
    for name in started:
        assert f"resuming {work2 / name} from ckpt-000000100.pt" in logs  # continued, not restarted
        epochs = [json.loads(x)["epoch"] for x in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 4))  # window 1's epoch kept, the rest added
    window_lines = (work2 / "provenance.jsonl").read_text().splitlines()
    assert len(window_lines) == 2 and json.loads(window_lines[-1])["commit"] == "test"
