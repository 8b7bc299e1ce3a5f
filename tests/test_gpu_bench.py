"""The GPU benchmark's code path, smoke-run on CPU (tiny sizes; no timing asserted), and its GPU script.

Each contender runs in its own process (benchmarks/isolate.py); the smoke run plants two failing
contenders (``LAPERM_BENCH_PLANT``: one raises, one aborts the process) and checks that each becomes a
row with its return code and full traceback while every other row is still measured."""

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package sits at the root, beside src/ (whatever pytest's cwd)

import benchmarks.__main__ as bench_main  # noqa: E402
from benchmarks import isolate  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
KEYS = {
    "throughput": {"model", "optimizer", "batch", "mode", "precision", "images_per_s", "error"},
    "sync": {"model", "laperm_ms", "torch_sort_ms", "error"},
    "parallel": {"model", "runs", "single_images_per_s", "aggregate_images_per_s", "error"},
    "stacked": {
        "model",
        "members",
        "batch",
        "k",
        "device",
        "mode",
        "steps",
        "images_per_s",
        "single_images_per_s",
        "ratio",
        "error",
    },
}
PLANTED = "throughput:conv7:adam:fast:fp32,sync:conv2!abort"


def _bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # every contender is a fresh process: about a minute on 2 busy cores
def test_gpu_section_isolates_contenders_and_keeps_failures_as_rows(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "gpu.json"
    md.write_text("# Benchmarks\n\nCPU tables stay.\n")
    args = ("--device", "cpu", "--only", "gpu", "--quick", "--threads", "1", "--output", str(md), "--gpu-json", str(js))
    res = _bench(*args, env={**ENV, "LAPERM_BENCH_PLANT": PLANTED})
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(js.read_text())
    assert set(data) == {"device", "torch", *KEYS} and data["torch"] == torch.__version__
    for key, fields in KEYS.items():
        assert data[key], key
        for row in data[key]:
            assert set(row) == fields
    assert [r["model"] for r in data["sync"]] == ["conv2", "conv7"] and len(data["throughput"]) == 6
    raised = [r for r in data["throughput"] if r["error"]]
    assert [(r["model"], r["optimizer"], r["mode"], r["precision"]) for r in raised] == [
        ("conv7", "adam", "fast", "fp32")
    ]
    tb = raised[0]["error"]["traceback"]
    assert raised[0]["error"]["returncode"] == 1 and raised[0]["images_per_s"] is None and raised[0]["batch"] == 4
    assert tb.startswith("Traceback (most recent call last):") and "RuntimeError: planted failure" in tb
    aborted = data["sync"][0]["error"]
    assert aborted["returncode"] == -signal.SIGABRT and "planted abort" in aborted["traceback"]
    assert "Fatal Python error: Aborted" in aborted["traceback"]  # faulthandler's stack of the dead process
    # every other contender ran, each in a process of its own, after the failures
    assert all(r["images_per_s"] > 0 for r in data["throughput"] if not r["error"])
    assert data["sync"][1]["error"] is None and data["sync"][1]["laperm_ms"] > 0
    assert data["parallel"][0]["error"] is None and data["parallel"][0]["aggregate_images_per_s"] > 0
    doc = md.read_text()
    assert doc.startswith("# Benchmarks\n\nCPU tables stay.") and doc.count("## GPU fast path") == 1
    assert doc.count("**failed**") == 3 and "**Failures**" in doc  # sync: two cells; throughput: one
    assert "RuntimeError: planted failure of contender throughput:conv7:adam:fast:fp32" in doc
    assert "Fatal Python error: Aborted" in doc


def test_gpu_section_is_replaced_not_appended():
    res = {"device": "d", "torch": "t", "throughput": [], "sync": [], "parallel": []}
    once = bench_main.splice_gpu_section("# Benchmarks\n\nCPU tables stay.\n", res)
    res["device"] = "other card"
    twice = bench_main.splice_gpu_section(once + "\n## After\n", res)
    assert twice.startswith("# Benchmarks\n\nCPU tables stay.") and twice.count("## GPU fast path") == 1
    assert "Device: other card" in twice and "Device: d," not in twice and twice.rstrip().endswith("## After")


def test_a_contender_that_hangs_is_killed_and_becomes_an_error(tmp_path):
    # a parallel-run worker told to wait ten minutes for its window: it is killed at the 1 s timeout
    hang = ["worker", "conv7", "--device", "cpu", "--start-at", str(time.time() + 600), "--seconds", "1"]
    result, error = isolate.run_isolated("benchmarks.gpu", hang, timeout=1.0)
    assert result is None and error is not None
    assert error["returncode"] is None and error["traceback"].startswith("timed out after 1 s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu_fails_clearly(tmp_path):
    res = _bench("--device", "cuda", "--output", str(tmp_path / "b.md"), "--gpu-json", str(tmp_path / "g.json"))
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr
    assert not (tmp_path / "g.json").exists()


def test_gpu_section_on_cpu_needs_quick(tmp_path):
    res = _bench("--only", "gpu", "--output", str(tmp_path / "b.md"), "--gpu-json", str(tmp_path / "g.json"))
    assert res.returncode == 2 and "--quick" in res.stderr


@pytest.mark.slow  # the whole GPU section again, through the script
def test_gpu_script_dry_run_on_cpu(tmp_path):
    docs_json = ROOT / "docs" / "benchmarks-gpu.json"
    before = docs_json.read_bytes() if docs_json.exists() else None
    res = subprocess.run(
        ["bash", "scripts/gpu_bench.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**ENV, "OUT": str(tmp_path), "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "benchmarks-gpu.json" in files and "benchmarks.md" in files and "log.txt" in files
    assert len(files) <= 8 and all(p.stat().st_size < 16 << 20 for p in tmp_path.iterdir())
    assert set(json.loads((tmp_path / "benchmarks-gpu.json").read_text())) == {"device", "torch", *KEYS}
    assert (docs_json.read_bytes() if docs_json.exists() else None) == before  # the repo's docs are left alone
