"""How :class:`~laperm.fast.step.DeviceStep` records and replays its step: a CUDA graph, or a stand-in.

A :data:`GraphFactory` makes one :class:`StepGraph` per capture attempt.  The default,
:class:`CudaStepGraph`, runs warm-up steps on a side stream, captures the step with
``torch.cuda.graph`` and replays it.  A test, or the capture-safety checker
(:mod:`laperm.fast.capture_check`), injects another: e.g. a stand-in whose capture raises, to show
on CPU that a failed capture leaves a run able to go on (``tests/test_capture_failsafe.py``).

The contract of :meth:`StepGraph.capture`: on failure it raises *after* putting the process back as
it was before the capture (no stream left capturing, the caller's stream current again, the
device's default generator out of capture mode).  :class:`DeviceStep` then restores the random
state it saved before the attempt and computes the step eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

__all__ = ["StepGraph", "GraphFactory", "CudaStepGraph", "rng_state", "set_rng_state"]


class StepGraph(Protocol):
    """Records one step function once and replays it."""

    def warmup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` eagerly before the capture (on CUDA: on a side stream, as capture requires)."""

    def capture(self, fn: Callable[[], None]) -> None:
        """Record ``fn`` (on CUDA it does not run); on failure, clean up and raise."""

    def replay(self) -> None:
        """Run what :meth:`capture` recorded."""


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
