"""Bad input to the `laperm` command: one clear line, a non-zero exit, no traceback, nothing half-made.

Covers the "Bad input" list of the training issue (unknown names, missing
CIFAR-10, corrupt data files, model/dataset mismatch, unwritable output,
invalid numbers) and damaged run folders for `laperm verify` / `--resume`.
All in-process through :func:`laperm.cli.main` (test_reliability_kill.py checks
a real process's stderr too).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import run_cli

from laperm import checkpoint
from laperm.cli import main
from laperm.data.idx import IDX_FILES, write_idx

TINY = [
    "--dataset",
    "synthetic",
    "--val-size",
    "64",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    n = torch.get_num_threads()
    monkeypatch.delenv(checkpoint.FAULT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # so nothing is found (or written) by accident in the repository
    yield
    torch.set_num_threads(n)


cli = run_cli


def error_line(capsys, *argv: str) -> str:
    """Run ``laperm argv``; it must fail with exactly one ``laperm: error:`` line. Returns the line."""
    rc, out, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc not in (0, None), (out, err)
    assert len(lines) == 1 and lines[0].startswith("laperm: error: "), err
    assert "Traceback" not in err and "laperm: error: unexpected " not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "resnet51"], "unknown model 'resnet51'; choose one of: f1, f2, lenet300, conv7"),
        (["--dataset", "imagenet"], "Unknown dataset 'imagenet'; choose one of mnist, fashion-mnist, idx, cifar10"),
        (["--preset", "conv99"], "unknown preset 'conv99'; choose one of: conv7, conv2"),
        (["--epochs", "-3"], "epochs must be a whole number >= 1, got -3"),
        (["--k", "0"], "k must be a whole number >= 1, got 0"),
        (["--lr", "nan"], "lr must be a positive number, got nan"),
        (["--batch-size", "0"], "batch_size must be a whole number >= 1, got 0"),
        (["--init", "pruned:1.5"], "init 'pruned:1.5' not understood"),
        (["--lr-schedule", "exp:inf"], "lr_schedule 'exp:inf' not understood"),
        (["--device", "cuda:banana"], "device 'cuda:banana' not understood"),
        (["--device", "meta"], "device 'meta' is not supported"),
        (["--name", "../escape"], "name must be a plain folder name"),
        (["--threads", "100000"], "threads must be a whole number from 1 to 1024"),
        (["--val-size", "100000"], "val_size 100000 leaves no training data (512 images)"),
        (["--augment", "wobble"], "augment:"),
        (["--model", "conv2", "--dataset", "synthetic"], "model conv2 expects cifar10 images of shape 3x32x32"),
    ],
)
def test_bad_values_give_one_line_and_make_no_folder(capsys, tmp_path, argv, expected):
    line = error_line(capsys, "train", *TINY, *argv, "--out", "runs")
    assert expected in line
    assert not (tmp_path / "runs").exists(), "a rejected run must not leave a folder behind"


def test_model_dataset_mismatch_on_real_mnist(capsys, tmp_path):
    line = error_line(capsys, "train", "--model", "conv2", "--dataset", "mnist", "--out", "runs")
    assert "model conv2 expects cifar10 images of shape 3x32x32, but dataset mnist has 1x28x28" in line
    assert not (tmp_path / "runs").exists()


def test_missing_cifar_says_where_it_looked(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "no-cifar-here"
    empty.mkdir()
    monkeypatch.setenv("LAPERM_CIFAR10", str(empty))
    line = error_line(capsys, "train", "--model", "conv2", "--out", "runs")
    assert f"CIFAR-10 not found (looked in {empty})" in line and "--data-dir" in line
    line = error_line(capsys, "train", "--preset", "conv2", "--data-dir", str(tmp_path / "nowhere"), "--out", "runs")
    assert "CIFAR-10 not found" in line and "nowhere" in line


def _idx_dir(folder, n=64):
    """A small MNIST-format IDX folder with a SHA256SUMS file."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 255, (16, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(16) % 10).astype(np.uint8),
    }
    sums = []
    for role, base in IDX_FILES.items():
        path = write_idx(arrays[role], folder / base)
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {base}")
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return folder


def test_corrupt_and_truncated_idx_files(capsys, tmp_path):
    data = _idx_dir(tmp_path / "idx")
    images = data / IDX_FILES["train_x"]
    raw = bytearray(images.read_bytes())
    raw[100] ^= 0xFF  # one flipped byte: the checksum catches it
    images.write_bytes(bytes(raw))
    args = ["train", "--model", "f1", "--dataset", "idx", "--data-dir", str(data), "--val-size", "8", "--out", "runs"]
    line = error_line(capsys, *args)
    assert "Checksum mismatch" in line and str(images) in line
    (data / "SHA256SUMS").unlink()  # without checksums, a truncated file is still caught by its header
    images.write_bytes(bytes(raw[:5000]))
    assert "is truncated or corrupt" in error_line(capsys, *args)
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_folder(capsys, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    line = error_line(capsys, "train", "--model", "f1", *TINY, "--out", "a-file/runs")
    assert "cannot write to the output folder a-file/runs" in line
    line = error_line(capsys, "train", "--model", "f1", *TINY, "--out", ".", "--name", "a-file")
    assert "exists and is not a folder" in line


def test_argparse_errors_are_usage_plus_one_line(capsys):
    rc, _, err = cli(capsys, "train", "--epochs", "many")
    assert (
        rc == 2 and err.strip().splitlines()[-1] == "laperm train: error: argument --epochs: invalid int value: 'many'"
    )
    rc, _, err = cli(capsys, "train", "--optimizer", "rmsprop")
    assert rc == 2 and "invalid choice: 'rmsprop'" in err and "Traceback" not in err
    rc, _, err = cli(capsys, "frobnicate")
    assert rc == 2 and "invalid choice: 'frobnicate'" in err


# -- run folders -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    n = torch.get_num_threads()
    assert main(["train", "--model", "f1", *TINY, "--k", "3", "--out", str(out), "--name", "done"]) == 0
    torch.set_num_threads(n)
    return out / "done"


def _copy(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "copy")


def test_verify_on_good_and_damaged_run_folders(capsys, tmp_path, finished_run):
    rc, out, _ = cli(capsys, "verify", str(finished_run))
    assert rc == 0 and out.startswith("verified: 7,840 permuted weights in 1 tensors of final.pt, best.pt")
    assert "is not a folder" in error_line(capsys, "verify", str(tmp_path / "nope"))
    assert "not a folder" in error_line(capsys, "verify", str(finished_run / "final.pt"))
    assert "no init.pt" in error_line(capsys, "verify", str(tmp_path))

    run = _copy(finished_run, tmp_path)
    (run / "final.pt").write_bytes((run / "final.pt").read_bytes()[:-100])
    assert "final.pt is corrupt or truncated" in error_line(capsys, "verify", str(run))
    checkpoint.save(["not", "an", "init", "record"], run / "init.pt")
    assert "is not a laperm init record" in error_line(capsys, "verify", str(run))
    (run / "init.pt").unlink()
    assert "no init.pt" in error_line(capsys, "verify", str(run))


def test_resume_rebuilds_a_lost_init_pt_and_refuses_a_foreign_one(capsys, tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / "init.pt").unlink()
    rc, out, err = cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert "rebuilt init.pt from the seed" in out
    assert cli(capsys, "verify", str(run))[0] == 0
    # init.pt of another seed: the folder mixes runs.
    other = tmp_path / "other"
    assert (
        cli(capsys, "train", "--model", "f1", *TINY, "--k", "3", "--seed", "5", "--out", str(other), "--name", "x")[0]
        == 0
    )
    (run / "init.pt").write_bytes((other / "x" / "init.pt").read_bytes())
    (run / "init.pt.sha256").write_bytes((other / "x" / "init.pt.sha256").read_bytes())
    line = error_line(capsys, "train", "--resume", str(run))
    assert "init.pt and the newest checkpoint disagree about the initial values of fc.weight" in line


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_only_that_matches_no_run_is_an_error_listing_the_tags(capsys, tmp_path, dry_run):
    """Issue 33: `laperm run paper --only row=Nope` printed nothing and exited 0 (a real run trained nothing)."""
    line = error_line(capsys, "run", "paper", "--only", "row=Nope", *dry_run)
    assert "--only 'row=Nope' matches none of the" in line and "runs of paper; its tags: " in line
    assert "model=conv7" in line and "method=laperm" in line  # the tags there are, to pick from
    assert list(tmp_path.iterdir()) == [], "a refused command must not create anything"
    rc, out, _ = cli(capsys, "run", "paper", "--only", "model=conv7", "--dry-run", "--out", "r")
    assert rc == 0 and "model=conv7" in out  # a filter that matches still lists its runs
