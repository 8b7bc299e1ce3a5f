"""Guards a run keeps while it trains: stop signals, the sync invariant, numerical checks, fault points."""

from __future__ import annotations

import signal
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import checkpoint, reconnect
from ..optim import LaPerm
from .errors import InvariantError

__all__ = ["StopFlag", "Deadline", "row_fingerprint", "SyncChecker", "first_nonfinite", "inject_fault"]


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps.

    The first signal only sets the flag (the step in flight finishes and a
    checkpoint is saved); it also restores the previous handlers, so a second
    Ctrl-C or SIGTERM stops the process at once (files stay consistent: every
    write is atomic).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        self._restore()

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a signal to another rank"


clock = time.time  # the wall clock deadlines are read on (a test replaces it)


class Deadline:
    """``stop_at`` (a Unix time) as a stop condition, checked between steps.

    The run must still write its checkpoint before the deadline, and must not begin work it
    cannot finish by then (an epoch end: evaluation and checkpoint; the run's end). The margin
    is a fixed safety plus, per such piece of work ahead, the longest one measured so far.
    """

    SAFETY_S = 2.0

    def __init__(self, stop_at: float | None) -> None:
        self.stop_at = stop_at
        self.slowest = 0.0  # seconds: the longest checkpoint or epoch end of this process

    def record(self, seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)

    def reached(self, ahead: int = 0) -> bool:
        """True when stopping now is the last safe moment; ``ahead``: epoch/run ends before the next check."""
        if self.stop_at is None:
            return False
        return clock() + self.SAFETY_S + self.slowest * (1 + ahead) >= self.stop_at


def row_fingerprint(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of its values' bit patterns read as integers (int64).

    Integer addition does not depend on the order of the elements, so a
    permuted row keeps its fingerprint exactly, while changing any value
    (even by one ulp, or 0.0 to -0.0) changes it unless another change
    cancels it exactly.  One O(n) pass, cheaper than the sync it checks.
    """
    bits = reconnect.float_bits(rows)
    if bits.device.type == "cpu":
        # numpy accumulates the narrow integers in int64 without a widened copy (several times faster)
        return torch.from_numpy(np.add.reduce(bits.numpy(), axis=1, dtype=np.int64))
    return bits.sum(1, dtype=torch.int64)


class SyncChecker:
    """The cheap invariant, checked right after every sync: each permuted row holds its θ0 values.

    Registered as a LaPerm sync hook, so it sees every scheduled sync and the
    final one.  (The full check, sorting every row against init.pt, runs at
    the end of training.)  ``step`` is set by the engine, for the message.
    """

    def __init__(self, opt: LaPerm) -> None:
        self.step = 0
        self.expected = {p: row_fingerprint(opt.initial_sorted(p)) for _, p in opt.permuted_parameters()}
        opt.register_sync_hook(self)

    def __call__(self, opt: LaPerm, params: list[torch.Tensor]) -> None:
        for p in params:
            got = row_fingerprint(reconnect.to_rows(p.detach(), opt.layout_of(p)))
            if not torch.equal(got, self.expected[p]):
                row = int((got != self.expected[p]).nonzero()[0, 0])
                raise InvariantError(
                    f"after the sync at step {self.step}, row {row} of {opt.name_of(p)} is no longer a permutation "
                    "of its initial values (LaPerm's invariant is broken); the run is stopped and its "
                    "checkpoints are left as they were"
                )


def first_nonfinite(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> str | None:
    """Name of the first model or optimizer-state tensor holding NaN/inf, else None (one pass, O(n))."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"weight {name}"
    inner = getattr(opt, "base_optimizer", opt)
    for st in inner.state.values() if inner is not None else ():
        for key, t in st.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"optimizer state {key!r}"
    if isinstance(opt, LaPerm):
        for p, z in opt.latent_weights().items():
            if not bool(torch.isfinite(z).all()):
                return f"latent weights of {opt.name_of(p)}"
    return None


def inject_fault(point: str, model: nn.Module) -> None:
    """Test hook (``LAPERM_FAULT``): at ``point``, a fault may kill the process or put a NaN in the model."""
    if checkpoint.fault_point(point):  # True: inject a NaN
        next(model.parameters()).data.view(-1)[0] = float("nan")
