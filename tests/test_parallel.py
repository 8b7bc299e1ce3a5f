"""The launcher of parallel runs: concurrency limit, exit codes in order, logs, clean stop."""

from __future__ import annotations

import sys
import time

import pytest

from laperm.experiments import parallel


def _cmd(tmp_path, i: int, code: int = 0, sleep: float = 0.3) -> list[str]:
    script = (f"import time, pathlib; p = pathlib.Path({str(tmp_path)!r}); "
              f"(p / 'start{i}').write_text(str(time.time())); print('run {i}'); time.sleep({sleep}); "
              f"(p / 'end{i}').write_text(str(time.time())); raise SystemExit({code})")
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


def test_parent_death_guard_is_used_when_available(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(parallel.distributed, "die_with_parent", lambda pid: seen.append(pid), raising=False)
    guard = parallel._child_guard(1234)
    assert guard is not None
    guard()
    assert seen == [1234]


def test_bad_parallel_is_refused():
    with pytest.raises(ValueError, match="parallel must be an integer >= 1"):
        parallel.run_parallel([["true"]], 0)
