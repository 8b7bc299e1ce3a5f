"""`laperm unpack` treats a pack as data (issue 30): hand-made bad packs, each refused with one clear
line, and the disk left as it was (the parent of --into listed, recursively, before and after).

A forger writes matching sha256 values, so every forged pack here is re-signed (:func:`forge`):
the checksums catch truncation, never forgery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laperm.pack import PackError, pack_runs, unpack
from laperm.pack.runs import MAGIC, VERSION, parse_package

pytestmark = pytest.mark.usefixtures("clean_engine_state")
GIB = 1 << 30


# -- a pack, and forging it --------------------------------------------------------------------


def _weightless_pack(tmp_path: Path) -> Path:
    """A pack of one finished run of small files (no training needed)."""
    run = tmp_path / "src" / "exp" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: f2\nepochs: 2\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 3}\n{"epoch": 2, "step": 6}\n')
    (run / "summary.json").write_text('{"epochs": 2}\n')
    (tmp_path / "src" / "exp" / "experiment.json").write_text('{"name": "exp"}\n')
    pack_runs([tmp_path / "src" / "exp"], tmp_path / "pack")
    return tmp_path / "pack"


def _package_bytes(header: dict, area: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack("<Q", len(head)) + head + area


def _records(plan: dict) -> list[dict]:
    return [plan["extras"], *(r for r in plan["runs"] if r["packed"])]


def read_pack(pack: Path) -> tuple[dict, list[tuple[dict, bytes]]]:
    """plan.json, and each package (extras first) as (header, blob area)."""
    plan = json.loads((pack / "plan.json").read_text())
    stream = b"".join((pack / p["name"]).read_bytes() for p in plan["parts"])
    out = []
    for r in _records(plan):
        header, area = parse_package(stream[r["offset"] : r["offset"] + r["nbytes"]], "x")
        out.append((header, bytes(area)))
    return plan, out


def write_pack(pack: Path, plan: dict, packages: list[tuple[dict, bytes]]) -> None:
    """Write a re-signed pack: one part file, every offset, size and sha256 made to match. A plan whose
    run list a mutation broke cannot be re-signed: it is written as it is, beside the parts it had."""
    try:
        records = _records(plan)
    except (TypeError, KeyError, AttributeError):
        records = None
    if records is None or len(records) != len(packages) or not all(isinstance(r, dict) for r in records):
        (pack / "plan.json").write_text(json.dumps(plan))
        return
    for p in pack.glob("data-*.bin"):
        p.unlink()
    stream = b""
    for r, (header, area) in zip(records, packages, strict=True):
        data = _package_bytes(header, area)
        r.update(offset=len(stream), nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        stream += data
    (pack / "data-000.bin").write_bytes(stream)
    plan["parts"] = [{"name": "data-000.bin", "nbytes": len(stream), "sha256": hashlib.sha256(stream).hexdigest()}]
    (pack / "plan.json").write_text(json.dumps(plan))


def forge(pack: Path, edit) -> Path:
    plan, packages = read_pack(pack)
    edit(plan, packages)
    write_pack(pack, plan, packages)
    return pack


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None: a folder or a link)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def refused(capsys, pack: Path, into: Path, *extra: str) -> str:
    """Unpack through the CLI: exit 2, one line, and the parent of --into exactly as before."""
    before = listing(into.parent)
    rc, out, err = run_cli(capsys, "unpack", str(pack), "--into", str(into), *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (rc, err)
    assert listing(into.parent) == before
    return err


# -- the confirmed traversal -----------------------------------------------------------------


def test_a_traversal_name_writes_nothing_outside_into(tmp_path, capsys):
    """The review's pack: plan.json (and the package) name a file ``../ESCAPED.txt``; unpacked with
    ``--into work/sub``, today's main wrote ``work/ESCAPED.txt``."""

    def escape(plan, packages):
        header, area = packages[0]
        header["files"][0]["name"] = "../ESCAPED.txt"
        plan["extras"]["files"][0]["path"] = "../ESCAPED.txt"

    pack = forge(_weightless_pack(tmp_path), escape)
    work = tmp_path / "work"
    work.mkdir()
    err = refused(capsys, pack, work / "sub")
    assert "'../ESCAPED.txt'" in err and "'..'" in err
    assert not (work / "ESCAPED.txt").exists() and not (work / "sub").exists()


# -- the corpus --------------------------------------------------------------------------------


def _set_run_path(path):
    def edit(plan, packages):
        plan["runs"][0]["path"] = path
        packages[1][0]["path"] = path

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_run_path("../victim"), "has the part '..'"),
        (_set_run_path("/tmp/abs"), "is absolute"),
        (_set_run_path(""), "not a relative path"),
        (_set_run_path("exp/./run"), "has the part '.'"),
        (_set_run_path("exp//run"), "has the part ''"),
        (_set_run_path(".hidden/run"), "has the part '.hidden'"),
        (lambda plan, p: p[1][0]["files"][0].update(name="../../config.yaml"), "has the part '..'"),
        (lambda plan, p: p[1][0]["files"][0].update(name="/etc/passwd"), "is absolute"),
        (lambda plan, p: plan["parts"].__setitem__(0, {**plan["parts"][0], "name": "../data-000.bin"}), None),
    ],
    ids=[
        "run-dotdot",
        "run-absolute",
        "run-empty",
        "run-dot",
        "run-empty-part",
        "run-hidden",
        "file-dotdot",
        "file-absolute",
        "part-name",
    ],
)
def test_forged_names_are_refused_before_anything_is_written(tmp_path, capsys, edit, message):
    pack = _weightless_pack(tmp_path)
    if message is None:  # a forged part name: plan.json written after re-signing
        plan = json.loads((pack / "plan.json").read_text())
        edit(plan, None)
        (pack / "plan.json").write_text(json.dumps(plan))
        message = "expected data-000.bin"
    else:
        forge(pack, edit)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("mine")
    into = tmp_path / "w" / "into"
    into.mkdir(parents=True)
    err = refused(capsys, pack, into, "--force")
    assert message in err, err
    assert (tmp_path / "victim" / "keep.txt").read_text() == "mine"


def test_force_never_replaces_a_folder_that_is_not_a_run(tmp_path, capsys):
    """A forged run path naming the user's results folder: --force does not delete it."""
    pack = forge(_weightless_pack(tmp_path), _set_run_path("results"))
    into = tmp_path / "into"
    (into / "results" / "other-run").mkdir(parents=True)
    (into / "results" / "other-run" / "metrics.jsonl").write_text("{}\n")
    before = listing(into / "results")
    rc, _, err = run_cli(capsys, "unpack", str(pack), "--into", str(into), "--force")
    assert rc == 2 and "is not a run folder" in err and "even with --force" in err
    assert listing(into / "results") == before  # (the other entries, here experiment.json, are restored)


def test_symlinks_are_refused(tmp_path, capsys):
    pack = _weightless_pack(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    into = tmp_path / "into"
    into.mkdir()
    (into / "exp").symlink_to(outside, target_is_directory=True)  # the way into --into leaves it
    err = refused(capsys, pack, into, "--force")
    assert "is a symlink" in err and not any(outside.iterdir())
    (into / "exp").unlink()
    part = pack / "data-000.bin"
    real = tmp_path / "elsewhere.bin"
    shutil.move(part, real)
    part.symlink_to(real)  # a pack's own file, a symlink
    err = refused(capsys, pack, into)
    assert "data-000.bin is a symlink" in err


def test_truncated_part_and_contradicting_plan_are_refused(tmp_path, capsys):
    into = tmp_path / "into"
    pack = _weightless_pack(tmp_path / "a")
    part = pack / "data-000.bin"
    part.write_bytes(part.read_bytes()[:-7])
    assert "damaged or truncated" in refused(capsys, pack, into)

    pack = forge(_weightless_pack(tmp_path / "b"), lambda plan, p: plan["runs"][0].update(path="exp/other"))
    assert "plan.json says exp/other is at 'exp/other' but its package says 'exp/run'" in refused(capsys, pack, into)

    def unfinished(plan, packages):  # the plan says "unfinished": it would replace a finished run
        plan["runs"][0].update(finished=False, step=0)

    pack = forge(_weightless_pack(tmp_path / "c"), unfinished)
    assert "plan.json contradicts the package of exp/run (finished)" in refused(capsys, pack, into)

    def extra_file(plan, packages):
        plan["extras"]["files"].append({"path": "exp/notes.txt", "nbytes": 1, "mtime": 0.0})

    pack = forge(_weightless_pack(tmp_path / "d"), extra_file)
    assert "other non-run files than its package holds" in refused(capsys, pack, into)


def test_a_decompression_bomb_stops_at_its_declared_size(tmp_path, capsys):
    """A blob declaring 1 KiB of small files that expands to 64 MiB: decompression stops at 1 KiB + 1."""

    def bomb(plan, packages):
        header, area = packages[1]
        stream = zlib.compressobj(9)
        data = b"".join(stream.compress(bytes(1 << 20)) for _ in range(64)) + stream.flush()
        blob = header["files"][0]["blob"]
        header["blobs"][blob] = {"offset": len(area), "nbytes": len(data), "size": 1024, "method": "zlib"}
        small = [f for f in header["files"] if f["kind"] == "file" and f["blob"] == blob]
        header["files"] = [f for f in header["files"] if f not in small] + [dict(small[0], start=0, size=1024)]
        packages[1] = (header, area + data)  # (one small file filling the declared 1 KiB, as pack lays them)

    pack = forge(_weightless_pack(tmp_path), bomb)
    assert (pack / "data-000.bin").stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        err = refused(capsys, pack, tmp_path / "into")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "decompresses to more than the 1024 bytes declared" in err
    assert peak < 32 << 20, peak


def test_a_file_pointed_at_another_files_bytes_is_refused(tmp_path, capsys):
    """Re-signed, a header whose second small file starts where the first does would hand it the first's bytes."""

    def overlap(plan, packages):
        header, area = packages[1]
        small = [f for f in header["files"] if f["kind"] == "file"]
        small[1]["start"] = small[0]["start"]

    err = refused(capsys, forge(_weightless_pack(tmp_path), overlap), tmp_path / "into")
    assert "does not start where the file before it in its blob ends" in err


def test_a_plan_that_hides_a_package_is_refused(tmp_path, capsys):
    """A run marked not packed while its package is still in the parts: bytes the plan does not account for."""
    pack = _weightless_pack(tmp_path)
    plan = json.loads((pack / "plan.json").read_text())
    plan["runs"][0]["packed"] = False
    (pack / "plan.json").write_text(json.dumps(plan))
    err = refused(capsys, pack, tmp_path / "into")
    assert "bytes that plan.json does not account for" in err


def _ckpt_package(area: bytes, blob: dict, shape: list[int], recipe: dict) -> tuple[dict, bytes]:
    """A run package with a checkpoint whose one raw tensor is ``blob`` (appended to ``area``)."""
    header = {
        "format": "laperm-pack-run",
        "version": VERSION,
        "path": "exp/run",
        "recipe": recipe,
        "theta0": None,
        "files": [
            {"name": "config.yaml", "kind": "file", "blob": 0, "start": 0, "size": 0},
            {
                "name": "checkpoints/ckpt-000000001.pt",
                "kind": "torch",
                "skeleton": 0,
                "tensors": [{"dtype": "float32", "shape": shape, "enc": "raw", "blob": 1}],
            },
        ],
        "blobs": [{"offset": 0, "nbytes": len(area), "size": 0, "method": "none"}, blob],
    }
    return header, area


def test_a_1_mib_pack_declaring_a_10_gib_tensor_is_refused_before_decompression(tmp_path, capsys):
    """Its one blob really expands (zlib, to 128 MiB), padded to a 1 MiB pack; it declares 10 GiB of float32."""
    squeeze, zeros = zlib.compressobj(9), bytes(1 << 20)
    data = b"".join(squeeze.compress(zeros) for _ in range(128)) + squeeze.flush()
    data += os.urandom((1 << 20) - 8192 - len(data))  # (bytes after the stream: a pack of 1 MiB in all)
    size = 10 * GIB
    blob = {"offset": 0, "nbytes": len(data), "size": size, "method": "zlib"}
    recipe = {"model": "lenet300", "init": "he-uniform", "seed": 0}

    def swap(plan, packages):
        packages[1] = _ckpt_package(data, blob | {"offset": 0}, [size // 4], recipe)
        packages[1][0]["blobs"][0]["nbytes"] = 0
        plan["runs"][0].update(finished=True, weights=True)

    pack = forge(_weightless_pack(tmp_path), swap)
    assert 0.9 * (1 << 20) <= sum(p.stat().st_size for p in pack.iterdir()) <= 1.1 * (1 << 20)
    tracemalloc.start()
    try:
        err = refused(capsys, pack, tmp_path / "into")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "declares 10,737,418,240 bytes, over the ceiling of" in err
    assert peak < 100 << 20, f"peak {peak / (1 << 20):.1f} MiB"


def test_an_oversized_recipe_is_refused_before_any_model_is_built(tmp_path, capsys):
    blob = {"offset": 0, "nbytes": 16, "size": 16, "method": "none"}
    cases = [
        ({"model": "char-gpt", "init": "he-uniform", "seed": 0, "model_options": {"vocab_size": 10**9}}, "vocab_size"),
        ({"model": "lenet300", "init": "he-uniform", "seed": 0, "model_options": {"width": 10**6}}, "no option"),
        ({"model": "gpt-7b", "init": "he-uniform", "seed": 0}, "unknown model"),
        ({"model": "lenet300", "init": "he-uniform", "seed": -1}, "seed"),
        ({"model": "lenet300", "init": "he-uniform", "seed": 0, "exec": "rm -rf /"}, "a recipe is a mapping"),
    ]
    for i, (recipe, message) in enumerate(cases):

        def swap(plan, packages, recipe=recipe):
            packages[1] = _ckpt_package(bytes(16), blob, [4], recipe)

        pack = forge(_weightless_pack(tmp_path / str(i)), swap)
        err = refused(capsys, pack, tmp_path / "into")
        assert "recipe" in err and message in err, err


def test_unpack_argument_errors_are_one_line_and_exit_2(tmp_path, capsys):
    pack = _weightless_pack(tmp_path)
    (tmp_path / "file").write_text("x")
    for argv in (
        ["unpack", str(tmp_path / "nope")],
        ["unpack", str(tmp_path / "file")],
        ["unpack", "bad\0path"],
        ["unpack", str(pack), "--into", str(tmp_path / "file")],
        ["unpack", str(pack), "--into", str(tmp_path / "file" / "below")],
        ["unpack", str(pack), "--into", "bad\0into"],
    ):
        before = listing(tmp_path)
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert listing(tmp_path) == before


# -- mutations of a real pack --------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pack(tmp_path_factory):
    """A LaPerm run (f1, 2 epochs of 2 steps) packed: θ0 rebuilt from its recipe, codes, raw moments."""
    from laperm.cli import main

    base = tmp_path_factory.mktemp("real")
    args = ["--model", "f1", "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32", "--epochs", "2"]
    args += ["--batch-size", "32", "--k", "2", "--threads", "1", "--no-progress", "--name", "run"]
    assert main(["train", *args, "--out", str(base / "exp")]) == 0
    pack_runs([base / "exp"], base / "pack")
    unpack(base / "pack", base / "reference")
    return base


def _paths(obj, prefix=()):
    """Every (key path) of a JSON value, containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


HOSTILE = st.one_of(
    st.sampled_from([None, True, -1, 0, 1, 2**63, 10**12, "", "..", "../x", "/abs", "a/../b", ".lock", "x" * 300]),
    st.sampled_from([float("nan"), 1e308, [], {}, [1, 2], {"a": 1}, "data-000.bin", "config.yaml"]),
    st.integers(-(2**40), 2**40),
    st.text(max_size=12),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutation_of_a_real_pack_unpacks_the_same_or_fails_cleanly(real_pack, tmp_path_factory, data):
    """A plan.json field or a package header field set to a hostile value (then re-signed): unpack gives
    the same files bit for bit, or one PackError line; nothing is ever written outside --into, and
    nothing at all when it fails."""
    work = tmp_path_factory.mktemp("mutant")
    pack = work / "pack"
    shutil.copytree(real_pack / "pack", pack)
    plan, packages = read_pack(pack)
    which = data.draw(st.integers(-1, len(packages) - 1), label="plan (-1) or package")
    doc = plan if which < 0 else packages[which][0]
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p and p[0] not in ("parts",)]), label="field")
    value = data.draw(HOSTILE, label="value")
    _set(doc, path, value)
    write_pack(pack, plan, packages)
    into = work / "a" / "into"
    before = listing(work / "a") if (work / "a").exists() else {}
    try:
        unpack(pack, into)
    except PackError as e:
        assert "\n" not in str(e)
        assert not into.exists() and not (work / "a").exists() or listing(work / "a") == before
        return
    after = listing(into)
    reference = listing(real_pack / "reference")
    outside = {k: v for k, v in listing(work / "a").items() if not k.startswith("into")}
    assert outside == {}
    for name, content in reference.items():  # every file of the real pack, bit for bit
        assert after.get(name) == content, name


# -- "newer" means further on (issue 33, item 3) -------------------------------------------------


def test_a_run_continued_after_unpacking_is_not_replaced_without_force(tmp_path, capsys):
    """Unpack a finished 1-epoch run, continue it to 2 epochs, unpack the same pack again: refused,
    naming the folder and both positions (main said "unpacked 1 run(s)" and lost epoch 2)."""
    args = ["--model", "f1", "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32", "--epochs", "1"]
    args += ["--batch-size", "32", "--k", "2", "--threads", "1", "--no-progress", "--name", "run"]
    assert run_cli(capsys, "train", *args, "--out", str(tmp_path / "exp"))[0] == 0
    assert run_cli(capsys, "pack", str(tmp_path / "exp"), "--out", str(tmp_path / "pack"))[0] == 0
    into = tmp_path / "into"
    assert run_cli(capsys, "unpack", str(tmp_path / "pack"), "--into", str(into))[0] == 0
    run = into / "exp" / "run"
    assert run_cli(capsys, "train", "--resume", str(run), "--epochs", "2")[0] == 0
    longer = listing(run)
    err = refused(capsys, tmp_path / "pack", into)
    assert f"{run} is newer: it got further (epochs, epoch, step)" in err
    assert "here: finished, epoch 2 of 2, step 4; packed: finished, epoch 1 of 1, step 2" in err
    assert listing(run) == longer
    assert run_cli(capsys, "unpack", str(tmp_path / "pack"), "--into", str(into), "--force")[0] == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
