"""A failed CUDA-graph capture never leaves a run broken (issues 21, 29): shown on CPU with stand-in graphs
that behave as CUDA does.

The stand-ins are :class:`laperm.fast.graph.StepGraph` objects injected through ``graph_factory``
(DeviceStep) or ``laperm.engine.fast.GRAPH_FACTORY`` (``laperm train --mode fast``).  What they model:

* a capture records and runs nothing, so a failed one changed no weight: the run goes on eagerly (a
  failing stand-in draws from the default generator first, as a real capture advances the CUDA
  generator's offset: the step must put the random state back, so that the eager fallback computes
  exactly what a plain eager step computes);
* after a failed capture the process is not trusted to capture again (``CUDAGraph::capture_end`` can
  leave the allocator believing a capture is under way): no later capture in it, by any step;
* a capture can leave the device unusable (:class:`BreaksDevice`: ``empty_cache()`` asserts), and an
  error at replay ("an illegal memory access") is sticky on CUDA and may follow a partly run step:
  both end the run at its last checkpoint with the resume command, never "recovered".

The CUDA cases (``-m cuda``) run the real thing in a fresh process: a host sync inside the captured
region.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch import nn

from laperm import checkpoint, rundir
from laperm.engine import fast as engine_fast
from laperm.fast import graph
from laperm.fast.graph import DeviceFault
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

    def check_health(self) -> None:
        """(The device still works: the capture's cleanup left it usable.)"""


class BreaksDevice(FailingCapture):
    """A failed capture that leaves the allocator believing a capture is under way, as capture_end can."""

    def check_health(self) -> None:
        raise RuntimeError("INTERNAL ASSERT FAILED at CUDACachingAllocator.cpp: captures_underway.empty()")


class FailingReplay(FailingCapture):
    """Captures (records nothing, like a real capture runs nothing), then fails at the first replay with
    CUDA's sticky error: the step may have partly run, and the device is gone for this process."""

    def capture(self, fn: Callable[[], None]) -> None:
        type(self).captures += 1

    def replay(self) -> None:
        torch.rand(16)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class EagerGraph(FailingCapture):
    """A working stand-in: the capture keeps the function, a replay runs it, with what a CUDA graph fixes
    at its capture when given the inner optimizer ``opt``: the gradients are written afresh (the captured
    backward allocated them in the graph's pool: it does not accumulate), and every number the param
    groups held at the capture is what the replay computes with (a tensor, such as the lr tensor the
    step makes, is read live).  Without ``opt`` (a stack's step assigns its gradients) it just runs."""

    def __init__(self, device: torch.device, opt: torch.optim.Optimizer | None = None) -> None:
        super().__init__(device)
        self.opt = opt

    def capture(self, fn: Callable[[], None]) -> None:
        type(self).captures += 1
        self.fn = fn
        groups = self.opt.param_groups if self.opt is not None else []
        self.frozen = [{k: v for k, v in g.items() if k != "params" and not torch.is_tensor(v)} for g in groups]

    def replay(self) -> None:
        if self.opt is None:
            self.fn()
            return
        live = [dict(g) for g in self.opt.param_groups]
        self.opt.zero_grad(set_to_none=True)
        try:
            for group, frozen in zip(self.opt.param_groups, self.frozen, strict=True):
                group.update(frozen)
            self.fn()
        finally:
            for group, values in zip(self.opt.param_groups, live, strict=True):
                group.update(values)


class FailingInsideCapture(FailingCapture):
    """An op fails inside the capture, then ending the capture fails too (what torch.cuda.graph's exit does)."""

    def capture(self, fn: Callable[[], None]) -> None:
        type(self).captures += 1
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        finally:
            raise RuntimeError(CUDA_ERROR)  # noqa: B012  (the chained error is the point)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(12, 16), nn.Dropout(0.3), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _run(factory, steps: int = 7, changes=None) -> tuple[DeviceStep, dict[str, torch.Tensor]]:
    """``steps`` steps of a small LaPerm run (2 eager warm-up steps, then the capture); ``changes``:
    ``{step: change(param_groups)}``, applied before that step (0-based)."""
    torch.manual_seed(0)
    model = _Net()
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3)
    if factory is EagerGraph:
        factory = functools.partial(EagerGraph, opt=opt.base_optimizer)
    step = DeviceStep(model, opt, graph=factory is not None, warmup_steps=2, graph_factory=factory)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(5)  # dropout's stream
    for i in range(steps):
        if changes and i in changes:
            changes[i](opt.param_groups)
        step(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g))
    return step, {k: v.clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stand_in", [FailingCapture, FailingInsideCapture])
def test_a_failed_capture_falls_back_to_exactly_the_eager_step(stand_in):
    stand_in.captures = 0
    _, eager = _run(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, fell_back = _run(stand_in)
    assert _same(eager, fell_back)  # same machine, same computation: exact (random state restored)
    assert stand_in.captures == 1  # not retried at every step
    assert graph.capture_untrusted() is not None  # this process will not capture again
    failed = [w for w in caught if issubclass(w.category, CaptureFailedWarning)]
    assert len(failed) == 1
    message = str(failed[0].message)
    assert message.startswith("_Net:") and "CUDA error" in message
    assert "cudaErrorStreamCaptureInvalidated" in message  # the full error, not its first line
    assert step.capture_error is not None and step.read_metrics()["images"] == 7 * 8


def test_the_learning_rates_go_back_to_what_the_groups_held():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFailedWarning)
        step, _ = _run(FailingCapture, steps=3)
    assert all(isinstance(g["lr"], float) and g["lr"] == 1e-2 for g in step.inner.param_groups)


def test_a_process_whose_capture_failed_never_captures_again():
    EagerGraph.captures = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFailedWarning)
        step, _ = _run(FailingCapture, steps=4)
    step._factory = EagerGraph  # (an attempt would now succeed: it must not be made)
    step.reset_graph()  # (what the engine calls when optimizer state is replaced)
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    step(x, y)
    step(x, y)
    assert EagerGraph.captures == 0 and not step.captured
    _, eager = _run(None)
    with warnings.catch_warnings(record=True) as caught:  # another step in the same process: eager too
        warnings.simplefilter("always")
        other, same = _run(EagerGraph)
    assert EagerGraph.captures == 0 and not other.captured and _same(eager, same)
    (refused,) = [w for w in caught if issubclass(w.category, CaptureFailedWarning)]
    assert "a capture failed earlier in this process" in str(refused.message) and CUDA_ERROR in str(refused.message)


def test_a_fresh_process_captures_and_replays():
    EagerGraph.captures = 0
    _, eager = _run(None)
    step, replayed = _run(EagerGraph)
    assert EagerGraph.captures == 1 and step.captured and step.capture_error is None
    assert _max_diff(eager, replayed) < 1e-6  # (a tensor lr rounds differently: see the next test)


def _set(key: str, value):
    def change(groups):
        for group in groups:
            group[key] = value

    return change


HYPERPARAMETERS = {  # each value read by the captured inner step, and LaPerm's own k (read on the host)
    "lr": (_set("lr", 3e-2), False),
    "betas": (_set("betas", (0.5, 0.9)), True),
    "eps": (_set("eps", 1e-1), True),
    "weight_decay": (_set("weight_decay", 0.5), True),
    "k": (_set("k", 2), False),
}


@pytest.mark.parametrize("name", HYPERPARAMETERS)
def test_the_graph_sees_every_hyperparameter_change(name):
    """Changed after the capture, each value reaches the replayed step: the result is the eager run's with
    the same change (the lr through its refreshed tensor, LaPerm's k on the host; any other number frozen
    in the graph by a recapture).  Within 1e-6: torch's Adam rounds differently with a tensor lr (float32)
    than with a float one (a few 1e-8 here); each change moves the weights by far more than that."""
    change, recaptured = HYPERPARAMETERS[name]
    EagerGraph.captures = 0
    _, unchanged = _run(None, steps=9)
    _, eager = _run(None, steps=9, changes={4: change})
    step, graphed = _run(EagerGraph, steps=9, changes={4: change})
    assert _max_diff(unchanged, eager) > 1e-4  # the change matters
    assert _max_diff(eager, graphed) < 1e-6
    assert step.captured and step.recaptures == int(recaptured) and EagerGraph.captures == 1 + recaptured


@pytest.mark.parametrize("stand_in", [FailingReplay, BreaksDevice])
def test_a_sticky_error_or_a_broken_device_ends_the_step_never_recovered(stand_in):
    with pytest.raises(DeviceFault) as raised:
        _run(stand_in)
    message = str(raised.value)
    assert message.startswith("_Net:") and "resume the run from its last checkpoint" in message
    if stand_in is FailingReplay:
        assert "an illegal memory access was encountered" in message
    else:
        assert "captures_underway" in message and "cudaErrorStreamCaptureInvalidated" in message
    assert graph.capture_untrusted() is not None


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
    graph._untrusted.clear()  # (the resumed run is a fresh process)
    resumed = _train(capsys, "--resume", str(tmp_path / "run"))
    assert len(resumed) == 1  # the resumed process tried the capture again, once
    assert _same(_final(ref_dir), _final(tmp_path / "run"))  # the eager fallback computed the same run
    assert rundir.read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["epoch"] == 2
    assert run_cli(capsys, "verify", str(tmp_path / "run"))[0] == 0


def test_the_warning_keeps_the_error_that_invalidated_the_capture():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, _ = _run(FailingInsideCapture, steps=3)
    (failed,) = [w for w in caught if issubclass(w.category, CaptureFailedWarning)]
    assert "operation not permitted when stream is capturing" in str(failed.message)
    assert "cudaErrorStreamCaptureInvalidated" in str(failed.message)


# -- the real thing, on CUDA: a host sync inside the captured region ---------------------------------------

REAL_FAILURE = r"""
import json, warnings, torch
from torch import nn
from laperm.fast.step import CaptureFailedWarning, DeviceStep, make_adam
from laperm.fast import graph
from laperm.optim import LaPerm

class SyncsWhileCapturing(nn.Module):  # the test hook: a host sync, only inside the captured region
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(12, 16), nn.Dropout(0.3), nn.Linear(16, 4)
    def forward(self, x):
        if torch.cuda.is_current_stream_capturing():
            float(x.sum())  # .item(): illegal while capturing, invalidates the capture
        return self.fc2(self.drop(torch.relu(self.fc1(x))))

def run(use_graph):
    torch.manual_seed(0)
    model = SyncsWhileCapturing().cuda()
    opt = LaPerm(make_adam(model.parameters(), lr=1e-2, eps=1e-8, device="cuda"), k=3)
    step = DeviceStep(model, opt, graph=use_graph, warmup_steps=2)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(5)
    for _ in range(9):
        step(torch.randn(8, 12, generator=g).cuda(), torch.randint(0, 4, (8,), generator=g).cuda())
    return step, [p.detach().cpu() for p in model.parameters()]

_, eager = run(False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step, fell_back = run(True)
torch.cuda.synchronize()
torch.cuda.empty_cache()
fresh = torch.ones(1 << 20, device="cuda")
drawn = torch.rand(1000, device="cuda")
print(json.dumps({
    "warnings": [str(w.message) for w in caught if issubclass(w.category, CaptureFailedWarning)],
    "captured": step.captured, "untrusted": graph.capture_untrusted() is not None,
    "max_diff": max(float((a - b).abs().max()) for a, b in zip(eager, fell_back)),
    "fresh": float(fresh.sum()), "rand_ok": bool(((drawn >= 0) & (drawn < 1)).all()) and float(drawn.std()) > 0.1,
}))
"""


@pytest.mark.cuda
def test_a_real_failed_capture_on_cuda_finishes_matches_eager_and_leaves_the_device_working():
    """A fresh process (as a real failure leaves it, nothing else may run in it): eager run first, then the
    same run whose capture meets a host sync; the run finishes eagerly, one warning, weights within 1e-6
    of eager (the same kernels on the same device; the warm-up ran on a side stream), and afterwards
    ``empty_cache()``, a fresh allocation and the random generator work."""
    import json
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", REAL_FAILURE], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1 and "SyncsWhileCapturing" in out["warnings"][0], out
    assert out["captured"] is False and out["untrusted"] is True
    assert out["max_diff"] <= 1e-6, out
    assert out["fresh"] == float(1 << 20) and out["rand_ok"]


class FailsAtTheFifthReplay(EagerGraph):
    """Replays (a stand-in without the optimizer: it just runs the step), then meets CUDA's sticky error."""

    def replay(self) -> None:
        self.replays = getattr(self, "replays", 0) + 1
        if self.replays == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        super().replay()


@pytest.mark.slow
def test_a_sticky_error_ends_the_run_at_its_checkpoint_with_the_resume_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine_fast, "GRAPH_FACTORY", FailsAtTheFifthReplay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, _, err = run_cli(capsys, "train", *BASE, "--out", str(tmp_path), "--name", "run")
    run = tmp_path / "run"
    assert rc == 3, err  # step 8 fails (3 warm-up steps, the capture's replay at step 4, then 4 more)
    assert "an illegal memory access" in err and f"laperm train --resume {run}" in err and "is kept" in err
    assert not (run / "final.pt").exists() and "recovered" not in err
    monkeypatch.setattr(engine_fast, "GRAPH_FACTORY", None)
    graph._untrusted.clear()  # (the resumed run is a fresh process)
    assert run_cli(capsys, "train", "--resume", str(run))[0] == 0
    assert rundir.read_metrics(run / "metrics.jsonl")[-1]["epoch"] == 2
    assert run_cli(capsys, "verify", str(run))[0] == 0
