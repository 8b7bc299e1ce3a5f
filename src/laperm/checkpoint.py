"""Crash-safe files: atomic writes with checksums, and finding the last good checkpoint.

A checkpoint ``name.pt`` is written to a temporary file in the same folder,
flushed, fsync'ed and renamed over the target, so a crash leaves either the
old file or the new one, never half of one.  Its sha256 goes into a sidecar
``name.pt.sha256`` written the same way *after* the payload, so a payload
without a matching sidecar is detected as incomplete or corrupt.

Files are read back with ``torch.load(weights_only=True)``: a checkpoint holds
only tensors and plain Python values, so loading one (``laperm verify`` on a
downloaded file, say) never runs code from it.

:func:`fault_point` is a test hook: with ``LAPERM_TEST_FAULT`` set it kills,
signals or fails the process at named points (inside a checkpoint write, at a
training step, ...), so tests can prove that a crash there loses nothing.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_text", "save", "load", "latest_good", "fault_point"]


class CheckpointError(RuntimeError):
    """A checkpoint or run file is missing, truncated or corrupt."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            # Written in two halves so a test fault can strike with half a file on disk.
            f.write(data[: len(data) // 2])
            f.flush()
            fault_point(f"write:{path.name}")
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


TMP_SUFFIX = ".tmp"


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed :func:`atomic_write_bytes` left in ``folder``."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".*{TMP_SUFFIX}") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
    fault_point(f"sidecar:{Path(path).name}")  # a crash here leaves a payload whose sidecar does not match
    atomic_write_text(f"{path}.sha256", f"{digest}  {Path(path).name}\n")
    return digest


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def load(path: str | Path, map_location: Any = "cpu", verify: bool = True, weights_only: bool = True) -> Any:
    """Load a file written by :func:`save`, checking its sha256 first.

    ``weights_only`` (default) refuses pickled objects other than tensors and
    plain containers, so a tampered file cannot run code when loaded.
    """
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
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}); it is corrupt or holds more than tensors and plain values"
        ) from None


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
            warn(f"warning: skipping checkpoint: {e}; using the previous one")
    return None


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.corrupt`` (kept for inspection, never loaded again)."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    Path(f"{path}.sha256").unlink(missing_ok=True)
    return target


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their sidecars)."""
    for path in list_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
        Path(f"{path}.sha256").unlink(missing_ok=True)


# -- test hook ----------------------------------------------------------------------------

FAULT_ENV = "LAPERM_TEST_FAULT"
FAULT_LOG_ENV = "LAPERM_TEST_FAULT_LOG"
_fault_counts: dict[str, int] = {}
_fault_spec = ""


def reset_fault_counts() -> None:
    """Forget how often each fault point was reached (tests: each test counts from zero, even with the same spec)."""
    global _fault_spec
    _fault_spec = ""
    _fault_counts.clear()


def fault_point(point: str) -> bool:
    """Test hook: act on ``point`` if ``$LAPERM_TEST_FAULT`` asks for it; a no-op otherwise.

    ``LAPERM_TEST_FAULT="ACTION@PATTERN[#N]"`` fires ACTION the N-th time (default
    the first; ``#*``: every time) a point whose name matches the glob PATTERN is
    reached in this process. Several specs may be joined with ``;``. Points: ``step:<global step>``,
    ``epoch-end:<epoch>`` (after the metrics line, before the checkpoint),
    ``write:<file name>`` (half the temporary file written), ``sidecar:<file name>``
    (payload renamed, checksum not yet written). Actions: ``kill`` (SIGKILL),
    ``term``/``int`` (send SIGTERM/SIGINT to this process), ``pause`` (wait for a
    signal), ``enospc``/``erofs`` (raise that OSError), ``nan`` (return True: the
    caller injects a NaN). The point is appended to ``$LAPERM_TEST_FAULT_LOG``
    before the action, so a test can tell where a run died. ``$LAPERM_TEST_FAULT_RANK``
    limits the faults to one rank of a distributed run.
    """
    global _fault_spec
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    rank = os.environ.get("RANK", "0")
    if os.environ.get("LAPERM_TEST_FAULT_RANK", rank) != rank:  # distributed tests: fault one rank only
        return False
    if spec != _fault_spec:  # a new spec (e.g. a new test in the same process) starts a new count
        _fault_spec = spec
        _fault_counts.clear()
    for item in spec.split(";"):
        action, _, target = item.strip().partition("@")
        pattern, _, nth = target.partition("#")
        if not fnmatch.fnmatchcase(point, pattern):
            continue
        _fault_counts[item] = _fault_counts.get(item, 0) + 1
        if nth != "*" and _fault_counts[item] != int(nth or 1):
            continue
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        if action == "pause":  # block first, so a signal sent as soon as the log line appears is not missed
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        if os.environ.get(FAULT_LOG_ENV):
            with open(os.environ[FAULT_LOG_ENV], "a") as f:
                f.write(f"{action}@{point}\n")
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action in ("term", "int"):
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
        elif action == "pause":
            sig = signal.sigwait(stop_signals)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            signal.raise_signal(sig)  # now the process's own handler sees it
        elif action in ("enospc", "erofs"):
            code = errno.ENOSPC if action == "enospc" else errno.EROFS
            raise OSError(code, os.strerror(code), point.partition(":")[2] or None)
        elif action == "nan":
            return True
    return False
