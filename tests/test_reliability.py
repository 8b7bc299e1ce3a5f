"""Crash safety, resume, determinism, invariants and numerical faults, run in-process.

The real-process SIGKILL/SIGTERM test is in test_reliability_kill.py; here the
same engine is driven through :func:`laperm.cli.main` in this process (fast),
with faults injected through the ``LAPERM_TEST_FAULT`` hook or monkeypatching.
"""

from __future__ import annotations

import errno
import json
import signal

import pytest
import torch
from conftest import run_cli

from laperm import checkpoint, reconnect, rundir, verify
from laperm.cli import main
from laperm.engine.guards import row_fingerprint as _row_fingerprint

# A tiny f2 run: 14 steps per epoch, 3 epochs, a sync every 5 steps, a checkpoint every 4 steps.
ARGS = [
    "--model",
    "f2",
    "--dataset",
    "synthetic",
    "--val-size",
    "64",
    "--epochs",
    "3",
    "--k",
    "5",
    "--batch-size",
    "32",
    "--checkpoint-steps",
    "4",
    "--augment",
    "mnist-paper",
    "--lr-schedule",
    "exp:0.8",
    "--threads",
    "1",
    "--no-progress",
]
TIMING = {"epoch_time_s", "images_per_s", "train_time_s"}


pytestmark = pytest.mark.usefixtures("clean_engine_state")


cli = run_cli


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("laperm: error: "), err
    assert "Traceback" not in err and "laperm: error: unexpected " not in err, err
    return lines[0]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def weights(run, name="final.pt"):
    return checkpoint.load(run / name)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)


def metrics(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rundir.read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (seed 0) that the interrupted ones must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref")
    n = torch.get_num_threads()
    assert main(["train", *ARGS, "--out", str(out), "--name", "ref"]) == 0
    torch.set_num_threads(n)
    return out / "ref"


# -- determinism -------------------------------------------------------------------------


def test_same_seed_is_bit_identical_and_other_seed_differs(reference, tmp_path, capsys):
    assert cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "again")[0] == 0
    assert cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "seed1", "--seed", "1")[0] == 0
    again, seed1 = tmp_path / "again", tmp_path / "seed1"
    assert same_weights(weights(reference), weights(again))
    assert metrics(reference) == metrics(again)
    ref_w, other = weights(reference), weights(seed1)
    assert all(not torch.equal(ref_w[k], other[k]) for k in ref_w)
    assert checkpoint.load(reference / "init.pt")["state"].keys() == checkpoint.load(seed1 / "init.pt")["state"].keys()
    assert metrics(reference) != metrics(seed1)


# -- interrupt, resume -------------------------------------------------------------------


class RecordingBar:
    """Stands in for tqdm: records where each epoch's bar starts and how far it gets."""

    bars: list[dict] = []

    def __init__(self, total, initial=0, desc="", **kw):
        self.n = initial
        self.info = {"desc": desc, "initial": initial, "total": total}
        RecordingBar.bars.append(self.info)

    def update(self, k=1):
        self.n += k

    def set_postfix(self, *a, **kw):
        pass

    def close(self):
        self.info["final"] = self.n


def test_sigint_saves_and_resume_is_bit_identical_with_consistent_progress(reference, tmp_path, capsys, monkeypatch):
    # SIGINT (sent by the process to itself, through the real handler) at step 17: epoch 2, batch 3.
    monkeypatch.setenv(checkpoint.FAULT_ENV, "int@step:17")
    handler = signal.getsignal(signal.SIGINT)  # (SIG_IGN where pytest was started in the background)
    rc, out, err = cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "run")
    run = tmp_path / "run"
    assert rc == 3
    assert one_error_line(err) == (
        f"laperm: error: stopped by SIGINT at step 17; checkpoint saved. Continue with: laperm train --resume {run}"
    )
    assert checkpoint.list_checkpoints(run / "checkpoints")[0].name == "ckpt-000000017.pt"
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored

    monkeypatch.delenv(checkpoint.FAULT_ENV)
    import laperm.engine.trainer as engine

    monkeypatch.setattr(engine, "tqdm", RecordingBar)
    RecordingBar.bars = []
    rc, out, err = cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert "from ckpt-000000017.pt: step 17, epoch 2 at batch 3/14" in out
    # The bar of the resumed epoch starts at batch 3 and ends at 14; the next one is complete.
    assert RecordingBar.bars == [
        {"desc": "epoch 2/3", "initial": 3, "total": 14, "final": 14},
        {"desc": "epoch 3/3", "initial": 0, "total": 14, "final": 14},
    ]
    assert same_weights(weights(reference), weights(run))
    assert same_weights(weights(reference, "best.pt"), weights(run, "best.pt"))
    assert metrics(reference) == metrics(run)


def test_conv_net_with_dropout_resumes_bit_identically(tmp_path, capsys, monkeypatch):
    """Dropout draws from the global RNG: its state must travel in the checkpoint."""
    args = [
        "--model",
        "conv7",
        "--dataset",
        "synthetic",
        "--val-size",
        "64",
        "--train-subset",
        "96",
        "--epochs",
        "2",
        "--k",
        "2",
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert cli(capsys, "train", *args, "--name", "ref")[0] == 0
    monkeypatch.setenv(checkpoint.FAULT_ENV, "term@step:4")
    assert cli(capsys, "train", *args, "--name", "run")[0] == 3
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    assert cli(capsys, "train", "--resume", str(tmp_path / "run"))[0] == 0
    assert same_weights(weights(tmp_path / "ref"), weights(tmp_path / "run"))
    assert metrics(tmp_path / "ref") == metrics(tmp_path / "run")


def test_disk_full_mid_run_keeps_everything_and_resume_recovers(reference, tmp_path, capsys, monkeypatch):
    # ENOSPC while writing the epoch-2 checkpoint: after metrics.jsonl got epoch 2, before the checkpoint.
    monkeypatch.setenv(checkpoint.FAULT_ENV, "enospc@write:ckpt-000000028.pt")
    rc, out, err = cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "run")
    run = tmp_path / "run"
    line = one_error_line(err)
    assert rc == 2 and "No space left on device" in line and f"laperm train --resume {run}" in line
    assert not list(run.rglob("*.tmp")), "the failed write must not leave a temporary file"
    newest = checkpoint.list_checkpoints(run / "checkpoints")[0]
    assert newest.name == "ckpt-000000024.pt" and checkpoint.load(newest)["run"]["step"] == 24
    assert [r["epoch"] for r in rundir.read_metrics(run / "metrics.jsonl")] == [1, 2]

    monkeypatch.delenv(checkpoint.FAULT_ENV)
    assert cli(capsys, "train", "--resume", str(run))[0] == 0
    assert [r["epoch"] for r in rundir.read_metrics(run / "metrics.jsonl")] == [1, 2, 3]  # epoch 2 not doubled
    assert same_weights(weights(reference), weights(run))
    assert metrics(reference) == metrics(run)


def test_damaged_checkpoints_fall_back_to_previous_good_one(reference, tmp_path, capsys):
    # A copy of the finished reference run, with its newest checkpoint truncated and a torn
    # temporary file (what a kill in the middle of atomic_write_bytes leaves) beside it.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt-000000042.pt", "ckpt-000000040.pt"]
    ckpts[0].write_bytes(ckpts[0].read_bytes()[:1000])
    (run / "checkpoints" / ".ckpt-000000044.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (run / "best.pt").write_bytes(b"garbage")  # e.g. torn by a crash
    before = weights(reference)

    rc, out, err = cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert "warning: skipping checkpoint" in out and "ckpt-000000042.pt is corrupt or truncated" in out
    assert "resuming" in out and "from ckpt-000000040.pt" in out
    assert "restoring best.pt" in out
    assert (run / "checkpoints" / "ckpt-000000042.pt.corrupt").exists()  # set aside, not deleted
    assert not list(run.rglob("*.tmp"))
    assert same_weights(before, weights(run))
    assert same_weights(weights(reference, "best.pt"), weights(run, "best.pt"))
    assert metrics(reference) == metrics(run)


def test_all_checkpoints_damaged_restarts_from_scratch_identically(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for p in checkpoint.list_checkpoints(run / "checkpoints"):
        (run / "checkpoints" / f"{p.name}.sha256").write_text("0" * 64 + "\n")
    rc, out, err = cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert out.count("warning: skipping checkpoint") == 2 and "starting it from the beginning" in out
    assert same_weights(weights(reference), weights(run))


def test_resume_refuses_result_changing_flags_but_accepts_lr(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--model", "lenet300", "--k", "7")
    assert rc == 2
    assert "cannot change model ('f2' -> 'lenet300'), k (5 -> 7) when resuming" in one_error_line(err)
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--overwrite")
    assert rc == 2 and "either --resume or --overwrite" in one_error_line(err)
    rc, _, err = cli(capsys, "train", "--resume", str(tmp_path / "nope"))
    assert rc == 2 and "is not a laperm run folder" in one_error_line(err)
    (run / "config.yaml").write_text("- just\n- a list\n")
    rc, _, err = cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and "config.yaml is damaged" in one_error_line(err)
    (run / "config.yaml").write_bytes(b"\x00\xff\xfe garbage")
    rc, _, err = cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and "config.yaml is damaged" in one_error_line(err)


def test_second_run_into_same_folder_refuses_and_a_live_run_is_locked(reference, tmp_path, capsys):
    out = str(reference.parent)
    before = (reference / "final.pt").read_bytes()
    rc, _, err = cli(capsys, "train", *ARGS, "--out", out, "--name", "ref")
    assert rc == 2 and "already exists; pass --resume" in one_error_line(err)
    with rundir.locked(reference):  # as if another process were training in it
        rc, _, err = cli(capsys, "train", "--resume", str(reference))
        assert rc == 2 and "in use by another laperm process" in one_error_line(err)
        rc, _, err = cli(capsys, "train", *ARGS, "--out", out, "--name", "ref", "--overwrite")
        assert rc == 2 and "another laperm process is training in it" in one_error_line(err)
    assert (reference / "final.pt").read_bytes() == before


def test_read_only_output_folder_fails_cleanly_and_loses_nothing(reference, tmp_path, capsys, monkeypatch):
    # Running as root, chmod cannot make a folder read-only, so the writer fails as a read-only FS would.
    monkeypatch.setenv(checkpoint.FAULT_ENV, "erofs@write:*#*")
    rc, _, err = cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "new")
    assert rc == 2 and "cannot write to the output folder" in one_error_line(err)
    assert "Read-only file system" in err
    files = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    rc, _, err = cli(capsys, "train", "--resume", str(reference))
    assert rc == 2 and "Read-only file system" in one_error_line(err) and "are intact" in err
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == files


# -- numerical faults ------------------------------------------------------------------------


def test_nan_is_never_checkpointed_and_resume_with_lower_lr_recovers(tmp_path, capsys, monkeypatch):
    # A NaN appears in a weight right after step 8, where a checkpoint is due.
    monkeypatch.setenv(checkpoint.FAULT_ENV, "nan@step:8")
    rc, _, err = cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "run")
    run = tmp_path / "run"
    line = one_error_line(err)
    assert rc == 2
    assert "weight fc1.weight became NaN or inf at step 8" in line
    assert "the last good checkpoint, ckpt-000000004.pt, is kept" in line
    assert f"laperm train --resume {run} --lr 0.0001" in line
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["ckpt-000000004.pt"]
    saved = checkpoint.load(run / "checkpoints" / "ckpt-000000004.pt")
    assert all(torch.isfinite(t).all() for t in saved["model"].values())

    monkeypatch.delenv(checkpoint.FAULT_ENV)
    rc, out, err = cli(capsys, "train", "--resume", str(run), "--lr", "0.0001")
    assert rc == 0, err
    assert "learning rate changed from 0.001 to 0.0001 from step 4 on" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["changed_on_resume"] == [{"step": 4, "lr": [0.001, 0.0001]}]
    assert rundir.read_run_config(run)["lr"] == 0.0001
    assert rundir.read_metrics(run / "metrics.jsonl")[0]["lr"] == pytest.approx(0.0001 * 0.8)


def test_diverging_learning_rate_stops_with_a_clear_message(tmp_path, capsys):
    # Fine in epoch 1, lr 1e-3 * 1e29 from epoch 2 on: activations overflow, the loss turns inf/NaN.
    args = [a for a in ARGS if a not in ("--lr-schedule", "exp:0.8")]
    rc, _, err = cli(
        capsys, "train", *args, "--lr-schedule", "milestones:1=1e29", "--out", str(tmp_path), "--name", "run"
    )
    line = one_error_line(err)
    assert rc == 2 and ("NaN or inf" in line or "the training loss became" in line)
    assert "is kept" in line and "--lr 0.0001" in line
    kept = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert kept, "epoch 1 was fine, so its checkpoint must be there"
    for p in kept:
        saved = checkpoint.load(p)
        assert all(torch.isfinite(t).all() for t in saved["model"].values())
        assert all(
            torch.isfinite(t).all()
            for st in saved["optimizer"]["state"].values()
            for t in st.values()
            if t.is_floating_point()
        )


# -- invariants ------------------------------------------------------------------------------


def test_row_fingerprint_is_permutation_invariant_and_exact():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        rows = torch.randn(6, 50, generator=g).to(dtype)
        perm = torch.stack([r[torch.randperm(50, generator=g)] for r in rows])
        assert torch.equal(_row_fingerprint(rows), _row_fingerprint(perm))
        broken = perm.clone()
        broken[2, 7] = torch.nextafter(broken[2, 7], torch.tensor(9.0, dtype=dtype))  # one ulp
        diff = _row_fingerprint(broken) != _row_fingerprint(rows)
        assert diff.tolist() == [False, False, True, False, False, False]
    zeros = torch.zeros(1, 4)
    assert not torch.equal(_row_fingerprint(zeros), _row_fingerprint(-zeros))  # bits, not values


def test_broken_sync_stops_the_run_naming_the_tensor(tmp_path, capsys, monkeypatch):
    real = reconnect.sync_tensor_

    def buggy(t, sorted_vals, layout=reconnect.RowLayout()):
        real(t, sorted_vals, layout)
        if t.dim() == 2 and t.shape[0] == 64:  # fc2 of f2: nudge one weight by one ulp
            t.view(-1)[5] = torch.nextafter(t.view(-1)[5], torch.tensor(1.0))
        return t

    monkeypatch.setattr(reconnect, "sync_tensor_", buggy)
    rc, _, err = cli(capsys, "train", *ARGS, "--out", str(tmp_path), "--name", "run")
    line = one_error_line(err)
    assert rc == 2
    assert "after the sync at step 5, row 0 of" in line and "is no longer a permutation" in line
    assert ".weight" in line
    # Nothing after the broken sync was checkpointed (the first checkpoint, step 4, predates it).
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["ckpt-000000004.pt"]


def test_verify_detects_tampered_weights(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert cli(capsys, "verify", str(run))[0] == 0
    final = checkpoint.load(run / "final.pt")
    name = next(iter(final["model"]))
    final["model"][name].view(-1)[0] += 1.0
    checkpoint.save(final, run / "final.pt")
    rc, out, _ = cli(capsys, "verify", str(run))
    assert rc == 1 and f"final.pt: {name} is not a row-wise permutation" in out


# -- checkpoint files ------------------------------------------------------------------------


def test_checkpoint_files_detect_damage_and_refuse_code(tmp_path):
    path = tmp_path / "c.pt"
    digest = checkpoint.save({"w": torch.arange(5.0)}, path)
    assert (tmp_path / "c.pt.sha256").read_text().split()[0] == digest
    assert torch.equal(checkpoint.load(path)["w"], torch.arange(5.0))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(path)
    path.write_bytes(data)
    (tmp_path / "c.pt.sha256").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no checksum file"):
        checkpoint.load(path)

    # A pickle that would run code is refused even with a valid checksum.
    import io
    import pickle

    evil = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf, pickle_module=pickle)
    checkpoint.atomic_write_bytes(evil, buf.getvalue())
    import hashlib

    checkpoint.atomic_write_text(f"{evil}.sha256", hashlib.sha256(buf.getvalue()).hexdigest() + "\n")
    with pytest.raises(checkpoint.CheckpointError, match="more than tensors"):
        checkpoint.load(evil)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    checkpoint.atomic_write_text(path, "old")
    monkeypatch.setenv(checkpoint.FAULT_ENV, "enospc@write:f.txt")
    with pytest.raises(OSError) as e:
        checkpoint.atomic_write_text(path, "new and longer")
    assert e.value.errno == errno.ENOSPC
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.mark.cuda
def test_laperm_run_resumes_on_cuda(tmp_path, capsys, monkeypatch):
    """Found on an H100: a resumed LaPerm run compared the checkpoint's last synced weights (loaded
    onto the CPU) with the live CUDA weights for the "reconnected" metric, and failed at the next epoch."""
    args = [*ARGS, "--device", "cuda", "--out", str(tmp_path)]
    assert cli(capsys, "train", *args, "--name", "ref")[0] == 0
    monkeypatch.setenv(checkpoint.FAULT_ENV, "term@step:30")  # epoch 3: epochs 1-2 recorded reconnections
    assert cli(capsys, "train", *args, "--name", "run")[0] == 3
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    rc, out, err = cli(capsys, "train", "--resume", str(tmp_path / "run"))
    assert rc == 0, err
    resumed = metrics(tmp_path / "run")
    assert [r["epoch"] for r in resumed] == [1, 2, 3] and "reconnected" in resumed[-1]
    assert verify.verify_run(tmp_path / "run").ok
