"""``laperm train --mode fast`` on CPU: the same loop with the device data and step strategies (engine.fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from laperm import checkpoint, rundir
from laperm.config import TrainConfig

pytestmark = pytest.mark.usefixtures("clean_engine_state")

# A tiny f2 run: 14 steps per epoch, 2 epochs, a sync every 5 steps, a checkpoint every 4 steps.
BASE = ["--model", "f2", "--dataset", "synthetic", "--val-size", "64", "--epochs", "2", "--k", "5"]
BASE += ["--batch-size", "32", "--checkpoint-steps", "4", "--threads", "1", "--no-progress"]
TIMING = {"epoch_time_s", "images_per_s", "train_time_s"}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "final.pt")["model"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rundir.read_metrics(run / "metrics.jsonl")]


def train(capsys, out: Path, name: str, *extra: str) -> Path:
    rc, _, err = run_cli(capsys, "train", *BASE, "--out", str(out), "--name", name, *extra)
    assert rc == 0, err
    return out / name


def test_fast_equals_eager_in_fp32_on_cpu_without_augmentation(tmp_path, capsys):
    # Same sample order (one CPU generator, one seed), same step (DeviceStep runs the loop body):
    # bit-identical weights and metrics. (--l2 0: the fast L2 sum rounds differently.)
    eager = train(capsys, tmp_path, "eager", "--l2", "0")
    fast = train(capsys, tmp_path, "fast", "--l2", "0", "--mode", "fast")
    assert same_weights(weights(eager), weights(fast))
    assert metrics(eager) == metrics(fast)
    assert rundir.read_run_config(fast)["mode"] == "fast"


def test_fast_with_augmentation_resumes_bit_identically_and_verifies(tmp_path, capsys, monkeypatch):
    args = ("--mode", "fast", "--augment", "mnist-paper")
    ref = train(capsys, tmp_path, "ref", *args)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "int@step:17")  # SIGINT in epoch 2, batch 3
    rc, _, err = run_cli(capsys, "train", *BASE, "--out", str(tmp_path), "--name", "run", *args)
    assert rc == 3 and "--resume" in err, err
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    rc, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "run"))
    assert rc == 0, err
    assert same_weights(weights(ref), weights(tmp_path / "run"))
    assert metrics(ref) == metrics(tmp_path / "run")
    assert run_cli(capsys, "verify", str(tmp_path / "run"))[0] == 0
    # the device augmentation is a different random stream from the host one: another result
    eager = train(capsys, tmp_path, "eager", "--augment", "mnist-paper")
    assert not same_weights(weights(ref), weights(eager))


def test_bf16_runs_on_cpu(tmp_path, capsys):
    run = train(capsys, tmp_path, "bf16", "--mode", "fast", "--precision", "bf16", "--epochs", "1")
    assert rundir.read_json(run / "summary.json")["final_test_acc"] > 0.5  # synthetic classes: bf16 still learns
    fp32 = train(capsys, tmp_path, "fp32", "--mode", "fast", "--epochs", "1")
    assert not same_weights(weights(run), weights(fp32))  # autocast did change the arithmetic


def test_mode_and_precision_name_another_run_channels_last_does_not():
    base = TrainConfig()
    names = {
        base.run_name(),
        TrainConfig(mode="fast").run_name(),
        TrainConfig(mode="fast", precision="bf16").run_name(),
    }
    assert len(names) == 3
    assert TrainConfig(mode="fast", channels_last=True).run_name() == TrainConfig(mode="fast").run_name()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "bf16"], "add --mode fast"),
        (["--channels-last"], "add --mode fast"),
        (["--mode", "fast", "--nproc", "2"], "use --nproc 1 or --mode eager"),
    ],
)
def test_fast_options_need_fast_mode(tmp_path, capsys, extra, message):
    rc, _, err = run_cli(capsys, "train", *BASE, "--out", str(tmp_path), *extra)
    assert rc != 0 and message in err, err
    assert not any(tmp_path.iterdir())


def test_resume_may_not_switch_mode(tmp_path, capsys):
    run = train(capsys, tmp_path, "run", "--epochs", "1")
    rc, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2", "--mode", "fast")
    assert rc != 0 and "mode" in err, err
