"""`laperm run paper` (every README row) and its report table (issue 23)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from laperm.experiments import report
from laperm.experiments.paper import BEYOND_ROWS, METHODS, PAPER_ROWS

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_dry_run_lists_every_row_with_its_runs(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "run", "paper", "--dry-run", "--out", str(tmp_path), "--seeds", "0", "3")
    assert rc == 0, err
    lines = [x for x in out.splitlines() if x.startswith("[paper ")]
    assert len(lines) == (len(PAPER_ROWS) * len(METHODS) + len(BEYOND_ROWS)) * 2
    for row in PAPER_ROWS:
        mine = [x for x in lines if f"row={row.label} model=" in x]
        assert {(m, s) for m in METHODS for s in (0, 3)} == {
            (m, s) for x in mine for m in METHODS for s in (0, 3) if f"method={m} " in x and f"seed={s} " in x
        }, row.label
        assert all("(to train)" in x for x in mine)
    assert len(PAPER_ROWS) == 10 and {r.preset for r in PAPER_ROWS} >= {"conv13", "resnet50-p70", "f2"}
    # the pruned rows' Adam baseline starts from the same pruned init (a fixed mask), at the paper's schedule
    for row in BEYOND_ROWS:  # LaPerm only: the baseline row's Adam run is its comparison
        assert [x for x in lines if f"row={row.label} model=" in x and "seed=0 " in x and "method=laperm " in x]
        assert not [x for x in lines if f"row={row.label} model=" in x and "method=adam " in x]
    res = next(x for x in lines if "row=ResNet50 p=70%" in x and "method=adam" in x)
    assert "init=pruned:0.7" in res and "resnet50-p70-adam-seed0-" in res


def _records(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["epoch"]: r["test_acc"] for r in recs if "test_acc" in r}


def test_report_shows_the_h200_conv2_prefix(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(RESULTS / "paper", res / "paper")
    text = report.write_report(res, tmp_path / "docs").read_text()
    lap, adam = _records(res / "paper" / "conv2-laperm"), _records(res / "paper" / "conv2-adam")
    e = max(lap)  # LaPerm stopped first: compared at its last epoch
    assert max(adam) > e
    row = next(x for x in text.splitlines() if x.startswith("| Conv2 |") and "H200" in x)
    assert f"LaPerm prefix (epoch {e} of 125); Adam prefix (epoch {max(adam)} of 125) | {e} |" in row
    assert f"| {100 * lap[e]:.2f}% (" in row and f"%) | {100 * adam[e]:.2f}% (" in row
    assert f"| {100 * (lap[e] - adam[e]):+.2f} points (" in row
    assert "H200, torch 2.11+cu130, main 0555275" in row and "JPEG CIFAR-10 copy" in row
    assert "| Conv4 | CIFAR-10 | 89.17% | not run yet |" in text
    # a row is "full" exactly where its LaPerm run finished (has summary.json), whatever results/ holds now
    runs = json.loads((res / "paper" / "experiment.json").read_text())["runs"]
    done = {
        e["tags"]["row"]
        for f, e in runs.items()
        if e["tags"]["method"] == "laperm" and (res / "paper" / f / "summary.json").is_file()
    }
    for line in text.split("## Every README row")[1].split("##")[0].splitlines()[4:]:
        if line.startswith("| "):
            assert ("LaPerm full" in line) == (line[2:].split(" | ")[0] in done), line


def test_a_row_is_full_only_when_its_laperm_run_finished(tmp_path):
    folder = tmp_path / "results" / "paper"
    runs = {}
    for method, epochs, done in (("laperm", 10, True), ("adam", 6, False)):
        d = folder / f"f1-{method}"
        d.mkdir(parents=True)
        recs = [{"epoch": i, "test_acc": 0.5 + i / 100} for i in range(1, epochs + 1)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        if done:
            summary = {"epochs": epochs, "final_test_acc": 0.61, "best_test_acc": 0.61, "hardware": "GPU X"}
            (d / "summary.json").write_text(json.dumps(dict(summary, torch="2.x")))
        tags = {"row": PAPER_ROWS[0].label, "model": "f1", "method": method, "seed": 0}
        runs[d.name] = {"folder": d.name, "tags": tags, "budget": "paper", "hook": None, "command": "laperm train"}
    (folder / "experiment.json").write_text(json.dumps({"runs": runs}))
    line = {"event": "start", "step": 0, "hardware": "GPU X", "torch": "2.x", "commit": "abc1234"}
    (folder / "f1-laperm" / "provenance.jsonl").write_text(json.dumps(line) + "\n")
    text = report.write_report(folder.parent, tmp_path / "docs").read_text()
    row = next(x for x in text.splitlines() if x.startswith(f"| {PAPER_ROWS[0].label} |") and "Adam prefix" in x)
    assert "LaPerm full (10 epochs); Adam prefix (epoch 6 of 10) | 6 | 56.00% | 56.00% | +0.00 points |" in row
    # no val_acc in these records: no selected figure is made up
    assert "GPU X, torch 2.x, abc1234" in row


def _fake_run(folder: Path, name: str, tags: dict, recs: list[dict], summary: dict | None = None) -> dict:
    d = folder / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return {"folder": name, "tags": tags, "budget": "paper", "hook": None, "command": f"laperm train --name {name}"}


def _conv7_results(tmp_path: Path) -> Path:
    """Conv7 at 3 of 3 epochs, LaPerm with both rules and one Adam run; validation peaks at epoch 2, test at 3."""
    folder = tmp_path / "results" / "paper"
    conv7, latent = PAPER_ROWS[2], BEYOND_ROWS[0]
    assert conv7.label == "Conv7" and latent.baseline == "Conv7" and latent.model == "conv7"

    def recs(base: float) -> list[dict]:
        val = {1: 0.90, 2: 0.99, 3: 0.95}
        return [{"epoch": e, "val_acc": val[e], "test_acc": base + e / 100, "test_loss": 1.0 / e} for e in (1, 2, 3)]

    def summ(base: float) -> dict:
        return {
            "epochs": 3,
            "final_test_acc": base + 0.03,
            "selected_test_acc": base + 0.02,
            "hardware": "cpu",
            "torch": "2.x",
        }

    runs = {}
    for name, row, method, base in (
        ("c7-laperm", conv7, "laperm", 0.90),
        ("c7-adam", conv7, "adam", 0.80),
        ("c7-latent", latent, "laperm", 0.85),
    ):
        tags = {"row": row.label, "model": "conv7", "method": method, "seed": 0}
        runs[name] = _fake_run(folder, name, tags, recs(base), summ(base))
    (folder / "experiment.json").write_text(json.dumps({"runs": runs}))
    return folder


def test_a_row_beyond_the_paper_is_compared_with_its_baseline_rows_adam(tmp_path, monkeypatch):
    monkeypatch.setattr(PAPER_ROWS[2].__class__, "epochs", property(lambda self: 3))
    folder = _conv7_results(tmp_path)
    text = report.write_report(folder.parent, tmp_path / "docs").read_text()
    lines = text.split("## Every README row")[1].splitlines()
    paper = next(x for x in lines if x.startswith("| Conv7 |"))
    beyond = next(x for x in lines if x.startswith(f"| {BEYOND_ROWS[0].label} |"))
    # final synced accuracy at epoch 3 and, in brackets, the run's own selection on validation
    assert "LaPerm full (3 epochs); Adam full (3 epochs) | 3 | 93.00% (92.00%) | 83.00% (82.00%) |" in paper
    assert "| +10.00 points (+10.00) |" in paper
    assert "| – | LaPerm full (3 epochs); Adam full (3 epochs) | 3 | 88.00% (87.00%) | 83.00% (82.00%) |" in beyond
    assert "| +5.00 points (+5.00) |" in beyond
    assert "not run yet" not in beyond


def test_selected_on_validation_never_on_test(tmp_path):
    from laperm.experiments.report_paper import _selected_at

    recs = [{"epoch": 1, "val_acc": 0.9, "test_acc": 0.7}, {"epoch": 2, "val_acc": 0.95, "test_acc": 0.6}]
    recs.append({"epoch": 3, "val_acc": 0.95, "test_acc": 0.99})  # a tie on validation: the earlier epoch
    run = {"summary": None, "records": recs}
    assert _selected_at(run, 3) == 0.6 and _selected_at(run, 1) == 0.7
    finished = {"summary": {"epochs": 3, "selected_test_acc": 0.65}, "records": recs}
    assert _selected_at(finished, 3) == 0.65  # the run's own (finer) selection where it finished
    assert _selected_at(finished, 2) == 0.6


def test_the_curves_figure_is_drawn_from_the_metrics(tmp_path, monkeypatch):
    from laperm.analysis import plots

    monkeypatch.setattr(PAPER_ROWS[2].__class__, "epochs", property(lambda self: 3))
    folder = _conv7_results(tmp_path)
    drawn: dict = {}
    real = plots.panels
    monkeypatch.setattr(
        plots, "panels", lambda path, panels, **kw: drawn.update({Path(path).name: panels}) or real(path, panels, **kw)
    )
    text = report.write_report(folder.parent, tmp_path / "docs").read_text()
    assert "](figures/paper_conv7.png)" in text and (tmp_path / "docs" / "figures" / "paper_conv7.png").is_file()
    acc, loss = drawn["paper_conv7.png"].values()
    labels = sorted(acc)
    assert len(labels) == 3 and any("latent" in x for x in labels) and any(x.startswith("Adam") for x in labels)
    for name in ("c7-laperm", "c7-adam", "c7-latent"):
        recs = _records(folder / name)
        assert any(v == ([1, 2, 3], pytest.approx([100 * a for a in recs.values()])) for v in acc.values()), name
    assert all(v[1] == [1.0, 0.5, 1.0 / 3] for v in loss.values())
