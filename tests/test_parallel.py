"""The launcher of parallel runs: concurrency limit, exit codes in order, logs, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from laperm.experiments import parallel


def _cmd(tmp_path, i: int, code: int = 0, sleep: float = 0.3) -> list[str]:
    script = (
        f"import time, pathlib; p = pathlib.Path({str(tmp_path)!r}); "
        f"(p / 'start{i}').write_text(str(time.time())); print('run {i}'); time.sleep({sleep}); "
        f"(p / 'end{i}').write_text(str(time.time())); raise SystemExit({code})"
    )
    return [sys.executable, "-c", script]


def _intervals(tmp_path, n: int) -> list[tuple[float, float]]:
    return [(float((tmp_path / f"start{i}").read_text()), float((tmp_path / f"end{i}").read_text())) for i in range(n)]


def test_runs_at_most_n_at_once_and_returns_codes_in_order(tmp_path):
    cmds = [_cmd(tmp_path, i, code=3 if i == 1 else 0) for i in range(5)]
    codes = parallel.run_parallel(cmds, 2, log_dir=tmp_path / "logs")
    assert codes == [0, 3, 0, 0, 0]
    spans = _intervals(tmp_path, 5)
    for t in sorted(s for s, _ in spans):  # at any start, at most 2 runs are alive
        assert sum(s <= t < e for s, e in spans) <= 2
    assert max(s for s, _ in spans) < max(e for _, e in spans)  # overlapping, not one after another
    assert (tmp_path / "logs" / "run-4.log").read_text().strip() == "run 4"


def test_runs_overlap_when_parallel(tmp_path):
    start = time.perf_counter()
    parallel.run_parallel([_cmd(tmp_path, i, sleep=1.0) for i in range(3)], 3)
    spans = _intervals(tmp_path, 3)
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all three alive at once
    assert time.perf_counter() - start < 2.9


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has already exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_children_die_with_a_killed_launcher(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]
    code = f"from laperm.experiments import parallel; parallel.run_parallel([{child!r}], 1)"
    launcher = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        launcher.kill()  # SIGKILL: no cleanup code of the launcher runs
        launcher.wait()
        deadline = time.monotonic() + 5
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the child outlived its SIGKILLed launcher"
    finally:
        launcher.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_bad_parallel_is_refused():
    with pytest.raises(ValueError, match="parallel must be an integer >= 1"):
        parallel.run_parallel([["true"]], 0)
