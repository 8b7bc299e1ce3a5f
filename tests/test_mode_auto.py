"""``mode: auto`` (the default): fast on CUDA, eager on CPU, decided at the start of a run; old run names stay."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import run_cli

from laperm import build, rundir
from laperm.config import TrainConfig

pytestmark = pytest.mark.usefixtures("clean_engine_state")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # (a device object needs no GPU)
BASE = ["--model", "f2", "--dataset", "synthetic", "--val-size", "64", "--epochs", "1", "--k", "5"]
BASE += ["--batch-size", "64", "--train-subset", "512", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize(
    ("fields", "device", "mode"),
    [
        ({}, CPU, "eager"),
        ({}, CUDA, "fast"),
        ({"model": "conv7"}, CUDA, "fast"),
        ({"nproc": 2, "batch_size": 64}, CUDA, "eager"),  # the fast path is one process
        ({"model": "char-gpt"}, CUDA, "eager"),  # and trains image models
        ({"mode": "eager"}, CUDA, "eager"),  # an explicit mode is kept
        ({"mode": "fast"}, CPU, "fast"),
    ],
)
def test_auto_is_decided_by_device_processes_and_model(fields, device, mode):
    cfg = TrainConfig(**fields).validate()
    assert build.resolve_mode(cfg, device).mode == mode


def test_auto_is_the_default_and_names_runs_as_eager_did():
    assert TrainConfig().mode == "auto"
    eager, auto, fast = (TrainConfig(model="f2", mode=m).run_name() for m in ("eager", "auto", "fast"))
    assert eager == auto != fast


def test_bf16_on_cpu_still_asks_for_fast_mode(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", *BASE, "--out", str(tmp_path), "--precision", "bf16")
    assert rc != 0 and "add --mode fast" in err


def test_a_default_cpu_run_trains_eagerly_under_its_old_name_and_records_the_mode(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", *BASE, "--out", str(tmp_path))
    assert rc == 0, err
    (run,) = tmp_path.iterdir()
    assert run.name == TrainConfig(**{**_flags_as_fields(), "mode": "eager"}).run_name()
    assert yaml.safe_load((run / "config.yaml").read_text())["mode"] == "eager"  # saved decided


def test_an_old_run_without_mode_in_its_config_resumes_eagerly(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", *BASE, "--out", str(tmp_path), "--name", "old", "--mode", "eager")
    assert rc == 0, err
    file = tmp_path / "old" / "config.yaml"
    saved = yaml.safe_load(file.read_text())
    del saved["mode"]  # as written before the field existed
    file.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert rundir.read_run_config(tmp_path / "old")["mode"] == "eager"
    rc, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "old"), "--epochs", "2")
    assert rc == 0, err
    assert rundir.read_metrics(tmp_path / "old" / "metrics.jsonl")[-1]["epoch"] == 2


def _flags_as_fields() -> dict:
    return dict(
        model="f2",
        dataset="synthetic",
        val_size=64,
        epochs=1,
        k=5,
        batch_size=64,
        train_subset=512,
        threads=1,
        progress=False,
    )
