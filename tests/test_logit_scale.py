"""logit_scale: the training loss is cross-entropy of T*logits; evaluation and predictions are untouched."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from laperm import checkpoint
from laperm.config import ConfigError, TrainConfig, resolve_config
from laperm.data import BatchLoader, load_dataset
from laperm.rundir import read_metrics
from laperm.train import build_model


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "x", None, [1.0]])
def test_bad_logit_scale_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="logit_scale"):
        TrainConfig(logit_scale=bad).validate()


def test_logit_scale_from_files_and_flags(capsys):
    assert resolve_config({"logit_scale": "300"}).logit_scale == 300.0  # YAML may hand over a string
    assert resolve_config({"logit_scale": 30}).logit_scale == 30.0
    rc, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--logit-scale", "0", "--no-progress")
    assert rc != 0 and "logit_scale" in err and "Traceback" not in err


def test_fields_added_later_keep_run_names():
    base = TrainConfig(preset="f2")
    payload = {
        k: v
        for k, v in base.to_dict().items()
        if k
        not in {
            "out",
            "name",
            "progress",
            "data_dir",
            "device",
            "threads",
            "preset",
            "checkpoint_steps",
            "nproc",
            "check_replicas",
            "eval_steps",
            "logit_scale",
            "sync_rule",
            "mode",
            "precision",
            "channels_last",
            "stop_at",
        }
    }
    import hashlib

    old = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]
    assert base.digest() == old  # runs made before the field existed keep their folder names
    assert TrainConfig(preset="f2", logit_scale=100.0).digest() != old
    assert TrainConfig(preset="f2", sync_rule="latent").digest() != old


def _train(tmp_path, capsys, name, scale):
    # F1 has no bias: logits are linear in the weights.  An lr this small leaves the weights at
    # their init, so the two runs see the same net and differ in the training objective alone.
    rc, out, _ = run_cli(
        capsys,
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "f1",
        "--optimizer",
        "sgd",
        "--lr",
        "1e-12",
        "--epochs",
        "1",
        "--val-size",
        "0",
        "--logit-scale",
        str(scale),
        "--out",
        str(tmp_path),
        "--name",
        name,
        "--no-progress",
    )
    assert rc == 0, out
    return read_metrics(tmp_path / name / "metrics.jsonl")[-1], tmp_path / name


def test_training_loss_uses_the_scale_and_evaluation_does_not(tmp_path, capsys):
    plain, _ = _train(tmp_path, capsys, "plain", 1.0)
    hot, run = _train(tmp_path, capsys, "hot", 7.0)
    # Evaluation reports the plain model: same test loss and accuracy whatever the training scale.
    assert hot["test_acc"] == plain["test_acc"]
    assert hot["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-6)
    # The training loss is the cross-entropy of 7 * logits of that same net (weights unchanged).
    ds = load_dataset("synthetic")
    cfg = TrainConfig(model="f1", dataset="synthetic")
    model, _ = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(checkpoint.load(run / "init.pt")["state"])
    loader = BatchLoader(ds.train_x, ds.train_y, 256, shuffle=False, mean=ds.mean, std=ds.std)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    y = ds.train_y
    assert hot["train_loss"] == pytest.approx(float(F.cross_entropy(7.0 * logits, y)), rel=1e-4)
    assert plain["train_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-4)
    assert not math.isclose(hot["train_loss"], plain["train_loss"], rel_tol=1e-2)


def test_predictions_of_a_bias_free_relu_net_ignore_a_positive_logit_scale():
    # Why the scale is a pure training knob for F2: a bias-free ReLU net is positively homogeneous,
    # so scaling its output (or its last layer) by T > 0 changes no prediction.
    cfg = TrainConfig(model="f2", init="shared:0.03:1/15,1/7,1/3")
    model, _ = build_model(cfg, torch.device("cpu"))
    x = torch.rand(512, 1, 28, 28)
    with torch.no_grad():
        pred = model(x).argmax(1)
        model.fc3.weight.mul_(300.0)
        assert torch.equal(model(x).argmax(1), pred)
