"""A small on-disk cache of decoded datasets (uint8 tensors saved with ``torch.save``).

Decoding 60 000 JPEGs takes seconds; loading the cached tensors takes well
under one.  Entries are keyed by a fingerprint of the source (path, size,
mtime), so replacing the source invalidates them automatically.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .dataset import Dataset

CACHE_VERSION = 1  # bump when the decoded layout changes, to ignore old entries


def default_cache_dir() -> Path:
    """``$LAPERM_CACHE`` if set, else ``$XDG_CACHE_HOME/laperm`` or ``~/.cache/laperm``."""
    if os.environ.get("LAPERM_CACHE"):
        return Path(os.environ["LAPERM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "laperm"


def fingerprint(paths: list[Path], tag: str) -> str:
    """Hash of ``tag`` and the absolute path, size and mtime of each file."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{tag}".encode())
    for p in sorted(paths):
        st = p.stat()
        # abspath, not resolve(): no per-file symlink walk for 60 000-image trees.
        h.update(f"\0{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def cache_path(cache_dir: Path, name: str, key: str) -> Path:
    return cache_dir / f"{name}-{key}.pt"


def load_cached(path: Path) -> Dataset | None:
    """Return the cached dataset, or ``None`` if absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, weights_only=True)  # weights_only: never run pickled code
        return Dataset(
            name=d["name"],
            train_x=d["train_x"],
            train_y=d["train_y"],
            test_x=d["test_x"],
            test_y=d["test_y"],
            classes=list(d["classes"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )
    except Exception as exc:  # a damaged cache must never stop training: just rebuild it
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None


def save_cached(path: Path, ds: Dataset) -> None:
    """Write atomically (temp file + ``os.replace``) so concurrent readers never see half a file."""
    payload = {
        "name": ds.name,
        "train_x": ds.train_x,
        "train_y": ds.train_y,
        "test_x": ds.test_x,
        "test_y": ds.test_y,
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared LAPERM_CACHE should stay readable
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # read-only home etc.: caching is an optimisation, not a requirement
        warnings.warn(
            f"could not write dataset cache {path}: {exc}; set LAPERM_CACHE to a writable directory", stacklevel=3
        )
