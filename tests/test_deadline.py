"""Deadlines (issue 23): ``stop_at`` stops a run cleanly, resumable, and ``laperm run --deadline`` uses it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import run_cli

from laperm import checkpoint, rundir
from laperm.engine import guards
from laperm.experiments import base
from laperm.experiments.base import Experiment, Run

pytestmark = pytest.mark.usefixtures("clean_engine_state")

# A tiny f2 run: 14 steps per epoch, 3 epochs, a sync every 5 steps.
ARGS = [
    "--model", "f2", "--dataset", "synthetic", "--val-size", "64", "--epochs", "3", "--k", "5",
    "--batch-size", "32", "--lr-schedule", "exp:0.8", "--threads", "1", "--no-progress",
]  # fmt: skip
TIMING = {"epoch_time_s", "images_per_s", "train_time_s"}


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rundir.read_metrics(run / "metrics.jsonl")]


def _weights(run: Path) -> dict:
    return checkpoint.load(run / "final.pt")["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def _ticking_clock(monkeypatch) -> None:
    """The deadline's clock advances one second per reading: one reading per step, so the stop is reproducible."""
    ticks = itertools.count(1000)
    monkeypatch.setattr(guards, "clock", lambda: float(next(ticks)))
    monkeypatch.setattr(guards.Deadline, "SAFETY_S", 0.0)


def test_stop_at_saves_a_checkpoint_and_resume_gives_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    assert run_cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "ref")[0] == 0
    _ticking_clock(monkeypatch)
    rc, out, err = run_cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "run", "--stop-at", "1020")
    run = tmp_path / "run"
    assert rc == 3, err
    assert "stopped before the deadline (stop_at 1020)" in err and f"laperm train --resume {run}" in err
    assert not (run / "summary.json").exists()
    saved = checkpoint.list_checkpoints(run / "checkpoints")
    step = checkpoint.load(saved[0])["run"]["step"]
    assert 10 < step < 42  # mid-run: after a few steps (and an epoch end), well before the last of 42
    # A later --resume drops the saved deadline (it was the stopped command's) and finishes the run exactly.
    rc, out, err = run_cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert f"step {step}" in out
    assert _same(_weights(tmp_path / "ref"), _weights(run)) and _metrics(tmp_path / "ref") == _metrics(run)


def test_stop_at_must_be_a_unix_time(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--stop-at", "-5")
    assert rc == 2 and "stop_at must be a Unix time in seconds" in err


def _tiny(monkeypatch) -> list[Run]:
    common = dict(model="f2", dataset="synthetic", epochs=3, k=5, batch_size=32, val_size=64, lr_schedule="exp:0.8")
    runs = [Run(dict(common, seed=s), {"seed": s}) for s in (0, 1)]
    monkeypatch.setitem(base.EXPERIMENTS, "tiny", Experiment("tiny", 1, "test", lambda b, s: runs))
    return runs


def _finished(folder: Path) -> dict[str, list[dict]]:
    return {p.name: _metrics(p) for p in sorted(folder.iterdir()) if (p / "summary.json").is_file()}


def test_run_with_a_deadline_stops_skips_and_a_second_run_continues(tmp_path, capsys, monkeypatch):
    _tiny(monkeypatch)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_cli(capsys, "run", "tiny", "--out", str(ref), "--threads", "1")[0] == 0
    # Too little time to start anything: nothing is trained and the command says so.
    rc, out, _ = run_cli(capsys, "run", "tiny", "--out", str(cut), "--threads", "1", "--deadline", "5")
    assert rc == 0 and out.count("not started: too little time") == 2 and not _finished(cut / "tiny")
    # The first run stops at its deadline (a checkpoint), the second is not started.
    _ticking_clock(monkeypatch)
    monkeypatch.setattr(base, "MIN_START_S", 0.0)
    rc, out, err = run_cli(capsys, "run", "tiny", "--out", str(cut), "--threads", "1", "--deadline", "20")
    assert rc == 0, err
    assert "stopped before the deadline" in out and "1 unfinished (resumable)" in out
    assert not _finished(cut / "tiny")
    started = [p for p in (cut / "tiny").iterdir() if (p / "checkpoints").is_dir()]
    assert len(started) == 1 and checkpoint.list_checkpoints(started[0] / "checkpoints")
    manifest = json.loads((cut / "tiny" / "experiment.json").read_text())
    assert started[0].name in manifest["runs"]  # the report can show the unfinished run
    monkeypatch.undo()
    _tiny(monkeypatch)
    # Run again without a deadline: the stopped run resumes, the other starts; same results as uninterrupted.
    rc, out, err = run_cli(capsys, "run", "tiny", "--out", str(cut), "--threads", "1")
    assert rc == 0, err
    assert f"resuming {started[0]}" in out
    assert _finished(cut / "tiny") == _finished(ref / "tiny") and len(_finished(ref / "tiny")) == 2


def test_deadline_runs_the_unfinished_runs_first(tmp_path, monkeypatch):
    runs = _tiny(monkeypatch)
    folder = tmp_path / "tiny"
    second = folder / runs[1].config(folder).run_name()
    (second / "checkpoints").mkdir(parents=True)
    (second / "config.yaml").write_text("")
    ordered = base.unfinished_first(runs, folder)
    assert ordered == [runs[1], runs[0]]
