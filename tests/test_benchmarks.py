"""Smoke run of the benchmark suite: it runs and writes its tables (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_write_every_table(tmp_path):
    out = tmp_path / "bench.md"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = out.read_text()
    assert doc.startswith("# Benchmarks")
    assert "`python -m benchmarks --quick --threads 1 --output" in doc  # the exact command
    for needle in (
        "| cpu ",
        "| torch ",
        "| numpy ",
        "| date ",
        "load average",
        "## 1. Sync against the sorting limit",
        "| laperm / np.argsort |",
        "## 2. Training overhead",
        "| ratio from parts |",
        "noise floor",
        "## Targets (issue 3)",
        "## 3. Memory",
        "| LaPerm keeps |",
        "kernel scratch kept",
        "peak RSS",
        "## 4. Engine throughput",
        "| laperm train (progress bar) ",
        "noise floor)",
        "## 5. Compact checkpoints",
        "| F2, shared value (preset f2) |",
        "## Distributed: 1 vs 2 processes",
    ):
        assert needle in doc, needle
    # every overhead row names its k, and the compact files reload bit-exactly even in a smoke run
    for k in (1, 20, 250, 1000):
        assert f"| f2    | {k:>4} |" in doc
    assert "reloads bit-exactly" in doc and "| NO |" not in doc
    assert "## 1. Sync" in res.stdout  # the tables are printed too
