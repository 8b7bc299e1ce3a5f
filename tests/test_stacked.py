"""Stacked training: N runs as one stacked model give each member its single run's results.

The member loop (``vectorize=False``) computes what single runs compute, so its results are
compared bit for bit. The vectorised path (vmap) batches each layer's matmuls over the members,
which reassociates their sums: there the tolerance is stated with each comparison.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from laperm import checkpoint, cli, models, verify
from laperm.config import ConfigError, TrainConfig
from laperm.engine import train
from laperm.engine.stack_session import parse_seeds, plan_stack, train_stack
from laperm.models.stacked import LossSpec, StackedModel
from laperm.rundir import read_metrics, read_run_config


def quiet(message: str) -> None:
    pass


def base_config(out: Path, model: str = "lenet300", **kw) -> TrainConfig:
    dataset = "synthetic-cifar" if model == "conv2" else "synthetic"
    fields = dict(model=model, dataset=dataset, epochs=2, k=3, val_size=64, train_subset=128, batch_size=32)
    return TrainConfig(**{**fields, **kw, "out": str(out), "progress": False})


def singles(cfgs: list[TrainConfig], out: Path) -> None:
    for c in cfgs:
        train(TrainConfig(**{**c.to_dict(), "out": str(out)}), log=quiet)


def files(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: checkpoint.load(run / name)["model"] for name in ("final.pt", "best.pt")}


def metrics(run: Path) -> list[tuple[float, float, float]]:
    return [(r["train_loss"], r["val_acc"], r["test_acc"]) for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "extra"),
    [("lenet300", {}), ("f2", {"init": "shared:0.05:0.6"}), ("conv2", {"train_subset": 64, "epochs": 1, "k": 1})],
)
def test_member_loop_equals_single_runs_bit_for_bit(tmp_path, model, extra):
    """LaPerm and Adam members (syncs every 3 steps, BN and dropout in Conv2): the same files as single runs."""
    cfgs = plan_stack(base_config(tmp_path / "stack", model, **extra), [0, 1], ["laperm", "adam"])
    if model == "conv2":  # (4.3M weights: two members, a LaPerm and an Adam one, keep it short)
        cfgs = [cfgs[0], cfgs[3]]
    summaries = train_stack(cfgs, vectorize=False, log=quiet)
    assert len(summaries) == len(cfgs)
    singles(cfgs, tmp_path / "single")
    for c in cfgs:
        stacked, single = tmp_path / "stack" / c.run_name(), tmp_path / "single" / c.run_name()
        for name, state in files(stacked).items():
            other = files(single)[name]
            assert all(torch.equal(state[k], other[k]) for k in state), (c.run_name(), name)
        assert metrics(stacked) == metrics(single)
        if c.optimizer == "laperm":  # (a baseline's folder has nothing to verify, as a single run's)
            assert verify.verify_run(stacked).ok
        a, b = (read_run_config(d) for d in (stacked, single))
        assert {**a, "out": ""} == {**b, "out": ""}
        s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (stacked, single))
        assert (s1["final_test_acc"], s1["selected_epoch"]) == (s2["final_test_acc"], s2["selected_epoch"])


@pytest.mark.slow
@pytest.mark.parametrize(("model", "extra"), [("lenet300", {}), ("f2", {"init": "shared:0.05:0.6"})])
def test_vectorized_stack_matches_single_runs_within_float_tolerance(tmp_path, model, extra):
    cfgs = plan_stack(base_config(tmp_path / "stack", model, **extra), [0, 1], ["laperm", "adam"])
    train_stack(cfgs, vectorize=True, log=quiet)
    singles(cfgs, tmp_path / "single")
    for c in cfgs:
        stacked, single = tmp_path / "stack" / c.run_name(), tmp_path / "single" / c.run_name()
        if c.optimizer == "laperm":  # (a baseline's folder has nothing to verify, as a single run's)
            assert verify.verify_run(stacked).ok
        # vmap's batched matmuls sum in another order: float32 rounding (~1e-7 relative per step)
        # that 8 Adam steps carry to at most ~1e-6 in any weight; a LaPerm sync maps the inner
        # weights back to θ0's values, so its synced rows match unless two weights were within that.
        a, b = files(stacked)["final.pt"], files(single)["final.pt"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
        for (la, va, ta), (lb, vb, tb) in zip(metrics(stacked), metrics(single), strict=True):
            assert la == pytest.approx(lb, rel=1e-5)
            assert abs(va - vb) <= 1 / 64 and abs(ta - tb) <= 1 / 256  # at most one image flips


@pytest.mark.slow
def test_vectorized_pass_matches_member_loop_on_conv2_without_dropout():
    """Conv2 (BatchNorm): vmap's gradients and BN statistics vs the member loop's, one step.

    Dropout is set to 0: vmap draws its masks from the stack's stream, the loop from each member's.
    Tolerance: convolutions batched over members reassociate sums (float32, ~1e-6 relative); BatchNorm
    over 4 images divides by small variances, so single gradient entries differ by up to a few percent
    while each tensor's error stays ~1e-5 of its norm (bound: 1e-4)."""
    nets = [models.build("conv2", seed=s) for s in (0, 1)]
    for net in nets:
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    a, b = StackedModel(copy.deepcopy(nets)), StackedModel(copy.deepcopy(nets))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 3, 32, 32, generator=g), torch.randint(0, 10, (2, 4), generator=g)
    la, _ = a.train_pass(x, y, LossSpec(), vectorize=True)
    lb, _ = b.train_pass(x, y, LossSpec(), vectorize=False)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for n in a.params:
        ga, gb = a.params[n].grad, b.params[n].grad
        assert float((ga - gb).norm() / gb.norm()) < 1e-4, n
    for n in a.buffers:
        torch.testing.assert_close(a.buffers[n], b.buffers[n], rtol=1e-4, atol=1e-6)
    # each member's BN statistics are its own
    assert not torch.equal(a.buffers["bn1.running_mean"][0], a.buffers["bn1.running_mean"][1])


def test_member_views_and_loop_step_equal_a_single_model():
    """After binding, a member is a view of the stack; one loop step equals the single model's step."""
    net = models.build("lenet300", seed=3)
    single, member = copy.deepcopy(net), copy.deepcopy(net)
    stack = StackedModel([member, copy.deepcopy(net)])
    x, y = torch.randn(2, 16, 1, 28, 28), torch.randint(0, 10, (2, 16))
    stack.train_pass(x, y, LossSpec(), vectorize=False)
    F.cross_entropy(single(x[0]), y[0]).backward()
    for n, p in single.named_parameters():
        assert torch.equal(stack.params[n].grad[0], p.grad)
    with torch.no_grad():
        stack.params["fc1.weight"][0, 0, 0] = 7.0
    assert member.fc1.weight[0, 0] == 7.0  # a view, not a copy
    saved = member.state_dict()["fc1.weight"]
    assert saved.untyped_storage().nbytes() == saved.numel() * 4  # state_dict copies the slice only


@pytest.mark.slow
def test_nan_member_stops_alone(tmp_path, monkeypatch):
    """A NaN put into the first member's weights at step 2 stops it; the others finish and verify."""
    monkeypatch.setenv("LAPERM_TEST_FAULT", "nan@step:2")
    cfgs = plan_stack(base_config(tmp_path, epochs=1, k=2), [0, 1], ["laperm"])
    lines: list[str] = []
    summaries = train_stack(cfgs, log=lines.append)
    assert [s["seed"] for s in summaries] == [1]
    assert not (tmp_path / cfgs[0].run_name() / "summary.json").exists()
    assert verify.verify_run(tmp_path / cfgs[1].run_name()).ok
    assert any("stopped" in line and "NaN" in line for line in lines)
    assert cfgs[0].run_name() in json.loads((tmp_path / cfgs[1].run_name() / "stack.json").read_text())["stopped"]


def test_parse_seeds_and_refusals(tmp_path):
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("a", "3-1", "1,1"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)
    base = base_config(tmp_path)
    with pytest.raises(ConfigError, match="sync rule"):
        train_stack(plan_stack(TrainConfig(**{**base.to_dict(), "sync_rule": "latent"}), [0, 1], ["laperm"]))
    with pytest.raises(ConfigError, match="differ only in seed"):
        train_stack([base, TrainConfig(**{**base.to_dict(), "seed": 1, "lr": 0.1})])
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.slow
def test_cli_seeds_and_optimizers_write_verified_member_folders(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--model", "f1", "--epochs", "1", "--k", "2", "--val-size", "0"]
    code = cli.main([*args, "--seeds", "0-1", "--optimizer", "laperm,adam", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert len(runs) == 4 and {r.split("-")[1] for r in runs} == {"laperm", "adam"}
    for r in runs:
        assert (tmp_path / r / "summary.json").is_file()
        if "-laperm-" in r:  # (verify has nothing to check in a baseline's folder, as for a single run)
            assert cli.main(["verify", str(tmp_path / r)]) == 0
    member = TrainConfig(**{**read_run_config(tmp_path / runs[0]), "name": runs[0]})
    with pytest.raises(ConfigError, match="member of a stacked run"):  # alone it would lose the stack's state
        train(member, resume=True, log=quiet)


STACK_ARGS = [
    "--model",
    "f2",
    "--dataset",
    "synthetic",
    "--val-size",
    "64",
    "--train-subset",
    "256",
    "--epochs",
    "2",
    "--k",
    "3",
    "--batch-size",
    "32",
    "--checkpoint-steps",
    "4",
    "--augment",
    "mnist-paper",
    "--threads",
    "1",
    "--no-progress",
    "--seeds",
    "0-1",
    "--optimizer",
    "laperm,adam",
]


def _child(cwd: Path, argv: list[str], fault: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != checkpoint.FAULT_ENV}
    env[checkpoint.FAULT_ENV] = fault
    proc = subprocess.run(
        [sys.executable, "-m", "laperm.cli", "train", *argv], cwd=cwd, env=env, capture_output=True, text=True
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_sigkilled_stack_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch, capsys):
    """Killed mid-epoch, then again while its members were writing their checkpoints (one member a
    checkpoint ahead of the others), the stack resumes from any member's folder to the same files."""
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    try:
        assert cli.main(["train", *STACK_ARGS, "--out", "ref"]) == 0
    finally:
        torch.set_num_threads(n)
    capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len(runs) == 4
    rc, _, err = _child(tmp_path, [*STACK_ARGS, "--out", "victim"], "kill@step:6")
    assert rc == -signal.SIGKILL, err
    victim = tmp_path / "victim"
    # second kill: the second member's checkpoint of step 8 half-way (the first member's is complete)
    rc, out, err = _child(tmp_path, ["--resume", str(victim / runs[2])], "kill@sidecar:ckpt-*#2")
    assert rc == -signal.SIGKILL, err
    assert "resuming" in out
    try:
        assert cli.main(["train", "--resume", str(victim / runs[0])]) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "not every member of the stack reached step 8" in out
    for r in runs:
        for name in ("final.pt", "best.pt"):
            a, b = (checkpoint.load(d / r / name)["model"] for d in (tmp_path / "ref", victim))
            assert all(torch.equal(a[k], b[k]) for k in a), (r, name)
        strip = lambda rec: {k: v for k, v in rec.items() if k not in ("epoch_time_s", "images_per_s")}  # noqa: E731
        assert [strip(x) for x in read_metrics(victim / r / "metrics.jsonl")] == [
            strip(x) for x in read_metrics(tmp_path / "ref" / r / "metrics.jsonl")
        ]
        if "-laperm-" in r:
            assert cli.main(["verify", str(victim / r)]) == 0


@pytest.mark.slow
def test_laperm_run_stacks_runs_that_differ_in_seed_and_optimizer(tmp_path, monkeypatch, capsys):
    from laperm.experiments import base
    from laperm.experiments.base import Experiment, Run

    common = dict(model="f1", dataset="synthetic", epochs=1, batch_size=64, val_size=64, k=4)
    runs = [
        Run(dict(common, seed=s, optimizer=o), {"seed": s, "method": o}) for s in (0, 1) for o in ("laperm", "adam")
    ]
    runs.append(Run(dict(common, seed=0, k=2), {"seed": 0, "k": 2}))  # another k: trains alone
    monkeypatch.setitem(base.EXPERIMENTS, "tiny", Experiment("tiny", 1, "test", lambda b, s: runs))
    assert cli.main(["run", "tiny", "--out", str(tmp_path), "--threads", "1", "--stack"]) == 0
    out = capsys.readouterr().out
    assert "stacking 4 runs" in out
    manifest = json.loads((tmp_path / "tiny" / "experiment.json").read_text())["runs"]
    assert len(manifest) == 5 and sorted(e.get("stacked", 1) for e in manifest.values()) == [1, 4, 4, 4, 4]
    for name, entry in manifest.items():
        assert (tmp_path / "tiny" / name / "summary.json").is_file()
        assert (tmp_path / "tiny" / name / "stack.json").is_file() == (entry.get("stacked") == 4)
    assert cli.main(["run", "tiny", "--out", str(tmp_path), "--stack"]) == 0  # all done: nothing retrained
    assert capsys.readouterr().out.count("(done)") == 5


@pytest.mark.slow
def test_stacked_benchmark_is_a_function_of_simple_arguments():
    from benchmarks import stacked as bench

    rows = bench.run("cpu", quick=True, names=("lenet300",), log=quiet)
    assert [(r["model"], r["members"]) for r in rows] == [("lenet300", 1), ("lenet300", 4)]
    assert all(r["images_per_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| lenet300 | eager | 4 |" in bench.markdown(rows)  # (CPU: eager mode by default)


@pytest.mark.slow  # three processes
def test_a_failed_stacked_contender_is_a_row_with_its_traceback(monkeypatch):
    """Each stacked measurement is its own process: one that fails is a row, the others still run."""
    from benchmarks import isolate
    from benchmarks import stacked as bench

    monkeypatch.setenv(isolate.PLANT_ENV, "stacked:lenet300:stacked:4")
    rows = bench.run("cpu", quick=True, names=("lenet300",), log=quiet)
    ok, failed = rows
    assert ok["error"] is None and ok["images_per_s"] > 0
    assert failed["members"] == 4 and failed["images_per_s"] is None
    assert "planted failure" in failed["error"]["traceback"]
    assert "**failed**" in bench.markdown(rows)


SMALL_STACK = [
    "--model", "f1", "--dataset", "synthetic", "--val-size", "64", "--train-subset", "128", "--epochs", "1",
    "--batch-size", "32", "--threads", "1", "--no-progress",
]  # fmt: skip


@pytest.mark.parametrize(
    "fault",
    [
        "int@write:.write-test#3",  # while the third member's folder is being made
        "int@write:config.yaml#2",  # while the members' configs are written
        "int@write:init.pt#3",  # while the members are built (each writes its init.pt)
    ],
)
def test_ctrl_c_before_the_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, capsys, fault):
    """Issue 33: killing a stack while it made its folders left every folder behind, half-made (no
    config.yaml: neither --resume nor a new start could use them). A real SIGINT at each point now
    leaves nothing, and the same command then starts afresh."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(checkpoint.FAULT_ENV, fault)
    n = torch.get_num_threads()
    try:
        assert cli.main(["train", *SMALL_STACK, "--seeds", "0-3", "--out", "runs/stack"]) == 130
        assert "laperm: interrupted" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == [], sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
        monkeypatch.delenv(checkpoint.FAULT_ENV)
        assert cli.main(["train", *SMALL_STACK, "--seeds", "0-3", "--out", "runs/stack"]) == 0
    finally:
        torch.set_num_threads(n)
    assert len(list((tmp_path / "runs" / "stack").iterdir())) == 4


def test_ctrl_c_once_training_leaves_folders_that_resume(tmp_path, monkeypatch, capsys):
    """A Ctrl-C once the stack trains (before any checkpoint of its own) stops it cleanly: every member
    saves a checkpoint, and --resume of any member finishes the stack."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "int@step:2")
    n = torch.get_num_threads()
    try:
        assert cli.main(["train", *SMALL_STACK, "--seeds", "0-1", "--out", "runs"]) == 3
        monkeypatch.delenv(checkpoint.FAULT_ENV)
        members = sorted((tmp_path / "runs").iterdir())
        assert len(members) == 2 and all(checkpoint.list_checkpoints(m / "checkpoints") for m in members)
        assert cli.main(["train", "--resume", str(members[1])]) == 0
    finally:
        torch.set_num_threads(n)
    assert all((m / "summary.json").is_file() for m in members)
