"""Fuzz `laperm train`'s flags and config files: every rejection is one clear line, never a traceback.

Data loading is replaced by a stub that raises a recognisable error, so an
input that passes every check stops right there (and is fine) instead of
starting a real run; anything else must be rejected with exactly one
``laperm: error: ...`` line (or argparse's usage + error) and a non-zero exit,
never with "unexpected" (the CLI's word for an exception it did not foresee).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import laperm.build as engine
from laperm.cli import main
from laperm.config import FIELD_NAMES, flag_fields, flag_name
from laperm.data import DataError

OUT = Path(tempfile.mkdtemp(prefix="laperm-fuzz-"))


def teardown_module() -> None:
    shutil.rmtree(OUT, ignore_errors=True)  # nothing is written there, but the folder itself must go


ACCEPTED = "config accepted (fuzz stub)"


def _stub_load_data(cfg, spec):
    raise DataError(ACCEPTED)


def run_laperm(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with (
        mock.patch.object(engine, "load_data", _stub_load_data),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def assert_clean_outcome(rc: int, err: str) -> None:
    assert "Traceback" not in err and "laperm: error: unexpected " not in err, err
    assert rc not in (0, None), err
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("usage:"):  # argparse: usage, then one error line
        assert rc == 2 and lines[-1].startswith("laperm train: error: "), err
    else:
        assert len(lines) == 1 and lines[0].startswith("laperm: error: "), err
    assert not any(OUT.iterdir()), "nothing may be written before the input is accepted"


NASTY = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "1e400",
        "-1e400",
        "nan",
        "inf",
        "-inf",
        "1.5",
        "99999999999999999999999",
        "true",
        "null",
        "[]",
        "{}",
        "\x00",
        "../x",
        "a/b",
        "/",
        ".",
        "..",
        "pruned:2",
        "pruned:-0.1",
        "shared:0:1",
        "shared:nan",
        "shared:0.1:0",
        "shared:0.1:1/0",
        "exp:nan",
        "exp:-1",
        "exp:1e308",
        "step:0:0.5",
        "step:1:inf",
        "milestones:",
        "milestones:1=0",
        "milestones:-1=0.5",
        "milestones:5=inf",
        "cuda",
        "cuda:7",
        "cpu:0",
        "meta",
        "mps",
        "xla",
        "lenet300",
        "f1",
        "conv2",
        "synthetic",
        "cifar10",
        "idx",
        "mnist-paper",
        "f2",
        "resnet50",
        "he-uniform",
        "constant",
    ]
)
VALUE = st.one_of(
    NASTY,
    st.text(max_size=12),
    st.integers(-(10**25), 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
# Every flag that takes a value, generated from the config's fields, except --out (the test's own
# folder) and --nproc (a valid value would start worker processes).
FLAGS = [
    flag
    for f in flag_fields()
    if (flag := flag_name(f)) is not None
    and not (flag.startswith("--no-") or "bool" in str(f.type))
    and f.name not in ("out", "nproc")
]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FLAGS), VALUE), min_size=1, max_size=4))
def test_fuzz_flags(pairs):
    argv = ["train", "--out", str(OUT), "--no-progress"]
    for flag, value in pairs:
        argv += [flag, value] if not value.startswith("-") else [f"{flag}={value}"]
    rc, err = run_laperm(argv)
    if ACCEPTED in err:
        return  # every check passed; fine
    assert_clean_outcome(rc, err)


# -- config files ----------------------------------------------------------------------------

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=10), NASTY)
VALUES = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)
KEYS = st.one_of(st.sampled_from(sorted(FIELD_NAMES)), st.text(max_size=10))
CONFIGS = st.dictionaries(KEYS, VALUES, max_size=5)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) if abs(v) < 2**63 else json.dumps(str(v))
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON strings are TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return '"none"'


def to_toml(cfg: dict) -> str:
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in cfg.items() if v is not None)


def _check_file(text: bytes | str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"cfg{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        rc, err = run_laperm(["train", "--config", str(path), "--out", str(OUT), "--no-progress"])
    if ACCEPTED in err:
        return
    assert_clean_outcome(rc, err)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS, st.booleans())
def test_fuzz_config_files(cfg, nested):
    data = {"train": cfg} if nested else cfg
    _check_file(yaml.safe_dump(data, allow_unicode=True), ".yaml")
    _check_file(to_toml(cfg), ".toml")


@settings(deadline=None)
@given(st.binary(max_size=200), st.sampled_from([".yaml", ".yml", ".toml", ".json", ""]))
def test_fuzz_binary_garbage_config(blob, suffix):
    _check_file(blob, suffix)


def test_hostile_config_files_by_hand(tmp_path):
    cases = {
        "list.yaml": ("- 1\n- 2\n", "must hold a mapping"),
        "scalar.yaml": ("42\n", "must hold a mapping"),
        "unknown.yaml": ("epochz: 3\n", "unknown config field(s): epochz"),
        "types.toml": ('epochs = "three"\n', "epochs must be a whole number >= 1, got 'three'"),
        "date.toml": ("lr = 1979-05-27\n", "lr must be a positive number"),
        "bad.toml": ("epochs = = 3\n", "is not valid TOML"),
        "bad.yaml": ("epochs: [1, 2\n", "is not valid YAML"),
        "deep.yaml": ("[" * 1500 + "]" * 1500 + "\n", "is not valid YAML"),
        "kschedule.yaml": ("k_schedule: {0: 2.5}\n", "k_schedule must map epochs to k values"),
        "preset.yaml": ("preset: [conv2]\n", "unknown preset"),
        "biases.yaml": ("permute_biases: 'yes'\n", "permute_biases must be true, false or unset"),
        "notes.txt": ("epochs: 3\n", "must end in .yaml, .yml or .toml"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        rc, err = run_laperm(["train", "--config", str(path), "--out", str(OUT)])
        assert_clean_outcome(rc, err)
        assert expected in err, (name, err)
    for path, expected in ((tmp_path, "is a folder"), (tmp_path / "missing.yaml", "does not exist")):
        rc, err = run_laperm(["train", "--config", str(path), "--out", str(OUT)])
        assert_clean_outcome(rc, err)
        assert expected in err
