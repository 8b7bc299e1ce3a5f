"""scripts/gpu_check.sh and benchmarks/gpu_check.py: the one-call GPU check, smoke-run on CPU.

On CPU the fast and eager runs of a row are the same computation (DeviceStep without a graph) in the
same process from the same seeds and batches, so their losses agree exactly; on a GPU the check's
tolerance applies (benchmarks/gpu_check.py, TOLERANCE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from laperm import models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package sits at the root, beside src/ (whatever pytest's cwd)

from benchmarks import gpu_check  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
COMBOS = {(p, o) for p in ("fp32", "bf16") for o in ("laperm", "adam")}


def test_the_check_covers_every_image_model_that_fast_mode_trains():
    names = gpu_check.fast_models()
    images = {n for n, s in models.MODELS.items() if s.dataset != "text"}
    assert set(names) == images - {"resnet"}  # resnet needs depth=, which no config can pass
    assert {"conv7", "conv2", "resnet50", "vit-tiny"} <= set(names) and "char-gpt" not in names


@pytest.mark.slow  # seven row processes (conv7: 4 plain rows, lr-schedule, odd-last-batch, stack4)
def test_quick_cpu_run_of_the_script_passes_with_every_row(tmp_path):
    env = {**ENV, "OUT": str(tmp_path), "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu-check.json", "gpu-check.md", "hardware.txt", "log.txt"]  # no tests on CPU
    assert all(p.is_file() and p.stat().st_size < 1 << 20 for p in tmp_path.iterdir())
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["verdict"].startswith("PASS") and data["tests"] is None and data["expected_rows"] == 7
    rows = data["rows"]
    plain = [r for r in rows if r["kind"] == "plain"]
    assert {(r["precision"], r["optimizer"]) for r in plain} == COMBOS and {r["model"] for r in rows} == {"conv7"}
    extra = {r["kind"]: r for r in rows if r["kind"] != "plain"}
    assert set(extra) == {"lr-schedule", "odd-last-batch", "stack4"}
    assert all((r["optimizer"], r["precision"]) == ("laperm", "fp32") for r in extra.values())
    assert extra["odd-last-batch"]["last_batch"] == 5 and extra["lr-schedule"]["last_batch"] == 8
    assert [len(s) for s in extra["stack4"]["step_losses_fast"]] == [4] * 6  # every member's loss, every step
    for r in rows:
        assert r["step_losses_fast"] == r["step_losses_eager"] and r["step_diff_max"] == 0.0  # every step
        assert r["steps_within_tolerance"] and len(r["step_losses_fast"]) == 6
        assert r["ok"] and r["error"] is None and r["within_tolerance"], r
        assert r["graph"] is False and r["captured"] is None  # no CUDA graph on CPU
        assert r["loss_diff"] == 0.0 and r["loss_fast"] == r["loss_eager"]  # same computation, same process
        assert r["loss_eager"] < r["loss_eager_first"]  # the synthetic data is learnt
        assert r["images_per_s_fast"] > 0 and r["images_per_s_eager"] > 0 and r["steps"] == 6
    assert {r["k"] for r in rows if r["optimizer"] == "laperm"} == {2}  # syncs happen within the 6 steps
    md = (tmp_path / "gpu-check.md").read_text()
    assert md.startswith("# GPU check: cpu") and "PASS" in md and md.count("| conv7 ") == 7
    assert all(f"| conv7 ({kind})" in md for kind in ("stack4", "odd-last-batch", "lr-schedule"))
    assert "## Failures" not in md


@pytest.mark.slow  # four row processes of the smallest model
def test_a_failing_row_keeps_its_traceback_and_the_others_still_run(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "check", "--device", "cpu", "--quick", "--models", "f1"]
    env = {**ENV, "LAPERM_BENCH_PLANT": "row:f1:adam:bf16"}
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path), "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["verdict"] == "FAIL: 1 row(s) not ok"
    failed = [r for r in data["rows"] if r["error"]]
    assert [(r["model"], r["optimizer"], r["precision"]) for r in failed] == [("f1", "adam", "bf16")]
    tb = failed[0]["error"]["traceback"]
    assert failed[0]["error"]["returncode"] == 1 and failed[0]["ok"] is False
    assert tb.startswith("Traceback (most recent call last):") and "RuntimeError: planted failure" in tb
    others = [r for r in data["rows"] if not r["error"]]
    assert len(others) == 6 and all(r["ok"] for r in others)  # (3 plain rows, and the 3 extra kinds on f1)
    md = (tmp_path / "gpu-check.md").read_text()
    assert "FAIL" in md and "## Failures" in md and "RuntimeError: planted failure of contender row:f1:adam:bf16" in md


def test_markdown_marks_rows_outside_the_tolerance_or_not_captured():
    base = {"model": "conv7", "optimizer": "laperm", "precision": "fp32", "batch": 50, "steps": 60, "error": None}
    base["kind"] = "plain"
    row = {
        **base,
        "captured": False,
        "warnings": ["UserWarning: capture failed, running eagerly"],
        "loss_eager_first": 2.3,
        "loss_eager": 0.5,
        "loss_fast": 0.9,
        "loss_diff": 0.4,
        "tolerance": {"rtol": 0.05, "atol": 0.02},
        "within_tolerance": False,
        "step_diff_max": 0.5,
        "step_diff_max_at": 41,
        "steps_within_tolerance": False,
        "images_per_s_fast": 1000.0,
        "images_per_s_eager": float("nan"),
        "ok": False,
    }
    failed = {
        **base,
        "optimizer": "adam",
        "ok": False,
        "error": {"returncode": -11, "traceback": "Fatal", "command": "c"},
    }
    res = {"verdict": "FAIL: 2 row(s) not ok", "device": "d", "torch": "t", "commit": "c", "date": "now"}
    res |= {"command": "x", "steps": 60, "tests": "18 passed (exit 0)", "expected_rows": 2, "rows": [row, failed]}
    md = gpu_check.markdown(res)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| conv7")]
    assert cells[0] == [
        *("conv7", "laperm", "fp32", "50", "**NO**", "2.3000 → 0.5000", "0.9000", "4.00e-01 (**>** 0.045)"),
        *("5.00e-01 (41) **>**", "1,000"),
        *("", "**NO**"),  # eager's img/s unknown (nan), and the row is not ok
    ]
    assert cells[1][1] == "adam" and cells[1][-1] == "**failed** (exit -11)"
    assert "**failed** (exit -11)" in md and "## Warnings" in md and "capture failed, running eagerly" in md
    assert "## Failures" in md and "````\nFatal\n````" in md and "18 passed (exit 0)" in md
