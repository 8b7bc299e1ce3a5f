"""Crash-safe files: atomic writes with checksums, and finding the last good checkpoint.

A checkpoint ``name.pt`` is written to a temporary file in the same folder,
flushed, fsync'ed and renamed over the target, so a crash leaves either the
old file or the new one, never half of one.  Its sha256 goes into a sidecar
``name.pt.sha256`` written the same way *after* the payload, so a payload
without a matching sidecar is detected as incomplete or corrupt.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_text", "save", "load", "latest_good"]


class CheckpointError(RuntimeError):
    """A checkpoint or run file is missing, truncated or corrupt."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def save(obj: Any, path: str | Path) -> str:
    """``torch.save`` ``obj`` atomically to ``path`` with a sha256 sidecar; returns the digest."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_text(f"{path}.sha256", f"{digest}  {Path(path).name}\n")
    return digest


def load(path: str | Path, map_location: Any = "cpu", verify: bool = True) -> Any:
    """Load a file written by :func:`save`, checking its sha256 first."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    data = path.read_bytes()
    if verify:
        sidecar = Path(f"{path}.sha256")
        if not sidecar.is_file():
            raise CheckpointError(f"{path} has no checksum file {sidecar.name}; it may be incomplete")
        expected = sidecar.read_text().split()[:1]
        if expected != [hashlib.sha256(data).hexdigest()]:
            raise CheckpointError(f"{path} is corrupt or truncated (sha256 does not match {sidecar.name})")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); it is corrupt") from None


_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:09d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_good(folder: str | Path, warn=print) -> tuple[Path, Any] | None:
    """The newest checkpoint in ``folder`` that loads and verifies, with its contents.

    Damaged ones are skipped with a message (via ``warn``), so a crash in the
    middle of writing the newest checkpoint falls back to the previous one.
    """
    for path in list_checkpoints(folder):
        try:
            return path, load(path)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    return None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their sidecars)."""
    for path in list_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
        Path(f"{path}.sha256").unlink(missing_ok=True)
