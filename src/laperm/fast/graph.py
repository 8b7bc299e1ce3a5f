"""How :class:`~laperm.fast.step.DeviceStep` records and replays its step: a CUDA graph, or a stand-in.

A :data:`GraphFactory` makes one :class:`StepGraph` per capture attempt.  The default,
:class:`CudaStepGraph`, runs warm-up steps on a side stream, captures the step with
``torch.cuda.graph`` and replays it.  A test, or the capture-safety checker
(:mod:`laperm.fast.capture_check`), injects another: e.g. a stand-in whose capture raises, to show
on CPU that a failed capture leaves a run able to go on (``tests/test_capture_failsafe.py``).

The contract of :meth:`StepGraph.capture`: on failure it raises *after* putting the process back as
far as it can (no stream left capturing, the caller's stream current again, the device's default
generator out of capture mode).  How far that is cannot be relied on: ``CUDAGraph::capture_end``
raises before it ends the allocator's allocation to the graph's pool, and PyTorch says it cannot
recover gracefully from such states.  So a process whose capture failed is never trusted to capture
again (:func:`capture_untrusted`: every later step in it is eager; a resumed run, a fresh process,
captures again), and :meth:`StepGraph.check_health` then decides whether it can go on at all: on CUDA
a synchronisation, ``empty_cache()`` (which asserts while the allocator believes a capture is under
way), a fresh allocation and a random draw.  If any fails, :class:`DeviceFault` ends the run (the
engine keeps its last checkpoint and prints the resume command); so does any failed *replay*, which
may have run part of the step (and, on CUDA, is typically a sticky error such as an illegal address).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

__all__ = [
    "StepGraph",
    "GraphFactory",
    "CudaStepGraph",
    "DeviceFault",
    "capture_untrusted",
    "distrust_capture",
    "rng_state",
    "set_rng_state",
]


class DeviceFault(RuntimeError):
    """The device cannot be trusted to go on in this process (a failed replay, or a failed capture that left
    it unusable): the run ends at its last checkpoint, and a resumed run (a fresh process) continues it."""


_untrusted: list[str] = []  # the first failed capture's error, once one failed in this process


def capture_untrusted() -> str | None:
    """The error of the capture that failed in this process (None: none failed; capturing is allowed)."""
    return _untrusted[0] if _untrusted else None


def distrust_capture(error: str) -> None:
    """Record that a capture failed here: this process never captures again (see the module docstring)."""
    if not _untrusted:
        _untrusted.append(error)


class StepGraph(Protocol):
    """Records one step function once and replays it."""

    def warmup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` eagerly before the capture (on CUDA: on a side stream, as capture requires)."""

    def capture(self, fn: Callable[[], None]) -> None:
        """Record ``fn`` (on CUDA it does not run); on failure, clean up and raise."""

    def replay(self) -> None:
        """Run what :meth:`capture` recorded."""

    def check_health(self) -> None:
        """After a failure: raise unless the device still synchronises, frees its cache, allocates and draws
        random numbers in this process."""


GraphFactory = Callable[[torch.device], StepGraph]


class CudaStepGraph:
    """:class:`StepGraph` over ``torch.cuda.CUDAGraph``, with the cleanup a failed capture needs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._graph: torch.cuda.CUDAGraph | None = None

    def warmup(self, fn: Callable[[], None]) -> None:
        # Capture needs the warm-up (autograd's and cuDNN's first-call work) off the capturing stream.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> None:
        caller = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)  # our own: a failed capture must not leave a shared one capturing
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                fn()
        except BaseException:
            self._recover(graph, stream, caller)
            raise
        self._graph = graph

    def replay(self) -> None:
        assert self._graph is not None, "replay() before a successful capture()"
        self._graph.replay()

    def check_health(self) -> None:
        torch.cuda.synchronize(self.device)  # a sticky error (an illegal address, ...) raises here
        torch.cuda.empty_cache()  # asserts while the allocator still believes a capture is under way
        probe = torch.ones(1 << 20, device=self.device)  # a fresh allocation, outside any graph pool
        drawn = torch.rand(4, device=self.device)  # the default generator, out of capture mode
        if float(probe.sum()) != float(1 << 20) or not bool(((drawn >= 0) & (drawn < 1)).all()):
            raise RuntimeError("a fresh allocation or a random draw on the device computed a wrong value")
        torch.cuda.synchronize(self.device)

    def _recover(self, graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, caller: torch.cuda.Stream) -> None:
        """Leave no trace of a failed capture.  ``torch.cuda.graph``'s exit raises from ``capture_end``
        before it restores the caller's stream, and before the default generator leaves capture mode
        (its next random op then fails: "Offset increment outside graph capture encountered
        unexpectedly"); an exception before ``cudaStreamEndCapture`` would leave the stream capturing
        (in the global capture mode every later synchronising call then fails)."""
        torch.cuda.set_stream(stream)
        with contextlib.suppress(Exception):
            if torch.cuda.is_current_stream_capturing():
                graph.capture_end()  # ends the (invalidated) capture; its error is the one already raised
        with contextlib.suppress(Exception):  # capture_end raised before it ended allocation to the pool
            torch._C._cuda_endAllocateToPool(_index(self.device), graph.pool())
            torch._C._cuda_releasePool(_index(self.device), graph.pool())
        torch.cuda.set_stream(caller)
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(self.device)
        generator = torch.cuda.default_generators[_index(self.device)]
        with contextlib.suppress(Exception):
            saved = generator.get_state()
            # A fresh generator state is not in capture mode; the seed and offset are put back next
            # (DeviceStep then restores the state it saved before the attempt).
            generator.graphsafe_set_state(torch.Generator(device=self.device))
            generator.set_state(saved)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of ``device``'s default generator (what dropout draws from)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
