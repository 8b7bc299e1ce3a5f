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


def test_regeneration_keeps_what_follows_the_kept_line(tmp_path):
    """Hand-written sections and the GPU section sit after ``KEPT``: a CPU regeneration keeps them as they are."""
    from benchmarks.__main__ import KEPT, kept_sections, splice_gpu_section

    out = tmp_path / "bench.md"
    assert kept_sections(out) == KEPT + "\n"  # a new file gets the line, nothing after it
    hand = "## Test time\n\nmeasured by hand\n"
    out.write_text(f"# Benchmarks\n\n## 1. generated\n\nold\n\n{KEPT}\n\n{hand}")
    res = {"device": "cpu", "torch": "x", "sync": [], "throughput": [], "parallel": []}
    out.write_text(splice_gpu_section(out.read_text(), res))
    kept = kept_sections(out)
    assert kept.startswith(KEPT) and hand in kept and "## GPU fast path" in kept and "old" not in kept
