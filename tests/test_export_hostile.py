"""`.laperm` files from elsewhere (issue 30): a hypothesis test mutating the header of a real compact
file (re-signed, as a forger would), read by `load_compact` and `laperm verify`: the same bits, or
one clear error line (exit 2); and recipes checked against the model registry before any build."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laperm.export import CompactFormatError, export_run, load_compact
from laperm.export.codec import MAGIC, VERSION, parse_compact
from laperm.export.fileformat import check_recipe, rebuild_theta0

pytestmark = pytest.mark.usefixtures("clean_engine_state")


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    from laperm.cli import main

    base = tmp_path_factory.mktemp("compact")
    args = ["--model", "f2", "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32", "--epochs", "1"]
    args += ["--batch-size", "32", "--k", "2", "--threads", "1", "--no-progress", "--name", "run"]
    assert main(["train", *args, "--out", str(base)]) == 0
    export_run(base / "run", base / "final.laperm")
    return base / "final.laperm"


def _signed(header: dict, blobs: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    body = MAGIC + bytes([VERSION]) + struct.pack("<Q", len(head)) + head + blobs
    return body + hashlib.sha256(body).digest()


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


HOSTILE = st.one_of(
    st.sampled_from([None, True, -1, 0, 1, 33, 2**63, 10**12, "", "..", "/abs", "char-gpt", "float64", "int8"]),
    st.sampled_from([float("nan"), [], {}, [10**6, 10**6], {"vocab_size": 10**9}, {"groups": 0}]),
    st.integers(-(2**40), 2**40),
    st.text(max_size=8),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutation_of_a_compact_file_loads_the_same_or_fails_cleanly(compact, tmp_path_factory, capsys, data):
    good = load_compact(compact)
    header, blobs = parse_compact(compact.read_bytes(), "x")
    paths = [p for p in _paths(header) if p and p[0] != "config"]
    path = data.draw(st.sampled_from(paths), label="field")
    value = data.draw(HOSTILE, label="value")
    doc = header
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value
    file = tmp_path_factory.mktemp("mutant") / "m.laperm"
    file.write_bytes(_signed(header, bytes(blobs)))
    try:
        back = load_compact(file)
    except CompactFormatError as e:
        assert "\n" not in str(e)
    else:
        assert list(back) == list(good)
        for k in good:
            assert back[k].dtype == good[k].dtype and back[k].shape == good[k].shape
    rc, _, err = run_cli(capsys, "verify", str(file))
    assert rc in (0, 1, 2) and "Traceback" not in err and "error: unexpected " not in err, err
    assert rc == 0 or len(err.strip().splitlines()) <= 1


def test_recipes_are_checked_against_the_registry_before_building():
    assert check_recipe({"model": "f1", "init": "he-uniform", "seed": 0}) == 7840
    assert check_recipe({"model": "char-gpt", "init": "he-uniform", "seed": 0, "model_options": {"vocab_size": 90}})
    for recipe, message in (
        ({"model": "char-gpt", "init": "he-uniform", "seed": 0, "model_options": {"vocab_size": 10**9}}, "65536"),
        ({"model": "f1", "init": "he-uniform", "seed": 0, "model_options": {"depth": 10**6}}, "no option 'depth'"),
        ({"model": "nope", "init": "he-uniform", "seed": 0}, "unknown model"),
        ({"model": "f1", "init": "he-uniform", "seed": 2**70}, "seed"),
        ({"model": "f1", "init": "he-uniform", "seed": 0, "code": "x"}, "a recipe is a mapping"),
        (["f1"], "a recipe is a mapping"),
    ):
        with pytest.raises(CompactFormatError, match=message):
            rebuild_theta0(recipe)
