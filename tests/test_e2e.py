"""End to end: `laperm train` on synthetic data writes a complete, verifiable run folder."""

import json
from pathlib import Path

import torch

from laperm import checkpoint, cli, reconnect
from laperm.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def test_train_synthetic_run_folder_and_verify(tmp_path, capsys):
    code = run_cli(
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "lenet300",
        "--epochs",
        "3",
        "--k",
        "5",
        "--val-size",
        "64",
        "--out",
        str(tmp_path),
        "--name",
        "run",
        "--no-progress",
    )
    out = capsys.readouterr().out
    assert code == 0, out
    run = tmp_path / "run"
    for name in ("config.yaml", "init.pt", "metrics.jsonl", "best.pt", "final.pt", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("ckpt-*.pt"))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_acc"] > 0.5  # synthetic classes are easy; chance is 0.1
    # best-test is the best over every evaluation of the run, the final model's included
    assert summary["best_test_acc"] == max([summary["final_test_acc"], *(r["test_acc"] for r in records)])
    assert "verified" in out and "row-wise permutations" in out
    # The saved weights really are row permutations of θ0, and training moved them.
    init = checkpoint.load(run / "init.pt")
    final = checkpoint.load(run / "final.pt")["model"]
    permuted = {r["name"] for r in init["permuted"]}
    assert permuted == {"fc1.weight", "fc2.weight", "fc3.weight"} or len(permuted) == 3
    for name in permuted:
        assert reconnect.is_row_permutation(final[name], init["state"][name])
        assert not torch.equal(final[name], init["state"][name])
    # What LaPerm did with each parameter: the table in the run folder, its total line printed, the free
    # tensors (and why) in init.pt and in `laperm verify`'s report.
    table = (run / "laperm.txt").read_text()
    assert "fc1.weight" in table and "free: 1-D (permute_biases=False)" in table
    total = table.strip().splitlines()[-1]
    assert total.startswith("Total: 3 of 6 parameters permuted") and total in out
    assert init["free"] == [{"name": f"fc{i}.bias", "reason": "1-D (permute_biases=False)"} for i in (1, 2, 3)]
    assert run_cli("verify", str(run)) == 0
    verified = capsys.readouterr().out
    assert "verified" in verified and "free: 3 x 1-D (permute_biases=False)" in verified


def test_verify_detects_a_tampered_run(tmp_path, capsys):
    assert (
        run_cli(
            "train",
            "--dataset",
            "synthetic",
            "--model",
            "f1",
            "--epochs",
            "1",
            "--k",
            "2",
            "--val-size",
            "0",
            "--out",
            str(tmp_path),
            "--name",
            "r",
            "--no-progress",
        )
        == 0
    )
    run = tmp_path / "r"
    final = checkpoint.load(run / "final.pt")
    w = final["model"]["fc.weight"] if "fc.weight" in final["model"] else next(iter(final["model"].values()))
    w.view(-1)[0] += 1.0
    checkpoint.save(final, run / "final.pt")
    capsys.readouterr()
    assert run_cli("verify", str(run)) == 1
    assert "NOT a permutation" in capsys.readouterr().out


def test_adam_baseline_keeps_a_fixed_pruning_mask(tmp_path):
    assert (
        run_cli(
            "train",
            "--dataset",
            "synthetic",
            "--model",
            "lenet300",
            "--optimizer",
            "adam",
            "--init",
            "pruned:0.6",
            "--epochs",
            "1",
            "--val-size",
            "0",
            "--out",
            str(tmp_path),
            "--name",
            "b",
            "--no-progress",
        )
        == 0
    )
    init = checkpoint.load(tmp_path / "b" / "init.pt")["state"]
    final = checkpoint.load(tmp_path / "b" / "final.pt")["model"]
    for name in ("fc2.weight", "fc3.weight"):
        if name in init:
            zero0 = init[name] == 0
            assert zero0.float().mean() > 0.4
            assert torch.all(final[name][zero0] == 0)
            assert not torch.equal(final[name], init[name])
