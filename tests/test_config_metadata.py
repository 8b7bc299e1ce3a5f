"""The config's field metadata is the one source of the CLI flags, the resume rules and run names."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from laperm import cli
from laperm.config import (
    ALWAYS_HASHED,
    RESUME_CHANGEABLE,
    TrainConfig,
    flag_fields,
    flag_name,
    option,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laperm train")
    cli._add_train_flags(parser)
    return parser


def test_every_flag_field_has_its_flag_and_parses_to_the_field():
    parser = _train_parser()
    options = {s: a for a in parser._actions for s in a.option_strings}
    for f in flag_fields():
        action = options[flag_name(f)]
        assert action.dest == f.name and action.default is None  # unset flags never override a config file
    args = parser.parse_args(
        [
            "--k",
            "7",
            "--lr",
            "0.5",
            "--no-progress",
            "--no-permute-biases",
            "--granularity",
            "tensor",
            "--train-subset",
            "9",
        ]
    )
    assert (args.k, args.lr, args.progress, args.permute_biases, args.granularity, args.train_subset) == (
        7,
        0.5,
        False,
        False,
        "tensor",
        9,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "rmsprop"])  # choices come from the config's own list


def test_config_only_fields_have_no_flag():
    names = {f.name for f in flag_fields()}
    assert "k_schedule" not in names and "keep_checkpoints" not in names and "model" in names


def test_resume_rules_come_from_the_metadata():
    assert RESUME_CHANGEABLE == {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"]}
    assert {"lr", "epochs", "device", "out"} <= RESUME_CHANGEABLE and "k" not in RESUME_CHANGEABLE


def test_a_new_field_at_its_default_does_not_rename_a_run():
    base = TrainConfig(model="f2", k=250)

    @dataclasses.dataclass
    class Extended(TrainConfig):
        tensorboard: bool = option(False, "log to TensorBoard", named=True)

    same = Extended(model="f2", k=250)
    assert same.run_name() == base.run_name()
    assert Extended(model="f2", k=250, tensorboard=True).run_name() != base.run_name()
    assert TrainConfig(model="f2", k=250, out="elsewhere", threads=3).run_name() == base.run_name()  # not named


def test_existing_run_names_under_results_stay_valid():
    configs = sorted(RESULTS.glob("**/config.yaml"))
    if not configs:
        pytest.skip("no results/ in this checkout")
    for path in configs:
        cfg = TrainConfig(**yaml.safe_load(path.read_text()))
        assert cfg.run_name() == path.parent.name, path
    assert "model" in ALWAYS_HASHED and "sync_rule" not in ALWAYS_HASHED
