"""Run folders: layout, metrics log, learning curves and the permutation check.

A run folder holds::

    config.yaml       the resolved configuration (re-run it with --config)
    init.pt           θ0: the initial state, which tensors LaPerm permutes, which it leaves free and why
    laperm.txt        the laperm.describe table: each parameter, permuted or free and why
    metrics.jsonl     one JSON object per evaluated epoch
    checkpoints/      ckpt-<step>.pt (+ .sha256), the newest few, for --resume
    best.pt           synced weights selected on the validation split
    final.pt          synced weights at the end of training
    curves.png        learning curves
    summary.json      the headline numbers

Every file name lives here (the constants below), and every reader of a run
folder's files is here: nothing else parses config.yaml or the JSON-lines logs.
(``laperm.verify`` checks that saved weights are row-wise permutations of θ0.)
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
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint
from .config import FIELD_NAMES

__all__ = [
    "RunDirError",
    "check_run_dir",
    "prepare_run_dir",
    "read_run_config",
    "write_config",
    "MetricsLog",
    "read_jsonl",
    "read_metrics",
    "read_json",
    "locked",
]


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists, unwritable, incomplete)."""


@contextlib.contextmanager
def write_errors_explained(run_dir: Path) -> Iterator[None]:
    """Turn an ``OSError`` while a run writes (disk full, read-only) into a :class:`RunDirError` naming the
    file and the command that continues the run.  Every write is atomic, so what is on disk is the last
    complete version of each file."""
    try:
        yield
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise RunDirError(
            f"cannot write{where} ({e.strerror or e}); the files already written are intact. "
            f"Free some space or fix the permissions, then continue with: laperm train --resume {run_dir}"
        ) from None


# The files of a run folder (their names are the run-folder format).
MARKER = CONFIG = "config.yaml"
LOCK = ".lock"
INIT, BEST, FINAL = "init.pt", "best.pt", "final.pt"
METRICS, EVALS, SUMMARY, CURVES = "metrics.jsonl", "evals.jsonl", "summary.json", "curves.png"
CHECKPOINTS = "checkpoints"
VOCAB = "vocab.json"  # text runs: the character vocabulary (id -> character)
DESCRIPTION = "laperm.txt"  # laperm.overview.describe's table of the model, written at the start of a run
SYNCCOST = "synccost.jsonl"  # runs with the synccost analysis hook (experiments.hooks.SyncCostProbe)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the run folder's lock for the duration; refuse if another process holds it."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunDirError(
                f"run folder {path} is in use by another laperm process; wait for it to finish or stop it first"
            ) from None
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
        for folder in (path, path / CHECKPOINTS):
            checkpoint.remove_stale_temps(folder)
        return path
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)  # check_run_dir allowed it: --overwrite of a laperm run folder
    made = missing_folders(path)
    try:
        (path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        checkpoint.atomic_write_bytes(probe, b"ok")  # the same path real writes take (and their test faults)
        probe.unlink()
    except OSError as e:
        remove_empty(made)  # (e.g. --out made, then a --name too long for the file system)
        raise RunDirError(
            f"cannot write to the output folder {path}: {e.strerror or e}; choose another --out"
        ) from None
    return path


def missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, innermost first (what a
    ``mkdir(parents=True)`` would make)."""
    missing = []
    path = Path(path)
    try:
        while not path.exists() and path != path.parent:
            missing.append(path)
            path = path.parent
    except OSError:  # (a name too long to look up)
        pass
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (innermost first) that exists and is empty; leave the rest."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def check_can_create(path: Path, what: str) -> None:
    """Raise RunDirError unless folder ``path`` exists or can be made, writable; leaves nothing behind."""
    path = Path(path)
    made = missing_folders(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise RunDirError(f"cannot write {what} {path}: {e.strerror or e}; choose another folder") from None
    finally:
        remove_empty(made)


def read_run_config(path: Path) -> dict[str, Any]:
    """The config.yaml of run folder ``path`` as a dict, or a RunDirError saying what is wrong."""
    file = Path(path) / MARKER
    if not file.is_file():
        raise RunDirError(f"cannot resume: {path} is not a laperm run folder (no {MARKER})")
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunDirError(f"{file} is damaged ({type(e).__name__}); restore it or start a new run") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{file} is damaged (not a mapping of config fields); restore it or start a new run")
    data.setdefault("mode", "eager")  # a run folder from before `mode` existed trained eagerly (now: auto)
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


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics.jsonl, evals.jsonl, analysis logs); [] if it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records (``path``: the file, or the run folder)."""
    path = Path(path)
    return read_jsonl(path / METRICS if path.is_dir() else path)


def read_json(path: str | Path) -> Any:
    """A JSON file of a run folder (summary.json, analysis records), or None if it is missing."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None
