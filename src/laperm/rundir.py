"""Run folders: layout, metrics log, learning curves and the permutation check.

A run folder holds::

    config.yaml       the resolved configuration (re-run it with --config)
    init.pt           θ0: the initial state and which tensors LaPerm permutes
    metrics.jsonl     one JSON object per evaluated epoch
    checkpoints/      ckpt-<step>.pt (+ .sha256), the newest few, for --resume
    best.pt           synced weights selected on the validation split
    final.pt          synced weights at the end of training
    curves.png        learning curves
    summary.json      the headline numbers

``verify_run`` checks that saved weights are row-wise permutations of θ0.
A run holds ``.lock`` (an advisory ``flock``) while it trains, so a second
process cannot write into the same folder; the kernel drops the lock when the
process dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoint, reconnect
from .reconnect import RowLayout

__all__ = ["RunDirError", "check_run_dir", "prepare_run_dir", "MetricsLog", "verify_run", "VerifyReport", "plot_curves"]


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists, unwritable, incomplete)."""


MARKER = "config.yaml"
LOCK = ".lock"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the run folder's lock for the duration; refuse if another process holds it."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunDirError(f"run folder {path} is in use by another laperm process; "
                              "wait for it to finish or stop it first") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _in_use(path: Path) -> bool:
    """True when another process holds the lock of run folder ``path``."""
    if not (path / LOCK).is_file():
        return False
    try:
        with locked(path):
            return False
    except (RunDirError, OSError):
        return True


def check_run_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError if ``path`` cannot be used as asked; changes nothing (call it early)."""
    if resume and overwrite:
        raise RunDirError("choose either --resume or --overwrite, not both")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a folder; choose another --out or --name")
    if resume:
        if not (path / MARKER).is_file():
            raise RunDirError(f"cannot resume: {path} is not a laperm run folder (no {MARKER})")
        if _in_use(path):
            raise RunDirError(f"run folder {path} is in use by another laperm process; wait for it or stop it first")
    elif path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"run folder {path} already exists; pass --resume to continue it, "
                "--overwrite to start it again, or --name to pick another folder"
            )
        if not (path / MARKER).is_file():
            raise RunDirError(f"refusing to overwrite {path}: it is not a laperm run folder")
        if _in_use(path):
            raise RunDirError(f"refusing to overwrite {path}: another laperm process is training in it")


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool) -> Path:
    """Create (or reuse, for ``resume``) a run folder, refusing to clobber earlier work."""
    check_run_dir(path, resume=resume, overwrite=overwrite)
    if resume:
        # A process killed inside an atomic write leaves its temporary file behind.
        for folder in (path, path / "checkpoints"):
            checkpoint.remove_stale_temps(folder)
        return path
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)  # check_run_dir allowed it: --overwrite of a laperm run folder
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        checkpoint.atomic_write_bytes(probe, b"ok")  # the same path real writes take (and their test faults)
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to the output folder {path}: {e.strerror or e}; choose another --out") from None
    return path


def read_run_config(path: Path) -> dict[str, Any]:
    """The config.yaml of run folder ``path`` as a dict, or a RunDirError saying what is wrong."""
    from .config import FIELD_NAMES

    file = Path(path) / MARKER
    if not file.is_file():
        raise RunDirError(f"cannot resume: {path} is not a laperm run folder (no {MARKER})")
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunDirError(f"{file} is damaged ({type(e).__name__}); restore it or start a new run") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{file} is damaged (not a mapping of config fields); restore it or start a new run")
    unknown = sorted(map(str, set(data) - FIELD_NAMES))
    if unknown:
        raise RunDirError(f"{file} has unknown field(s) {', '.join(unknown)}; restore it or start a new run")
    return data


def write_config(path: Path, config: dict[str, Any]) -> None:
    checkpoint.atomic_write_text(path / MARKER, yaml.safe_dump(config, sort_keys=False))


class MetricsLog:
    """JSON-lines metrics, rewritten atomically on every append.

    The file never holds half a line (a full disk or a kill mid-write leaves the
    previous version), and on resume it is rewritten from the checkpoint's copy,
    so epochs run again after a crash are not listed twice.  The file is small
    (one line per epoch), so rewriting it costs nothing.
    """

    def __init__(self, path: Path | None, records: list[dict[str, Any]] | None = None) -> None:
        self.path = path  # None: keep records in memory only (ranks other than 0)
        self.records: list[dict[str, Any]] = list(records or [])
        if path is not None:
            checkpoint.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    @staticmethod
    def write(path: Path, records: list[dict[str, Any]]) -> None:
        """Atomically write ``records`` as a JSON-lines file."""
        checkpoint.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))

    def append(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            text = "".join(json.dumps(r) + "\n" for r in [*self.records, record])
            checkpoint.atomic_write_text(self.path, text)
        self.records.append(record)  # only once it is on disk


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


@dataclass
class VerifyReport:
    ok: bool
    checked: list[str]
    tensors: int
    weights: int
    failures: list[str]

    def message(self) -> str:
        if self.ok:
            return (
                f"verified: {self.weights:,} permuted weights in {self.tensors} tensors of "
                f"{', '.join(self.checked)} are row-wise permutations of their initial values"
            )
        return "NOT a permutation of the initial weights: " + "; ".join(self.failures)


def layout_records(optimizer: Any) -> list[dict[str, Any]]:
    """JSON-able description of what a LaPerm optimizer permutes (for init.pt)."""
    return [
        {"name": name, "granularity": optimizer.layout_of(p).granularity,
         "transposed": optimizer.layout_of(p).transposed, "groups": optimizer.layout_of(p).groups}
        for name, p in optimizer.permuted_parameters()
    ]


def verify_weights(init: dict[str, Any], weights: dict[str, torch.Tensor]) -> tuple[int, int, list[str]]:
    """Check ``weights`` against ``init`` (as stored in init.pt); returns (tensors, weights, failures)."""
    failures, n, total = [], 0, 0
    for rec in init["permuted"]:
        name = rec["name"]
        if name not in weights or name not in init["state"]:
            failures.append(f"{name} is missing")
            continue
        if not isinstance(weights[name], torch.Tensor):
            failures.append(f"{name} is not a tensor")
            continue
        layout = RowLayout(rec["granularity"], rec["transposed"], rec["groups"])
        if not reconnect.is_row_permutation(weights[name].cpu(), init["state"][name].cpu(), layout):
            failures.append(f"{name} is not a row-wise permutation of its initial values")
        n, total = n + 1, total + weights[name].numel()
    return n, total, failures


def verify_run(run_dir: str | Path) -> VerifyReport:
    """Check final.pt (and best.pt) of a finished run against its init.pt (or a `laperm export` file)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        from .export import is_compact_file, verify_compact

        if is_compact_file(run_dir):  # a compact checkpoint written by `laperm export`
            return verify_compact(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a folder; pass a laperm run folder")
    if not (run_dir / "init.pt").is_file():
        raise RunDirError(f"{run_dir} is not a laperm run folder (no init.pt)")
    init = checkpoint.load(run_dir / "init.pt")
    if not (isinstance(init, dict) and isinstance(init.get("state"), dict)
            and isinstance(init.get("permuted", []), list)
            and all(isinstance(r, dict) and {"name", "granularity", "transposed", "groups"} <= r.keys()
                    for r in init.get("permuted", []))):
        raise RunDirError(f"{run_dir / 'init.pt'} is not a laperm init record (damaged or from another tool)")
    if not init.get("permuted"):
        raise RunDirError(f"{run_dir} was trained without LaPerm ({init.get('optimizer')}); nothing to verify")
    checked, failures, tensors, weights = [], [], 0, 0
    for name in ("final.pt", "best.pt"):
        if (run_dir / name).is_file():
            saved = checkpoint.load(run_dir / name)
            state = saved.get("model") if isinstance(saved, dict) else None
            if not isinstance(state, dict):
                raise RunDirError(f"{run_dir / name} holds no model weights (damaged or from another tool)")
            tensors, weights, fails = verify_weights(init, state)
            failures += [f"{name}: {f}" for f in fails]
            checked.append(name)
    if not checked:
        raise RunDirError(f"{run_dir} has no final.pt or best.pt yet; finish or --resume the run first")
    return VerifyReport(not failures, checked, tensors, weights, failures)


def plot_curves(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [r["train_loss"] for r in records], label="train (inner weights)")
    if records and "val_loss" in records[0]:
        ax1.plot(epochs, [r["val_loss"] for r in records], label="validation (synced)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key, label in (("train_acc", "train (inner weights)"), ("val_acc", "validation (synced)"),
                       ("test_acc", "test (synced)")):
        if records and key in records[0]:
            ax2.plot(epochs, [100 * r[key] for r in records], label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
