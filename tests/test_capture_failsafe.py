"""A failed CUDA-graph capture does not end a run (issue 21): shown on CPU with stand-in graphs.

The stand-ins are :class:`laperm.fast.graph.StepGraph` objects injected through ``graph_factory``
(DeviceStep) or ``laperm.engine.fast.GRAPH_FACTORY`` (``laperm train --mode fast``).  A failing one
draws from the device's default generator before raising, as a real capture advances the CUDA
generator's offset before it fails: the step must put the random state back, so that the eager
fallback computes exactly what a plain eager step computes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch import nn

from laperm import checkpoint, rundir
from laperm.engine import fast as engine_fast
from laperm.fast.step import CaptureFailedWarning, DeviceStep
from laperm.optim import LaPerm

pytestmark = pytest.mark.usefixtures("clean_engine_state")

CUDA_ERROR = (
    "CUDA error: operation failed due to a previous error during capture\n"
    "Search for `cudaErrorStreamCaptureInvalidated' in https://docs.nvidia.com/cuda/ for more information."
)


class FailingCapture:
    """A stand-in whose capture advances the random state, then raises like a CUDA capture."""

    captures = 0

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def warmup(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> None:
        type(self).captures += 1
        torch.rand(16)  # the device's default generator moves on, as a capture's dropout would move it
        raise torch.AcceleratorError(CUDA_ERROR) if hasattr(torch, "AcceleratorError") else RuntimeError(CUDA_ERROR)

    def replay(self) -> None:
        raise AssertionError("never replayed: the capture failed")


class FailingReplay(FailingCapture):
    """Captures (records nothing, like a real capture runs nothing), then fails at the first replay."""

    def capture(self, fn: Callable[[], None]) -> None:
        type(self).captures += 1

    def replay(self) -> None:
        torch.rand(16)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class EagerGraph(FailingCapture):
    """A working stand-in: the capture keeps the function, a replay runs it."""

    def capture(self, fn: Callable[[], None]) -> None:
        type(self).captures += 1
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(12, 16), nn.Dropout(0.3), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _run(factory, steps: int = 7) -> tuple[DeviceStep, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _Net()
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3)
    step = DeviceStep(model, opt, graph=factory is not None, warmup_steps=2, graph_factory=factory)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(5)  # dropout's stream
    for _ in range(steps):
        step(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g))
    return step, {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stand_in", [FailingCapture, FailingReplay])
def test_a_failed_capture_falls_back_to_exactly_the_eager_step(stand_in):
    stand_in.captures = 0
    _, eager = _run(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, fell_back = _run(stand_in)
    assert _same(eager, fell_back)  # same machine, same computation: exact (random state restored)
    assert stand_in.captures == 1  # not retried at every step
    failed = [w for w in caught if issubclass(w.category, CaptureFailedWarning)]
    assert len(failed) == 1
    message = str(failed[0].message)
    assert message.startswith("_Net:") and "CUDA error" in message
    if stand_in is FailingCapture:
        assert "cudaErrorStreamCaptureInvalidated" in message  # the full error, not its first line
    assert step.capture_error is not None and step.read_metrics()["images"] == 7 * 8


def test_the_learning_rates_go_back_to_what_the_groups_held():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFailedWarning)
        step, _ = _run(FailingCapture, steps=3)
    assert all(isinstance(g["lr"], float) and g["lr"] == 1e-2 for g in step.inner.param_groups)


def test_reset_graph_retries_the_capture():
    EagerGraph.captures = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFailedWarning)
        step, _ = _run(FailingCapture, steps=4)
    step._factory = EagerGraph  # (the next attempt succeeds)
    step.reset_graph()
    assert step.capture_error is None
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    before = [p.detach().clone() for p in step.model.parameters()]
    step(x, y)
    step(x, y)
    assert EagerGraph.captures == 1 and step._graph is not None  # captured once, then replayed
    assert any(not torch.equal(a, p) for a, p in zip(before, step.model.parameters(), strict=True))


# -- laperm train --mode fast with a failing capture --------------------------------------------------------

BASE = ["--model", "f2", "--dataset", "synthetic", "--val-size", "64", "--epochs", "2", "--k", "5"]
BASE += ["--batch-size", "32", "--checkpoint-steps", "4", "--threads", "1", "--no-progress", "--mode", "fast"]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "final.pt")["model"]


def _train(capsys, *argv: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = run_cli(capsys, "train", *argv)
    assert rc in (0, 3), err
    return [w for w in caught if issubclass(w.category, CaptureFailedWarning)]


@pytest.mark.slow
def test_a_fast_run_whose_capture_fails_completes_resumes_and_verifies(tmp_path, capsys, monkeypatch):
    ref_dir = tmp_path / "ref"
    assert _train(capsys, *BASE, "--out", str(tmp_path), "--name", "ref") == []  # CPU: eager, no graph
    monkeypatch.setattr(engine_fast, "GRAPH_FACTORY", FailingCapture)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "int@step:17")  # interrupted in epoch 2
    failed = _train(capsys, *BASE, "--out", str(tmp_path), "--name", "run")
    assert len(failed) == 1 and str(failed[0].message).startswith("F2:")
    assert not (tmp_path / "run" / "final.pt").exists()
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    resumed = _train(capsys, "--resume", str(tmp_path / "run"))
    assert len(resumed) == 1  # the resumed process tried the capture again, once
    assert _same(_final(ref_dir), _final(tmp_path / "run"))  # the eager fallback computed the same run
    assert rundir.read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["epoch"] == 2
    assert run_cli(capsys, "verify", str(tmp_path / "run"))[0] == 0


class FailingInsideCapture(FailingCapture):
    """An op fails inside the capture, then ending the capture fails too (what torch.cuda.graph's exit does)."""

    def capture(self, fn: Callable[[], None]) -> None:
        type(self).captures += 1
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        finally:
            raise RuntimeError(CUDA_ERROR)  # noqa: B012  (the chained error is the point)


def test_the_warning_keeps_the_error_that_invalidated_the_capture():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, _ = _run(FailingInsideCapture, steps=3)
    (failed,) = [w for w in caught if issubclass(w.category, CaptureFailedWarning)]
    assert "operation not permitted when stream is capturing" in str(failed.message)
    assert "cudaErrorStreamCaptureInvalidated" in str(failed.message)
