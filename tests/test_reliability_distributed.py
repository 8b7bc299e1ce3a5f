"""A distributed run dies with its launcher, stops cleanly when a worker dies, and resumes exactly.

Real processes throughout: ``python -m laperm train --nproc 2`` is started in a
session of its own, so that the test can SIGKILL its whole process group as an
out-of-memory killer or a scheduler's hard stop would.  torchrun starts each
worker in yet another session, so only :func:`laperm.launch.die_with_parent`
can take the workers down with the launcher.  Processes are found by a marker
in their environment (``/proc/PID/environ``), so the test sees every process of
the job, whoever its parent is now.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from laperm import checkpoint, launch, rundir

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")

LAUNCH_PY = Path(launch.__file__)
MARKER_ENV = "LAPERM_TEST_JOB_MARKER"
# 3 epochs x 14 steps, a step checkpoint every 4 steps, a sync every 5.
CMD = [
    "train",
    "--model",
    "lenet300",
    "--dataset",
    "synthetic",
    "--val-size",
    "64",
    "--batch-size",
    "32",
    "--k",
    "5",
    "--epochs",
    "3",
    "--checkpoint-steps",
    "4",
    "--no-progress",
    "--nproc",
    "2",
]


# -- finding the job's processes ------------------------------------------------------------


def _alive_with_marker(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment holds ``MARKER_ENV=marker``."""
    wanted = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if wanted in (d / "environ").read_bytes().split(b"\0") and _state(d) != "Z":
                pids.append(int(d.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _state(proc_dir: Path) -> str:
    return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_until_gone(marker: str, within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := _alive_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def marker():
    """A fresh marker; whatever still carries it at the end is killed (no leftovers, even on failure)."""
    value = uuid.uuid4().hex
    yield value
    for pid in _alive_with_marker(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _env(marker: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPERM_TEST_FAULT")}
    env.pop(launch.LAUNCHER_PID_ENV, None)
    return {**env, "OMP_NUM_THREADS": "1", MARKER_ENV: marker, **extra}


def _laperm(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "laperm", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


# -- die_with_parent on its own (no torch: a parent and a child of a few lines) --------------

CHILD = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("launch", sys.argv[1])
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    if sys.argv[3] == "watchdog-only":
        launch._set_parent_death_signal = lambda sig: False
    launch.die_with_parent(int(sys.argv[2]), poll_s=0.1)
    print(os.getpid(), flush=True)
    time.sleep(60)
""")
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    # Like torchrun: the child in a session of its own, so killing this group does not reach it.
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], str(os.getpid()), sys.argv[3]],
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("how", ["prctl", "watchdog-only"])
def test_a_child_dies_with_its_sigkilled_parent(how, marker):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(LAUNCH_PY), how],
        env=_env(marker),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = int(parent.stdout.readline())
    assert sorted(_alive_with_marker(marker)) == sorted([parent.pid, child])
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    assert _wait_until_gone(marker, within_s=5) == []


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    # The launcher died before the worker got to call die_with_parent: its parent is no longer the launcher.
    gone = subprocess.Popen(["true"])
    gone.wait()
    not_parent = gone.pid  # a launcher that has already ended
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(LAUNCH_PY), str(not_parent), "prctl"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert res.stdout == ""  # it never got past die_with_parent
    assert res.stderr == f"laperm: error: the launcher (pid {not_parent}) is gone; stopping this worker\n"


def test_failure_line_names_the_rank_that_failed_first(tmp_path):
    line = launch.failure_line({0: -int(signal.SIGTERM), 1: -int(signal.SIGKILL)}, tmp_path)
    assert line == "distributed training failed: rank 1 was killed by SIGKILL; the other processes were stopped"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-000000008.pt").touch()
    line = launch.failure_line({0: launch.PEER_LOST_EXIT, 1: 2, 2: 2}, tmp_path)
    assert line.startswith("distributed training failed: ranks 1, 2 exited with code 2 (see the messages above);")
    assert line.endswith(f"continue with: laperm train --resume {tmp_path}")
    line = launch.failure_line({0: 3, 1: 3}, None)  # e.g. both stopped by a signal, each with its own message
    assert line == "distributed training failed: ranks 0, 1 exited with code 3 (see the messages above)"
    line = launch.failure_line({0: launch.PEER_LOST_EXIT, 1: launch.PEER_LOST_EXIT}, None)
    assert "lost contact with each other (ranks 0, 1;" in line


# -- the real job ---------------------------------------------------------------------------


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("final.pt", "best.pt"):
        wa, wb = checkpoint.load(a / name)["model"], checkpoint.load(b / name)["model"]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert bits_equal(wa[k], wb[k]), f"{name}: {k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same command, never interrupted."""
    out = tmp_path_factory.mktemp("ref")
    res = _laperm(*CMD, "--out", str(out), "--name", "run", env=_env("reference"))
    assert res.returncode == 0, res.stderr
    return out / "run"


def _resume_and_check(run: Path, reference: Path, marker: str) -> None:
    """``laperm train --resume RUN`` (no --nproc) finishes the run exactly as the reference, and verifies."""
    with rundir.locked(run):  # raises if a process (e.g. an orphaned worker) still holds the run folder
        pass
    res = _laperm("train", "--resume", str(run), "--no-progress", env=_env(marker))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == f"resuming {run} with 2 processes, as it ran (--nproc 2)"
    assert json.loads((run / "summary.json").read_text())["nproc"] == 2
    assert_same_weights(reference, run)
    from laperm.cli import main

    assert main(["verify", str(run)]) == 0


@pytest.mark.slow
def test_sigkill_of_the_launchers_group_leaves_no_worker_and_the_run_resumes_exactly(tmp_path, reference, marker):
    run, log = tmp_path / "run", tmp_path / "faults.log"
    # Rank 0 waits at step 10 (checkpoints at steps 4 and 8 written), rank 1 inside the next collective:
    # the kill lands mid-run, whatever the machine's load.
    env = _env(marker, LAPERM_TEST_FAULT="pause@step:10", LAPERM_TEST_FAULT_RANK="0", LAPERM_TEST_FAULT_LOG=str(log))
    job = subprocess.Popen(
        [sys.executable, "-m", "laperm", *CMD, "--out", str(tmp_path), "--name", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while "pause@step:10" not in (log.read_text() if log.exists() else ""):
            assert job.poll() is None, job.communicate()[1]
            assert time.monotonic() < deadline, "the run did not reach step 10"
            time.sleep(0.05)
        workers = [p for p in _alive_with_marker(marker) if p != job.pid]
        assert len(workers) == 2
        assert all(os.getsid(w) != job.pid for w in workers), "workers are expected in sessions of their own"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
        assert _wait_until_gone(marker, within_s=5) == []
    finally:
        job.kill()
        job.communicate()
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == [
        "ckpt-000000008.pt",
        "ckpt-000000004.pt",
    ]
    _resume_and_check(run, reference, marker)


@pytest.mark.slow
def test_a_dying_worker_stops_the_job_with_one_line_and_the_run_resumes_exactly(tmp_path, reference, marker):
    run = tmp_path / "run"
    res = _laperm(
        *CMD,
        "--out",
        str(tmp_path),
        "--name",
        "run",
        env=_env(marker, LAPERM_TEST_FAULT="kill@step:10", LAPERM_TEST_FAULT_RANK="1"),
    )
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "laperm: error: distributed training failed: rank 1 was killed by SIGKILL; the other processes were "
        f"stopped. The run folder keeps its last checkpoint; continue with: laperm train --resume {run}"
    ]
    assert _alive_with_marker(marker) == []
    _resume_and_check(run, reference, marker)


def test_resuming_with_another_process_count_is_refused(tmp_path, capsys):
    from laperm.cli import main

    run = tmp_path / "run"
    run.mkdir()
    rundir.write_config(run, {"model": "lenet300", "dataset": "synthetic", "batch_size": 32, "nproc": 2})
    assert main(["train", "--resume", str(run), "--nproc", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"laperm: error: {run} ran with 2 processes, so it resumes with 2, not --nproc 4 (its "
        "checkpoints hold one random stream and data shard per process); leave out --nproc, "
        "or start a new run"
    )
