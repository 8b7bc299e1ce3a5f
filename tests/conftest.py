import contextlib
import os
import signal
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``laperm argv`` in-process; returns (exit code, stdout, stderr)."""
    from laperm.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (``pytest -m cuda``: scripts/gpu_check.sh) are skipped where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked cuda: scripts/gpu_check.sh runs these on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def clean_engine_state(monkeypatch):
    """No fault injection from the environment, and torch's thread count restored after the test
    (the engine sets it from --threads)."""
    from laperm import checkpoint

    n = torch.get_num_threads()
    monkeypatch.delenv(checkpoint.FAULT_ENV, raising=False)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_fault_counts():
    """Each test counts fault points from zero: two tests with the same LAPERM_TEST_FAULT spec in one
    process would otherwise share the count, and the second one's fault would never fire."""
    from laperm import checkpoint

    checkpoint.reset_fault_counts()


@pytest.fixture(autouse=True)
def _fresh_capture_trust():
    """Each test starts as a fresh process does: no CUDA-graph capture has failed in it (a failed one,
    real or a stand-in's, makes ``laperm.fast.graph`` refuse every later capture in the process)."""
    from laperm.fast import graph

    graph._untrusted.clear()
    yield
    graph._untrusted.clear()


class TimeLimitExceeded(BaseException):
    """Raised by :func:`time_limit`: a BaseException, so the CLI's ``except Exception`` cannot turn it into an
    exit code (a command that runs too long fails the test instead of passing as an error)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeLimitExceeded` in the main thread if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeLimitExceeded(f"still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
