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
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoint, reconnect
from .reconnect import RowLayout

__all__ = ["RunDirError", "prepare_run_dir", "MetricsLog", "verify_run", "VerifyReport", "plot_curves"]


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists, unwritable, incomplete)."""


MARKER = "config.yaml"


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool) -> Path:
    """Create (or reuse, for ``resume``) a run folder, refusing to clobber earlier work."""
    if resume and overwrite:
        raise RunDirError("choose either --resume or --overwrite, not both")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a folder; choose another --out or --name")
    if resume:
        if not (path / MARKER).is_file():
            raise RunDirError(f"cannot resume: {path} is not a laperm run folder (no {MARKER})")
        return path
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"run folder {path} already exists; pass --resume to continue it, "
                "--overwrite to start it again, or --name to pick another folder"
            )
        if not (path / MARKER).is_file():
            raise RunDirError(f"refusing to overwrite {path}: it is not a laperm run folder")
        shutil.rmtree(path)
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to the output folder {path}: {e.strerror or e}; choose another --out") from None
    return path


def write_config(path: Path, config: dict[str, Any]) -> None:
    checkpoint.atomic_write_text(path / MARKER, yaml.safe_dump(config, sort_keys=False))


class MetricsLog:
    """Append-only JSON-lines metrics; on resume it is rewritten from the checkpoint's copy."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = list(records or [])
        checkpoint.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


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
        {"name": st["name"], "granularity": st["layout"].granularity,
         "transposed": st["layout"].transposed, "groups": st["layout"].groups}
        for st in optimizer.state.values()
    ]


def verify_weights(init: dict[str, Any], weights: dict[str, torch.Tensor]) -> tuple[int, int, list[str]]:
    """Check ``weights`` against ``init`` (as stored in init.pt); returns (tensors, weights, failures)."""
    failures, n, total = [], 0, 0
    for rec in init["permuted"]:
        name = rec["name"]
        if name not in weights or name not in init["state"]:
            failures.append(f"{name} is missing")
            continue
        layout = RowLayout(rec["granularity"], rec["transposed"], rec["groups"])
        if not reconnect.is_row_permutation(weights[name].cpu(), init["state"][name].cpu(), layout):
            failures.append(f"{name} is not a row-wise permutation of its initial values")
        n, total = n + 1, total + weights[name].numel()
    return n, total, failures


def verify_run(run_dir: str | Path) -> VerifyReport:
    """Check final.pt (and best.pt) of a finished run against its init.pt."""
    run_dir = Path(run_dir)
    if not (run_dir / "init.pt").is_file():
        raise RunDirError(f"{run_dir} is not a laperm run folder (no init.pt)")
    init = checkpoint.load(run_dir / "init.pt")
    if not init.get("permuted"):
        raise RunDirError(f"{run_dir} was trained without LaPerm ({init.get('optimizer')}); nothing to verify")
    checked, failures, tensors, weights = [], [], 0, 0
    for name in ("final.pt", "best.pt"):
        if (run_dir / name).is_file():
            state = checkpoint.load(run_dir / name)["model"]
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
