"""`laperm run paper` (every README row) and its report table (issue 23)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_cli

from laperm.experiments import report
from laperm.experiments.paper import METHODS, PAPER_ROWS

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_dry_run_lists_every_row_with_its_runs(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "run", "paper", "--dry-run", "--out", str(tmp_path), "--seeds", "0", "3")
    assert rc == 0, err
    lines = [x for x in out.splitlines() if x.startswith("[paper ")]
    assert len(lines) == len(PAPER_ROWS) * len(METHODS) * 2
    for row in PAPER_ROWS:
        mine = [x for x in lines if f"row={row.label} model=" in x]
        assert {(m, s) for m in METHODS for s in (0, 3)} == {
            (m, s) for x in mine for m in METHODS for s in (0, 3) if f"method={m} " in x and f"seed={s} " in x
        }, row.label
        assert all("(to train)" in x for x in mine)
    assert len(PAPER_ROWS) == 10 and {r.preset for r in PAPER_ROWS} >= {"conv13", "resnet50-p70", "f2"}
    # the pruned rows' Adam baseline starts from the same pruned init (a fixed mask), at the paper's schedule
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
    assert f"| {100 * lap[e]:.2f}% | {100 * adam[e]:.2f}% | {100 * (lap[e] - adam[e]):+.2f} points |" in row
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
    assert "GPU X, torch 2.x, abc1234" in row
