"""The GPU benchmark's code path, smoke-run on CPU (tiny sizes; no timing asserted), and its GPU script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
KEYS = {
    "throughput": {"model", "optimizer", "batch", "mode", "precision", "images_per_s"},
    "sync": {"model", "laperm_ms", "torch_sort_ms"},
    "parallel": {"model", "runs", "single_images_per_s", "aggregate_images_per_s"},
}


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_gpu_section_smoke_run_on_cpu_writes_the_schema(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "gpu.json"
    md.write_text("# Benchmarks\n\nCPU tables stay.\n")
    res = _bench(
        "--device", "cpu", "--only", "gpu", "--quick", "--threads", "1", "--output", str(md), "--gpu-json", str(js)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FAILED" not in res.stdout, res.stdout[-3000:]
    data = json.loads(js.read_text())
    assert set(data) == {"device", "torch", *KEYS} and data["torch"] == torch.__version__
    for key, fields in KEYS.items():
        assert data[key], key
        for row in data[key]:
            assert set(row) == fields
    assert {r["model"] for r in data["throughput"]} == {"conv2", "conv7"} and len(data["throughput"]) == 6
    assert all(r["images_per_s"] > 0 for r in data["throughput"])
    doc = md.read_text()
    assert doc.startswith("# Benchmarks\n\nCPU tables stay.") and doc.count("## GPU fast path") == 1
    # a second run replaces the section instead of appending another
    res = _bench(
        "--device", "cpu", "--only", "gpu", "--quick", "--threads", "1", "--output", str(md), "--gpu-json", str(js)
    )
    assert res.returncode == 0 and md.read_text().count("## GPU fast path") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu_fails_clearly(tmp_path):
    res = _bench("--device", "cuda", "--output", str(tmp_path / "b.md"), "--gpu-json", str(tmp_path / "g.json"))
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr
    assert not (tmp_path / "g.json").exists()


def test_gpu_section_on_cpu_needs_quick(tmp_path):
    res = _bench("--only", "gpu", "--output", str(tmp_path / "b.md"), "--gpu-json", str(tmp_path / "g.json"))
    assert res.returncode == 2 and "--quick" in res.stderr


@pytest.mark.slow
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
