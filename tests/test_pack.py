"""``laperm pack`` / ``laperm unpack``: a run stopped mid-way, packed, unpacked elsewhere and resumed
ends exactly like the run that was never stopped (same machine: bit for bit)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli

from laperm import checkpoint, rundir
from laperm.pack import PackError, pack_runs, unpack
from laperm.pack.plan import MIB
from laperm.pack.runs import decode_run, encode_run, inspect_run
from laperm.pack.tensors import Blobs, Theta0, decode_object, encode_object, read_blob, same_object

pytestmark = pytest.mark.usefixtures("clean_engine_state")

# lenet300 on 256 MNIST images: 4 steps per epoch, 3 epochs, a sync every 3 steps.
ARGS = [
    "--model",
    "lenet300",
    "--dataset",
    "mnist",
    "--train-subset",
    "256",
    "--val-size",
    "64",
    "--epochs",
    "3",
    "--k",
    "3",
    "--batch-size",
    "64",
    "--threads",
    "1",
    "--no-progress",
]
TIMING = {"epoch_time_s", "images_per_s", "train_time_s"}


def _metrics(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rundir.read_metrics(run)]


def _newest_checkpoint(run):
    return checkpoint.load(checkpoint.list_checkpoints(run / rundir.CHECKPOINTS)[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run stopped at step 3 (a sync point) and at step 5 (between syncs)."""
    mp = pytest.MonkeyPatch()
    n = torch.get_num_threads()
    base = tmp_path_factory.mktemp("runs")
    from laperm.cli import main

    assert main(["train", *ARGS, "--out", str(base / "ref"), "--name", "run"]) == 0
    for stop in (3, 5):
        mp.setenv(checkpoint.FAULT_ENV, f"term@step:{stop}")
        checkpoint.reset_fault_counts()
        assert main(["train", *ARGS, "--out", str(base / f"stop{stop}" / "exp"), "--name", "run"]) == 3
        mp.delenv(checkpoint.FAULT_ENV)
    (base / "stop5" / "exp" / "experiment.json").write_text('{"name": "exp"}\n')
    torch.set_num_threads(n)
    mp.undo()
    return base


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 5])
def test_pack_unpack_resume_is_bit_identical_to_the_uninterrupted_run(runs, tmp_path, capsys, stop):
    work = tmp_path / "work"
    shutil.copytree(runs / f"stop{stop}", work)
    rc, out, err = run_cli(capsys, "pack", str(work / "exp"), "--out", str(tmp_path / "pack"))
    assert rc == 0, err
    assert out.startswith("packed 1 of 1 runs (1 unfinished, 0 finished)") and len(out.strip().splitlines()) == 1
    plan = json.loads((tmp_path / "pack" / "plan.json").read_text())
    (record,) = plan["runs"]
    assert record["path"] == "exp/run" and record["checkpoint"] == f"ckpt-{stop:09d}.pt" and record["step"] == stop
    # θ0 and LaPerm's sorted θ0 rows are rebuilt, never stored; at step 3 the weights are synced: codes.
    assert record["tensors"]["theta0"] >= 6 and record["tensors"]["sorted"] == 3
    assert record["tensors"].get("codes", 0) >= (3 if stop == 3 else 6)  # step 5: prev_synced and best, synced
    assert record["nbytes"] < record["folder_nbytes"] / 2

    elsewhere = tmp_path / "elsewhere"
    rc, out, err = run_cli(capsys, "unpack", str(tmp_path / "pack"), "--into", str(elsewhere))
    assert rc == 0, err
    run = elsewhere / "exp" / "run"
    assert (elsewhere / "exp" / "experiment.json").exists() == (stop == 5)
    # init.pt is rebuilt from its recipe; every file comes back byte for byte (same torch, CPU).
    ckpt = f"checkpoints/ckpt-{stop:09d}.pt"
    for name in ("init.pt", ckpt, "config.yaml", "metrics.jsonl", *(["best.pt"] if stop == 5 else [])):
        assert (run / name).read_bytes() == (work / "exp" / "run" / name).read_bytes(), name
    shutil.rmtree(work)  # the original is gone: only the unpacked copy continues

    assert run_cli(capsys, "train", "--resume", str(run))[0] == 0
    ref = runs / "ref" / "run"
    for name in ("final.pt", "best.pt"):
        assert same_object(checkpoint.load(run / name)["model"], checkpoint.load(ref / name)["model"])
    assert _metrics(run) == _metrics(ref)
    mine, theirs = _newest_checkpoint(run), _newest_checkpoint(ref)
    for key in ("model", "optimizer", "rng", "loader", "scheduler"):
        assert same_object(mine[key], theirs[key]), key
    assert run_cli(capsys, "verify", str(run))[0] == 0


@pytest.mark.slow
def test_parts_limits_waiting_runs_and_newer_folders(runs, tmp_path, capsys):
    paths = [runs / "stop3" / "exp", runs / "stop5" / "exp", runs / "ref"]
    with pytest.raises(PackError, match="would both unpack to exp/run"):
        pack_runs(paths[:2], tmp_path / "clash")
    whole = pack_runs([paths[0], paths[2]], tmp_path / "whole", max_file_mib=0.25)
    sizes = {r["path"]: r["nbytes"] for r in whole["runs"]}
    assert whole["totals"]["packed"] == 2 and len(whole["parts"]) > 2
    assert all(p["nbytes"] <= 0.25 * MIB for p in whole["parts"])
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == sorted(
        ["plan.json", "plan.md", *(p["name"] for p in whole["parts"])]
    )
    # Room for the finished run's results and the unfinished state, not the finished run's weights.
    results_only = len(encode_run(inspect_run(paths[2] / "run", "ref/run"), weights=False)[0])
    extras, reserve = whole["extras"]["nbytes"], whole["limits"]["plan_reserve"]
    limit = (reserve + extras + results_only + sizes["exp/run"] + 1024) / MIB
    plan = pack_runs([paths[0], paths[2]], tmp_path / "tight", max_total_mib=limit)
    by_path = {r["path"]: r for r in plan["runs"]}
    assert by_path["exp/run"]["packed"] and by_path["exp/run"]["weights"]
    assert by_path["ref/run"]["packed"] and not by_path["ref/run"]["weights"]
    assert "weights left behind" in by_path["ref/run"]["reason"]
    assert sum(p.stat().st_size for p in (tmp_path / "tight").iterdir()) <= limit * MIB
    # Less room (the finished run's results go first): the unfinished run waits, whole; the plan says so.
    limit = (reserve + extras + sizes["exp/run"] + results_only // 2) / MIB
    plan = pack_runs([paths[0], paths[2]], tmp_path / "tighter", max_total_mib=limit)
    waiting = next(r for r in plan["runs"] if r["path"] == "exp/run")
    assert not waiting["packed"] and "did not fit --max-total-mib" in waiting["reason"]
    assert "waits" in (tmp_path / "tighter" / "plan.md").read_text()
    rc, out, err = run_cli(capsys, "pack", str(paths[0]), "--out", str(tmp_path / "tiny"), "--max-total-mib", "0.1")
    assert rc == 2 and "too large" in err and "raise --max-total-mib" in err and len(err.strip().splitlines()) == 1

    # Unpacked where the run went on (finished): refused unless --force; the finished one is restored.
    into = tmp_path / "into"
    shutil.copytree(runs / "ref" / "run", into / "exp" / "run")
    rc, out, err = run_cli(capsys, "unpack", str(tmp_path / "whole"), "--into", str(into))
    assert rc == 2 and "is newer: it got further (epoch, step, finished)" in err and "--force" in err
    assert (into / "ref" / "run" / "final.pt").is_file() and (into / "exp" / "run" / "final.pt").is_file()
    assert run_cli(capsys, "unpack", str(tmp_path / "whole"), "--into", str(into), "--force")[0] == 0
    assert not (into / "exp" / "run" / "final.pt").exists()
    assert run_cli(capsys, "verify", str(into / "ref" / "run"))[0] == 0


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "pack", str(tmp_path / "nope"), "--out", str(tmp_path / "p"))
    assert rc == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "pack", str(tmp_path / "empty"), "--out", str(tmp_path / "p"))
    assert rc == 2 and "no run folders" in err
    rc, _, err = run_cli(capsys, "unpack", str(tmp_path / "empty"))
    assert rc == 2 and "not a pack folder" in err
    for e in (err,):
        assert len(e.strip().splitlines()) == 1 and "Traceback" not in e


def test_tensors_round_trip_exactly_and_unknown_fields_travel_raw():
    torch.manual_seed(0)
    from laperm.reconnect import RowLayout

    w0 = torch.randn(4, 6)
    theta0 = Theta0({"w": w0, "b": torch.zeros(4)}, {"w": RowLayout()})
    permuted = torch.stack([row[torch.randperm(6)] for row in w0])
    obj = {
        "model": {"w": permuted, "b": torch.tensor([0.0, -0.0, 1.0, float("nan")])},
        "opt": {
            0: {"exp_avg": torch.randn(4, 6), "laperm_sorted": torch.sort(w0, 1).values, "step": torch.tensor(3.0)}
        },
        "future_field": {"inner": torch.randn(4, 6), "flag": (1, "x", None), "mask": torch.tensor([True, False])},
        "init": w0.clone(),
    }
    blobs = Blobs()
    skeleton, entries = encode_object(obj, theta0, blobs)
    assert [e["enc"] for e in entries] == ["codes", "raw", "raw", "sorted", "raw", "raw", "raw", "theta0"]
    meta, area = blobs.seal()
    back = decode_object(skeleton, entries, theta0, lambda i: read_blob(meta, area, i))
    assert same_object(back, obj)
    assert not same_object(back, {**obj, "init": -w0})
    assert same_object(torch.tensor([-0.0]), torch.tensor([-0.0])) and not same_object(
        torch.tensor([-0.0]), torch.tensor([0.0])
    )


def test_a_damaged_package_is_refused(tmp_path):
    run = tmp_path / "exp" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: f2\nepochs: 2\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    package, _ = encode_run(inspect_run(run, "exp/run"))
    assert decode_run(package)["metrics.jsonl"] == b'{"epoch": 1}\n'
    with pytest.raises(PackError):
        decode_run(package[:-5] + b"xxxxx")
    pack_runs([tmp_path / "exp"], tmp_path / "p")
    part = tmp_path / "p" / "data-000.bin"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(PackError, match="damaged or truncated"):
        unpack(tmp_path / "p", tmp_path / "u")


@pytest.mark.slow
def test_when_the_recipe_does_not_rebuild_theta0_it_travels_in_init_pt(tmp_path, capsys, monkeypatch):
    """Another torch could seed a different θ0: then init.pt is carried (raw) and codes refer to it."""
    args = ["--model", "f1", "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32", "--epochs", "1"]
    args += ["--batch-size", "32", "--k", "2", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--name", "r"]
    assert run_cli(capsys, "train", *args)[0] == 0
    import laperm.pack.runs as runs_module

    monkeypatch.setattr(runs_module, "rebuild_theta0", lambda recipe: {})
    plan = pack_runs([tmp_path / "r"], tmp_path / "pack")
    (record,) = plan["runs"]
    assert record["finished"] and record["weights"] and "theta0" not in record["tensors"]
    assert record["tensors"]["codes"] == 2  # final.pt and best.pt, against init.pt's θ0
    monkeypatch.undo()
    unpack(tmp_path / "pack", tmp_path / "u")
    for name in ("init.pt", "final.pt", "best.pt", "config.yaml", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "u" / "r" / name).read_bytes() == (tmp_path / "r" / name).read_bytes(), name
    assert run_cli(capsys, "verify", str(tmp_path / "u" / "r"))[0] == 0
