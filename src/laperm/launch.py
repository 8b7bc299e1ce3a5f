"""Tie the worker processes of a local multi-process launch to the life of their launcher.

``laperm train --nproc N`` runs torchrun's launcher inside the ``laperm`` process,
which starts the N workers with ``subprocess.Popen(start_new_session=True)``: each
worker is the launcher's child but lives in a session of its own, so killing the
launcher's process group (``kill -9``, an out-of-memory killer, a scheduler's hard
stop) does not reach the workers.  Left alone they would be re-parented to init,
train on, hold the run folder's lock and the GPUs.  :func:`die_with_parent` makes a
worker exit as soon as its launcher is gone, however the launcher died:

* on Linux, a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): the kernel
  kills the worker the moment the thread that started it ends (torchrun starts
  workers from the launcher's main thread, so: when the launcher process ends);
* everywhere, a daemon thread that polls ``os.getppid()`` and ends the process once
  it has been re-parented (the portable fallback, and a second line of defence).

A worker stopped this way writes nothing: every file of a run folder is written
atomically, so the folder keeps its last complete checkpoint, and the run folder's
lock is an ``flock`` that the kernel releases when the process ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "LAUNCHER_PID_ENV",
    "PEER_LOST_EXIT",
    "die_with_parent",
    "failure_line",
    "guard_worker",
    "mark_launcher",
    "quiet_launcher_logs",
    "resume_process_count",
]

# Set by the launcher in its own environment before it starts the workers (they inherit it).
LAUNCHER_PID_ENV = "LAPERM_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_POLL_S = 0.5  # how often the watchdog looks at the parent: a worker outlives its launcher by at most this
_ORPHAN_EXIT_CODE = 2
# A worker that lost contact with the others exits with this code and leaves the report to the launcher,
# which knows which process failed first: the job then ends with one line, not one per process.
PEER_LOST_EXIT = 4


def mark_launcher() -> None:
    """Record this process as the launcher of the workers it is about to start."""
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())


def guard_worker() -> None:
    """In a worker started by a laperm launcher: exit when that launcher is gone (no-op elsewhere)."""
    value = os.environ.get(LAUNCHER_PID_ENV)
    if value and value.isdigit():
        die_with_parent(int(value))


def die_with_parent(pid: int, poll_s: float = _POLL_S) -> None:
    """Make this process exit promptly once its parent, process ``pid``, has ended (even by SIGKILL).

    Call it first thing in a worker, with the launcher's pid passed down by the
    launcher (not ``os.getppid()`` read here: if the launcher died before this call,
    the parent is already init and the death would go unnoticed).  A parent that is
    already gone makes this process exit at once.
    """
    _set_parent_death_signal(signal.SIGKILL)  # before the check below, so no death falls in between
    if os.getppid() != pid:
        _exit_orphaned(pid)
    watchdog = threading.Thread(target=_watch_parent, args=(pid, poll_s), name="laperm-parent-watchdog", daemon=True)
    watchdog.start()


def parent_death_preexec(pid: int) -> Callable[[], None]:
    """A ``subprocess.Popen(preexec_fn=...)`` that makes the child die with process ``pid`` (its launcher).

    It runs between fork and exec, so it only asks the kernel for the parent-death signal (which
    survives exec) and exits at once if the launcher is already gone; libc is loaded here, in the
    parent, so that nothing is imported or loaded in the child.  Linux only; elsewhere a no-op.
    """
    prctl = _libc_prctl()

    def guard() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != pid:
            os._exit(_ORPHAN_EXIT_CODE)

    return guard


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _set_parent_death_signal(sig: int) -> bool:
    """Ask the Linux kernel to send ``sig`` to this process when its parent thread ends; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no usable libc (e.g. a static or exotic build): the watchdog remains
        return False


def _watch_parent(pid: int, poll_s: float) -> None:
    # A process whose parent ends is re-parented (to init or a subreaper), so its ppid changes;
    # unlike probing ``pid`` with a signal, this cannot be fooled by a new process reusing the pid.
    while os.getppid() == pid:
        time.sleep(poll_s)
    _exit_orphaned(pid)


def _exit_orphaned(pid: int) -> None:
    """End this process at once: no cleanup, no checkpoint (the run folder keeps its last complete one)."""
    rank = os.environ.get("RANK")
    who = f" [rank {rank}]" if rank not in (None, "0") else ""
    message = f"laperm: error:{who} the launcher (pid {pid}) is gone; stopping this worker\n"
    try:
        os.write(2, message.encode())
    except OSError:  # stderr may have gone with the launcher
        pass
    os._exit(_ORPHAN_EXIT_CODE)


def resume_process_count(run_dir: Path, saved: int, requested: int | None) -> int:
    """The number of processes to resume ``run_dir`` with: the one it ran with (``saved``).

    A different ``requested`` count is refused: a distributed checkpoint holds one
    random stream per process and the data is sharded by process, so the run
    cannot continue exactly with another count (there is no resharding).
    """
    if requested is not None and requested != saved:
        from .config import ConfigError

        raise ConfigError(
            f"{run_dir} ran with {saved} process{'es' if saved > 1 else ''}, so it resumes with "
            f"{saved}, not --nproc {requested} (its checkpoints hold one random stream and data "
            "shard per process); leave out --nproc, or start a new run"
        )
    return saved


def quiet_launcher_logs() -> None:
    """Silence torchrun's own log lines in the launcher (``LAPERM_DEBUG=1`` keeps them): laperm reports failures."""
    if os.environ.get("LAPERM_DEBUG"):
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def failure_line(exitcodes: dict[int, int], run_dir: Path | None) -> str:
    """One line on a failed distributed job: which rank failed first and how, and how to continue.

    ``exitcodes`` maps each failed rank to its exit code (negative: killed by that
    signal).  Ranks that only lost contact with a failed peer (:data:`PEER_LOST_EXIT`)
    or were stopped by the launcher afterwards (SIGTERM) are consequences, not causes.
    """
    consequences = {PEER_LOST_EXIT, -int(signal.SIGTERM)}
    causes = {r: c for r, c in sorted(exitcodes.items()) if c not in consequences}
    if causes:
        by_code: dict[int, list[int]] = {}
        for r, c in causes.items():
            by_code.setdefault(c, []).append(r)
        what = ", ".join(f"{_ranks(rs)} {_how_it_ended(c)}" for c, rs in by_code.items())
        line = f"distributed training failed: {what}"
        if len(causes) < len(exitcodes):
            line += "; the other processes were stopped"
    else:
        line = (
            "distributed training failed: the processes lost contact with each other "
            f"({_ranks(sorted(exitcodes))}; a network failure or a timeout)"
        )
    if run_dir is not None and any((run_dir / "checkpoints").glob("ckpt-*.pt")):
        line += f". The run folder keeps its last checkpoint; continue with: laperm train --resume {run_dir}"
    return line


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} (see the messages above)"
