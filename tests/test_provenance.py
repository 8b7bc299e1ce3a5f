"""Each run records where each stretch of its training happened, and `laperm report` credits each
run with its own record (issue 30): never another run's, never the last GPU window's."""

from __future__ import annotations

import json
import platform

import pytest
import torch
from conftest import run_cli

from laperm import provenance
from laperm.experiments import report
from laperm.experiments.paper import PAPER_ROWS

pytestmark = pytest.mark.usefixtures("clean_engine_state")

TINY = ["--model", "f1", "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32", "--batch-size", "32"]
TINY += ["--k", "2", "--threads", "1", "--no-progress", "--name", "r"]


def test_every_start_and_resume_appends_its_own_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(provenance.COMMIT_ENV, "abc1234")
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(tmp_path))[0] == 0
    monkeypatch.setenv(provenance.COMMIT_ENV, "def5678")  # the code changed between the two stretches
    rc, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "r"), "--epochs", "2")
    assert rc == 0, err
    first, second = provenance.read(tmp_path / "r")
    assert (first["event"], first["step"], first["commit"]) == ("start", 0, "abc1234")
    assert (second["event"], second["step"], second["commit"]) == ("resume", 2, "def5678")  # 64 images, batch 32
    assert first["torch"] == torch.__version__ and first["device"] == "cpu" and "CPU" in first["hardware"]
    text = provenance.describe([first, second])
    assert text.endswith(f"torch {torch.__version__}, def5678 (from step 2)") and "abc1234 (from step 0)" in text


def _run(folder, name, row, epochs_done, planned, summary=None, stretches=()):
    d = folder / name
    d.mkdir(parents=True)
    recs = [{"epoch": i, "step": 10 * i, "test_acc": 0.5 + i / 100} for i in range(1, epochs_done + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps({"epochs": planned, "final_test_acc": 0.6, **summary}))
    if stretches:
        (d / "provenance.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stretches))
    return {"folder": name, "tags": {"row": row.label, "method": "laperm", "seed": 0}, "command": "laperm train"}


def _credit(text, row):
    return [
        x.strip(" |").split(" | ")[-1] for x in text.splitlines() if x.startswith(f"| {row.label} |") and "LaPerm " in x
    ]


def test_report_credits_each_run_with_its_own_windows(tmp_path):
    """Two GPU windows on two devices: run A trained in window 1 only, run B in both, run C records
    nothing, run D was folded in from elsewhere with its manifest fields. Before issue 30 every run
    without a summary was credited with the last window (device B, commit bbb2222)."""
    folder = tmp_path / "results" / "paper"
    win_a = {"event": "start", "step": 0, "hardware": "GPU A", "torch": "2.13.0", "commit": "aaa1111"}
    win_b = {"event": "resume", "step": 40, "hardware": "GPU B", "torch": "2.13.0", "commit": "bbb2222"}
    runs = {
        "a": _run(folder, "a", PAPER_ROWS[0], 2, 10, stretches=[win_a]),
        "b": _run(folder, "b", PAPER_ROWS[1], 4, 4, summary={"hardware": "GPU B", "torch": "2.13.0"}),
        "c": _run(folder, "c", PAPER_ROWS[2], 1, 45),
        "d": _run(folder, "d", PAPER_ROWS[3], 3, 125),
    }
    (folder / "b" / "provenance.jsonl").write_text(json.dumps(win_a) + "\n" + json.dumps(win_b) + "\n")
    runs["d"] |= {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "0555275"}
    (folder / "experiment.json").write_text(json.dumps({"runs": runs}))
    windows = [{"window_start": 1, "device": "GPU A", "commit": "aaa1111"}, {"window_start": 2, "device": "GPU B"}]
    (folder / "provenance.jsonl").write_text("".join(json.dumps(w) + "\n" for w in windows))
    text = report.write_report(folder.parent, tmp_path / "docs").read_text()
    assert _credit(text, PAPER_ROWS[0]) == ["GPU A, torch 2.13.0, aaa1111"]
    assert _credit(text, PAPER_ROWS[1]) == [
        "GPU A, torch 2.13.0, aaa1111 (from step 0); GPU B, torch 2.13.0, bbb2222 (from step 40)"
    ]
    assert _credit(text, PAPER_ROWS[2]) == ["not recorded"]
    assert _credit(text, PAPER_ROWS[3]) == ["NVIDIA H200, torch 2.11.0+cu130, 0555275"]


def test_a_cpu_run_records_the_cpu_model(tmp_path, monkeypatch):
    """CPUs of other kinds round differently: a run moved between machines records each one's model."""
    from laperm.engine import summary

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU 9000 @ 3.0GHz\nflags\t: a b\n")
    assert summary.cpu_model(str(info)) == "Some CPU 9000 @ 3.0GHz"
    assert summary.cpu_model(str(tmp_path / "absent")) is None
    monkeypatch.setattr(summary, "cpu_model", lambda: "Some CPU 9000")
    assert "CPU (Some CPU 9000), " in summary.hardware(torch.device("cpu"))
    monkeypatch.setattr(summary, "cpu_model", lambda: None)
    assert summary.hardware(torch.device("cpu")).startswith(f"{platform.machine()} CPU, ")
