"""Experiments: resumable runs on synthetic data end to end, and ``laperm report`` on stored metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from laperm.cli import main
from laperm.experiments import base, report
from laperm.experiments.base import Experiment, Run


def _write_run(folder: Path, name: str, tags: dict, summary: dict | None, records: list[dict], **extra) -> dict:
    d = folder / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    for fname, text in extra.items():
        (d / fname.replace("_", ".")).write_text(text)
    return {
        "folder": name,
        "tags": tags,
        "budget": "paper",
        "hook": None,
        "command": f"laperm train --preset {tags['model']} --seed {tags['seed']} --out results/x",
    }


def _summary(sel, final, best):
    return {
        "selected_test_acc": sel,
        "final_test_acc": final,
        "best_test_acc": best,
        "epochs": 10,
        "train_time_s": 60.0,
        "torch": "2.x",
    }


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """A tiny results folder: agnostic F1 (two seeds), one unfinished dense run, rebuild and dynamics."""
    res = tmp_path / "results"
    runs = {}
    recs = [{"epoch": 1, "test_acc": 0.5, "val_acc": 0.5}, {"epoch": 2, "test_acc": 0.8, "val_acc": 0.7}]
    for seed, (sel, final, best) in enumerate([(0.82, 0.81, 0.84), (0.84, 0.83, 0.86)]):
        e = _write_run(
            res / "agnostic",
            f"f1-{seed}",
            {"model": "f1", "method": "LaPerm", "seed": seed, "init": "shared"},
            _summary(sel, final, best),
            recs,
        )
        runs[e["folder"]] = e
    (res / "agnostic" / "experiment.json").write_text(json.dumps({"runs": runs}))
    e = _write_run(
        res / "dense",
        "conv7-l",
        {"model": "conv7", "method": "laperm", "seed": 0, "budget": "reduced"},
        None,
        recs + [{"epoch": 3, "train_loss": 1.0}],
    )
    (res / "dense" / "experiment.json").write_text(json.dumps({"runs": {e["folder"]: e}}))
    rb = [{"epoch": 1, "trained": 0.9, "rebuilt": 0.45, "rebuilt_fresh": 0.3, "random_perm": 0.1}]
    e = _write_run(
        res / "rebuild",
        "lenet",
        {"model": "lenet300", "seed": 0},
        _summary(0.9, 0.9, 0.9),
        recs,
        rebuild_jsonl=json.dumps(rb[0]) + "\n",
    )
    (res / "rebuild" / "experiment.json").write_text(json.dumps({"runs": {e["folder"]: e}}))
    dyn = {
        "syncs": [
            {"step": 2, "moved": {"fc.weight": 0.5}, "moved_total": 0.5},
            {"step": 4, "moved": {"fc.weight": 0.0}, "moved_total": 0.0},
        ]
    }
    e = _write_run(
        res / "dynamics", "f1", {"model": "f1", "seed": 0}, _summary(0.8, 0.8, 0.8), recs, dynamics_json=json.dumps(dyn)
    )
    np.savez(
        res / "dynamics" / "f1" / "snapshots.npz",
        steps=np.array([0, 2, 4]),
        **{"fc.weight": np.zeros((3, 10, 784), np.float16)},
    )
    (res / "dynamics" / "experiment.json").write_text(json.dumps({"runs": {e["folder"]: e}}))
    (res / "notes").mkdir()
    (res / "notes" / "agnostic.md").write_text("Hand-written reading.")
    return res


def test_report_from_stored_metrics(stored: Path, tmp_path: Path):
    docs = tmp_path / "docs"
    assert main(["report", "--results", str(stored), "--docs", str(docs)]) == 0
    text = (docs / "results.md").read_text()
    # F1: mean ± sample std of the two seeds, each selection rule in its own column
    assert (
        "| F1 {0, 0.08}, p=40% | MNIST | 85.46% (authors' code here: 83.75%) | 83.00 ± 1.41% | 82.00 ± 1.41% "
        "| 85.00 ± 1.41% | – | 10; paper budget | 2 |" in text
    )
    assert "Hand-written reading." in text
    assert (
        "2 (unfinished: last evaluated epoch)" in text
    )  # the unfinished conv7 run is labelled, with its last evaluated epoch
    assert "| lenet300 | 1 | 90.00% | 45.00% | – | 50.0% | 30.00% | 10.00% |" in text  # kept = 45/90
    assert "| Conv4 | CIFAR-10 | 89.17% | not run here" in text
    for fig in ("agnostic.png", "rebuild_lenet300.png", "dynamics.png", "f1_templates.png", "f1_templates.gif"):
        assert (docs / "figures" / fig).is_file(), fig


def test_fmt_acc_and_mean_std():
    assert report.fmt_acc([]) == "–"
    assert report.fmt_acc([0.5]) == "50.00%"
    assert report.fmt_acc([0.5, 0.7, None]) == "60.00 ± 14.14%"


def test_quick_experiment_end_to_end_and_resumable(tmp_path: Path, monkeypatch):
    """A two-run experiment on synthetic data: trains, writes analysis files, skips finished runs."""
    common = dict(
        model="f1", dataset="synthetic", epochs=2, batch_size=64, val_size=64, k=4, init="shared:0.08:0.6", lr=0.01
    )
    runs = [
        Run(dict(common, seed=0), {"model": "f1", "method": "LaPerm", "seed": 0}, hook="dynamics"),
        Run(
            dict(common, optimizer="adam", init="he-uniform", seed=0),
            {"model": "f1", "method": "Adam", "seed": 0},
            hook="rebuild",
        ),
    ]
    monkeypatch.setitem(base.EXPERIMENTS, "tiny", Experiment("tiny", 1, "test", lambda b, s: runs))
    log: list[str] = []
    entries = base.run_experiment("tiny", out=tmp_path, threads=1, log=log.append)
    folder = tmp_path / "tiny"
    first, second = (folder / e["folder"] for e in entries)
    assert (first / "summary.json").is_file() and (second / "summary.json").is_file()
    dyn = json.loads((first / "dynamics.json").read_text())["syncs"]
    assert dyn and all(0 <= s["moved_total"] <= 1 for s in dyn)
    assert np.load(first / "snapshots.npz")["fc.weight"].shape[1:] == (10, 784)
    rebuilt = [json.loads(x) for x in (second / "rebuild.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rebuilt] == [1, 2]
    assert set(rebuilt[0]) >= {"trained", "rebuilt", "rebuilt_fresh", "random_perm"}
    manifest = json.loads((folder / "experiment.json").read_text())
    assert set(manifest["runs"]) == {e["folder"] for e in entries}
    assert manifest["runs"][first.name]["command"].startswith("laperm train --model f1 --dataset synthetic")
    log.clear()
    runs[0].tags["part"] = "renamed"  # the experiment's tags changed since the runs trained
    base.run_experiment("tiny", out=tmp_path, threads=1, log=log.append)
    assert sum("(done)" in line for line in log) == 2  # nothing retrained
    again = json.loads((folder / "experiment.json").read_text())["runs"]
    assert again[first.name]["tags"]["part"] == "renamed"  # the manifest follows the experiment...
    assert (
        again[first.name]["wall_s"] == manifest["runs"][first.name]["wall_s"] > 0
    )  # ...keeping what training measured


def test_run_list_and_unknown_experiment(capsys):
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("agnostic", "k", "sparse", "dense", "rebuild", "profiles", "dynamics", "f2-research"):
        assert name in out
    assert main(["run", "nope"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_command_for_round_trips_flags():
    run = Run({"preset": "f2", "k": 20, "permute_biases": False, "k_schedule": {0: 1}})
    assert (
        base.command_for(run, Path("results/k"))
        == "laperm train --preset f2 --k 20 --no-permute-biases --mode eager --out results/k"
    )


def test_evaluate_unfinished_reads_the_newest_checkpoint(tmp_path: Path):
    from laperm.config import resolve_config
    from laperm.experiments.partial import evaluate_unfinished
    from laperm.train import train

    cfg = resolve_config(
        dict(
            model="f1",
            dataset="synthetic",
            epochs=2,
            batch_size=64,
            val_size=64,
            k=4,
            init="shared:0.08:0.6",
            lr=0.01,
            out=str(tmp_path),
            name="r",
            progress=False,
            threads=1,
        )
    )
    summary = train(cfg, log=lambda *_: None)
    run_dir = tmp_path / "r"
    assert evaluate_unfinished(run_dir) is None  # finished: nothing to do
    (run_dir / "summary.json").unlink()  # pretend it stopped after its last checkpoint
    out = evaluate_unfinished(run_dir)
    assert out["epoch"] == 2 and out["synced"]
    assert out["test_acc"] == pytest.approx(summary["final_test_acc"])  # same synced weights, same number
    assert json.loads((run_dir / "partial.json").read_text())["test_acc"] == out["test_acc"]


def test_report_compares_stopped_gpu_runs_at_the_epoch_both_reached(tmp_path: Path):
    """The `full` experiment's runs may stop early (device time): compare LaPerm and Adam at a common epoch."""
    res = tmp_path / "results"
    curve = {"laperm": [0.40, 0.50, 0.60], "adam": [0.45, 0.58, 0.64, 0.70, 0.72]}
    runs = {}
    for method, accs in curve.items():
        recs = [
            {"epoch": i + 1, "test_acc": a, "val_acc": a + (0.2 if i == 1 else 0), "images_per_s": 5000.0}
            for i, a in enumerate(accs)
        ]
        e = _write_run(
            res / "full",
            f"conv2-{method}",
            {"model": "conv2", "method": method, "budget": "full", "seed": 0},
            None,
            recs,
            config_yaml="epochs: 125\n",
        )
        runs[e["folder"]] = e
    (res / "full" / "experiment.json").write_text(json.dumps({"runs": runs}))
    (res / "full" / "hardware.txt").write_text("name, memory.total [MiB]\nNVIDIA H100 80GB HBM3, 81559 MiB\n")
    docs = tmp_path / "docs"
    report.write_report(res, docs)
    text = (docs / "results.md").read_text()
    # at epoch 3: 60% vs 64%; selected: the epoch-2 (val-best) models, 50% vs 58%; best-test 60% vs 64%
    assert "| conv2 | laperm | 3 of 125 (stopped) | 3 | 60.00% | 50.00% | 60.00% | 5,000 |" in text
    assert "| conv2 | adam | 5 of 125 (stopped) | 3 | 64.00% | 58.00% | 64.00% | 5,000 |" in text
    assert "| conv2 | LaPerm − Adam |  | 3 | -4.00 points | -8.00 points | -4.00 points |  |" in text
    # the README row: Adam at LaPerm's last epoch, not at its own; the stop and the card are said
    row = next(line for line in text.splitlines() if line.startswith("| Conv2 |"))
    assert "64.00% (epoch 3)" in row and "STOPPED after epoch 3 of 125" in row and "NVIDIA H100 80GB HBM3" in row
    assert "which ran on one NVIDIA H100 80GB HBM3 GPU" in text
    assert (docs / "figures" / "full_conv2.png").is_file()


def test_added_seeds_never_replace_the_preregistered_mean(tmp_path: Path):
    res = tmp_path / "results"
    runs = {}
    for seed, acc in enumerate([0.80, 0.82, 0.84, 0.90, 0.90]):
        e = _write_run(
            res / "agnostic",
            f"f1-{seed}",
            {"model": "f1", "method": "LaPerm", "seed": seed, "init": "shared"},
            _summary(acc, acc, acc),
            [],
        )
        runs[e["folder"]] = e
    (res / "agnostic" / "experiment.json").write_text(json.dumps({"runs": runs}))
    report.write_report(res, tmp_path / "docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| F1 {0, 0.08}, p=40% [seeds 0–2] | MNIST | 85.46% (authors' code here: 83.75%) | 82.00 ± 2.00% |" in text
    assert (
        "| F1 {0, 0.08}, p=40% [all seeds 0–4] | MNIST | 85.46% (authors' code here: 83.75%) | 85.20 ± 4.60% |" in text
    )


def test_rebuild_schedule_thins_out_long_runs():
    from laperm.experiments.hooks import rebuild_epoch

    assert [e for e in range(1, 13) if rebuild_epoch(e, 12)] == list(range(1, 13))
    assert [e for e in range(1, 46) if rebuild_epoch(e, 45)] == [1, 2, 5, 10, 20, 30, 40, 45]


def test_cifar_jpeg_pack_round_trip_is_byte_identical(tmp_path: Path):
    """scripts/cifar_jpeg_pack.py: headers stored once, every file rebuilt byte for byte."""
    import importlib.util
    import io
    import zipfile

    from PIL import Image

    spec = importlib.util.spec_from_file_location(
        "pack", Path(__file__).parent.parent / "scripts" / "cifar_jpeg_pack.py"
    )
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    rng = np.random.default_rng(0)
    src = tmp_path / "c.zip"
    files = {}
    with zipfile.ZipFile(src, "w") as z:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                buf, "JPEG", quality=75 if i % 3 else 90
            )  # two quality levels: two distinct headers
            files[f"train/cat/{i:04d}.jpg"] = buf.getvalue()
            z.writestr(f"train/cat/{i:04d}.jpg", buf.getvalue())
    pack.pack(src, tmp_path / "packed")
    assert len(json.loads((tmp_path / "packed" / "index.json").read_text())["headers"]) == 2
    pack.unpack(tmp_path / "packed", tmp_path / "out" / "c.zip")
    with zipfile.ZipFile(tmp_path / "out" / "c.zip") as z:
        assert {n: z.read(n) for n in z.namelist()} == files
    (tmp_path / "packed" / "body.bin").write_bytes(b"\0" + (tmp_path / "packed" / "body.bin").read_bytes()[1:])
    with pytest.raises(SystemExit, match="differ"):
        pack.unpack(tmp_path / "packed", tmp_path / "out" / "d.zip")


def test_engine_callbacks_see_the_optimizer_and_the_weights_in_the_right_state(tmp_path: Path):
    """train(callbacks=...): the supported way for analyses to ride along (no monkeypatching)."""
    from laperm.config import resolve_config
    from laperm.train import Callbacks, train

    events: list[tuple] = []

    class Spy(Callbacks):
        def on_optimizer(self, opt, model):
            events.append(("optimizer", type(opt).__name__))

        def before_evaluation(self, record, model, opt):
            events.append(("before", record["epoch"], opt.is_synced))

        def on_epoch(self, record, model, opt):
            events.append(("epoch", record["epoch"], opt.is_synced, "test_acc" in record))
            record["spy"] = 1

    # 7 steps per epoch and k=3: the epoch ends are never sync steps
    cfg = resolve_config(
        dict(
            model="f1",
            dataset="synthetic",
            epochs=2,
            batch_size=64,
            val_size=64,
            k=3,
            threads=1,
            progress=False,
            out=str(tmp_path),
            name="r",
        )
    )
    train(cfg, callbacks=Spy(), log=lambda m: None)
    assert events == [
        ("optimizer", "LaPerm"),
        ("before", 1, False),
        ("epoch", 1, True, True),
        ("before", 2, False),
        ("epoch", 2, True, True),
    ]
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["spy"] for r in recs] == [1, 1]
    with pytest.raises(TypeError):
        train(cfg, callbacks=Spy(), on_epoch=lambda *a: None)


@pytest.mark.parametrize("rule", ["overwrite", "latent"])
def test_inner_probe_records_inner_accuracy_and_class_recall(tmp_path: Path, monkeypatch, rule):
    common = dict(
        model="f1",
        dataset="synthetic",
        epochs=2,
        batch_size=64,
        val_size=64,
        k=3,
        lr=0.01,
        init="shared:0.08:0.6",
        sync_rule=rule,
        seed=0,
    )
    monkeypatch.setitem(
        base.EXPERIMENTS,
        "tiny",
        Experiment("tiny", 1, "test", lambda b, s: [Run(common, {"model": "f1", "seed": 0}, hook="inner")]),
    )
    (entry,) = base.run_experiment("tiny", out=tmp_path, threads=1, log=lambda m: None)
    recs = [json.loads(x) for x in (tmp_path / "tiny" / entry["folder"] / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        assert 0 <= r["inner_test_acc"] <= 1
        assert len(r["class_recall"]) == 10 and all(0 <= x <= 1 for x in r["class_recall"])


@pytest.mark.slow
def test_parallel_runs_give_the_same_folders_and_metrics_as_sequential(tmp_path: Path, monkeypatch, capsys):
    """`laperm run --parallel 2` trains each run as its own `laperm train` process: same results as in turn."""
    common = dict(model="f1", dataset="synthetic", epochs=1, batch_size=64, val_size=64, k=4, k_schedule={0: 3})
    runs = [
        Run(dict(common, seed=s, optimizer=o), {"seed": s, "method": o}) for s in (0, 1) for o in ("laperm", "adam")
    ]
    monkeypatch.setitem(base.EXPERIMENTS, "tiny", Experiment("tiny", 1, "test", lambda b, s: runs))
    timing = {"epoch_time_s", "images_per_s", "train_time_s"}

    def results(out: Path) -> dict[str, list[dict]]:
        from laperm import rundir

        folders = [p for p in sorted((out / "tiny").iterdir()) if (p / "summary.json").is_file()]
        return {
            p.name: [{k: v for k, v in r.items() if k not in timing} for r in rundir.read_metrics(p / "metrics.jsonl")]
            for p in folders
        }

    seq, par = tmp_path / "seq", tmp_path / "par"
    assert main(["run", "tiny", "--out", str(seq), "--threads", "1"]) == 0
    assert main(["run", "tiny", "--out", str(par), "--threads", "1", "--parallel", "2"]) == 0
    assert len(results(seq)) == 4 and results(seq) == results(par)
    logs = sorted((par / "tiny" / "logs").glob("run-*.log"))
    assert len(logs) == 4 and all("test accuracy" in p.read_text() for p in logs)
    manifest = json.loads((par / "tiny" / "experiment.json").read_text())
    assert set(manifest["runs"]) == set(results(seq))
    capsys.readouterr()
    assert main(["run", "tiny", "--out", str(par), "--parallel", "2"]) == 0  # all done: nothing retrained
    assert capsys.readouterr().out.count("(done)") == 4


@pytest.mark.slow
def test_parallel_reports_failed_runs_by_their_log(tmp_path: Path, monkeypatch, capsys):
    runs = [Run(dict(model="f1", dataset="synthetic", epochs=1, val_size=64), {"seed": 0})]
    runs.append(Run(dict(runs[0].overrides, val_size=600), {"seed": 1}))  # no training data left: the run fails
    monkeypatch.setitem(base.EXPERIMENTS, "bad", Experiment("bad", 1, "test", lambda b, s: runs))
    assert main(["run", "bad", "--out", str(tmp_path), "--parallel", "2"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and "run-1.log (exit 2)" in err, err


def test_missing_data_is_refused_before_any_run_trains(tmp_path: Path, monkeypatch, capsys):
    """Issue 33 (validate first): a run whose data is missing stops `laperm run` before anything is
    written, not after the runs before it trained and left their folders."""
    runs = [Run(dict(model="f1", dataset="synthetic", epochs=1, val_size=64), {"seed": 0})]
    runs.append(Run(dict(runs[0].overrides, dataset="idx", data_dir=str(tmp_path / "none")), {"seed": 1}))
    monkeypatch.setitem(base.EXPERIMENTS, "bad", Experiment("bad", 1, "test", lambda b, s: runs))
    assert main(["run", "bad", "--out", str(tmp_path / "results")]) == 2
    assert "laperm: error: " in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
