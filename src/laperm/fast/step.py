"""A training step that stays on the device: no host synchronisation between LaPerm syncs.

:class:`DeviceStep` runs what ``laperm train``'s loop body runs -- forward, cross-entropy (with the
optional logit scale and coupled L2 term), backward, the inner optimizer's step, LaPerm's step
counting and sync -- and accumulates the loss and accuracy on the device, to be read with
:meth:`DeviceStep.read_metrics` every N steps (one host sync per read).

On CUDA (``graph=None`` picks it there) forward, backward and the inner optimizer's step are
captured once in a CUDA graph (``torch.cuda.graph``, static input buffers) and replayed each step:
one launch instead of hundreds, which is what limits small networks at batch 50.  LaPerm's part
stays in Python, outside the graph: it counts steps on the host (no device read) and, every k
steps, runs the sync (every row of every tensor at once, :func:`laperm.flat_sync.sync_flat_`) and its
finite check (one reduction over all synced tensors, read once).  The sync writes the parameters
in place, so the graph stays valid.  On CPU the same component runs eagerly, computing exactly
what the plain loop computes (tests check identical weights).

Options: ``precision="bf16"`` (autocast of forward and loss; parameters, gradients and optimizer
state stay float32), ``channels_last`` (convnets), cuDNN autotuning on CUDA.  For the graph the
inner Adam must be ``capturable`` (see :func:`make_adam`: fused and capturable on CUDA, torch's
default on CPU).

Rules for a caller (the engine): build the optimizer *after* :func:`prepare_model`; call
:meth:`DeviceStep.reset_graph` after anything replaces optimizer state tensors
(``load_state_dict``); learning-rate changes through the param groups are picked up before each
replay.  The ``latent`` sync rule runs eagerly (its step swaps tensors outside the inner step).

A failed capture falls back to eager steps (see :class:`DeviceStep`); what may run inside the
captured region is checked on any device by :mod:`laperm.fast.capture_check`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import LaPerm
from ..optim_steps import LAPERM_GROUP_KEYS
from .graph import (
    CudaStepGraph,
    DeviceFault,
    GraphFactory,
    StepGraph,
    capture_untrusted,
    distrust_capture,
    rng_state,
    set_rng_state,
)

__all__ = [
    "PRECISIONS",
    "GraphedStep",
    "DeviceStep",
    "CaptureFailedWarning",
    "make_adam",
    "prepare_model",
    "l2_penalty",
]


class CaptureFailedWarning(RuntimeWarning):
    """The step's CUDA graph could not be captured; the run goes on eagerly (see :class:`DeviceStep`)."""


PRECISIONS = ("fp32", "bf16")


def make_adam(
    params: Any, *, lr: float, eps: float, device: torch.device | str, weight_decay_free: str = "adam"
) -> torch.optim.Optimizer:
    """The inner Adam (or AdamW) for the fast step: fused and capturable on CUDA, torch's default elsewhere."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(weight_decay_free)
    if cls is None:
        raise ValueError(f"make_adam builds 'adam' or 'adamw', got {weight_decay_free!r}")
    if torch.device(device).type == "cuda":
        return cls(params, lr=lr, eps=eps, fused=True, capturable=True)
    return cls(params, lr=lr, eps=eps)


def prepare_model(model: nn.Module, channels_last: bool) -> nn.Module:
    """Put a convnet's 4-D weights in channels_last memory format (in place: the parameters stay the same objects)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def l2_penalty(params: Sequence[Tensor]) -> Tensor:
    """``sum(p**2)`` over ``params`` with a fixed number of kernels (``_foreach_norm``), not one per tensor."""
    return torch.stack(torch._foreach_norm(list(params))).square().sum()


class GraphedStep:
    """A step replayed from a graph once warmed up, with the fail-safe eager fallback: the machinery of
    :class:`DeviceStep`, for any step body (a stacked model's: :mod:`laperm.engine.stack_step`).

    A subclass sets ``opt`` (zeroed before the capture), ``inner`` (its param groups' lr become tensors
    the graph reads) and ``name`` (the warning's), calls :meth:`_setup_graph`, and gives :meth:`_eager`
    (one whole step), :meth:`_captured_body` (what the graph records, on ``self._static``) and
    optionally :meth:`_after_replay` (host-side work after each replay).

    What the graph reads from the param groups: each group's lr from a device tensor refreshed before
    every replay; every other value of the groups that the inner step reads (betas, eps, weight decay,
    ...: frozen into the graph as numbers at the capture) is compared before every replay with what
    the capture saw, and a change recaptures (LaPerm's own keys, e.g. ``k``, are read on the host).
    """

    device: torch.device
    opt: torch.optim.Optimizer
    inner: torch.optim.Optimizer
    name: str

    def _setup_graph(self, use_graph: bool, warmup_steps: int, graph_factory: GraphFactory | None) -> None:
        self.use_graph, self.warmup_steps = use_graph, warmup_steps
        if self.use_graph and graph_factory is None:
            _check_capturable(self.inner)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
        self.images = 0  # counted on the host: the batch sizes are known there
        self.steps = 0
        self.recaptures = 0  # captures after the first one (a hyperparameter changed)
        self._factory: GraphFactory = graph_factory or CudaStepGraph
        self._pending: StepGraph | None = None  # made for the warm-up, captured into at the first replay
        self._graph: StepGraph | None = None  # captured
        self.capture_error: str | None = None  # set when this process may not capture: the steps are eager
        self._static: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))
        self._lrs: list[Tensor] = []
        self._frozen: list[dict[str, Any]] = []  # the groups' values the graph holds as numbers

    def _eager(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def _captured_body(self) -> None:
        raise NotImplementedError

    @property
    def captured(self) -> bool:
        """Whether the steps now replay a captured CUDA graph (False: eager, before or after a failed capture)."""
        return self._graph is not None

    # -- the step ---------------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor) -> None:
        """One training step on the batch ``(x, y)`` (already on the device)."""
        if not self.use_graph or self.capture_error is not None:
            self._eager(x, y)  # no graph, or this process may not capture: the run goes on eagerly
        elif self.steps < self.warmup_steps or (self._graph is not None and x.shape != self._static[0].shape):
            self._warmup_graph().warmup(lambda: self._eager(x, y))  # warm-up, and a batch of another size
        else:
            self._replay(x, y)
        self.images += y.shape[-1]  # (a stack's y is [members, batch])
        self.steps += 1

    def _warmup_graph(self) -> StepGraph:
        if self._pending is None:
            self._pending = self._factory(self.device)
        return self._pending

    def _replay(self, x: Tensor, y: Tensor) -> None:
        if self._graph is not None and _group_values(self.inner) != self._frozen:
            self._graph, self.recaptures = None, self.recaptures + 1  # a value frozen in the graph changed
        if self._graph is None:
            if not self._capture_and_replay(x, y):
                self._eager(x, y)  # the capture failed: this step, and the rest of the run, eagerly
                return
        else:
            self._copy_in(x, y)
            self._refresh_lr()
            self._guarded_replay(self._graph, "a replay of the captured step")
        self._after_replay()

    def _after_replay(self) -> None:
        """What follows a replay outside the graph (DeviceStep: LaPerm's count and sync)."""

    def _copy_in(self, x: Tensor, y: Tensor) -> None:
        static_x, static_y = self._static
        static_x.copy_(x)
        static_y.copy_(y)

    def _capture_and_replay(self, x: Tensor, y: Tensor) -> bool:
        """Capture the step and replay it once.  A failed capture (which records and changes nothing) is
        undone and warned about once, and no capture is tried again in this process: returns False (the
        caller computes the step eagerly).  A failed replay, or a device left unusable, raises DeviceFault."""
        untrusted = capture_untrusted()
        if untrusted is not None:  # an earlier capture in this process failed (another step's, maybe)
            self._refuse(f"not captured: a capture failed earlier in this process ({untrusted})")
            return False
        rng = rng_state(self.device)  # a failed capture may have advanced the generator
        lrs = [g["lr"] for g in self.inner.param_groups]
        graph = self._factory(self.device) if self._pending is None else self._pending
        try:
            self._capture(graph, x, y)
        except Exception as error:  # (any: a capture can fail in many ways; the run must not)
            self._fall_back(graph, error, rng, lrs)
            return False
        self._copy_in(x, y)
        self._refresh_lr()
        self._guarded_replay(graph, "the first replay of the captured step")
        self._graph, self._pending = graph, None
        return True

    def _capture(self, graph: StepGraph, x: Tensor, y: Tensor) -> None:
        """Record forward, backward and the inner step once (recording runs nothing: the caller replays)."""
        # The static input keeps the warm-up batches' exact strides, so the capture meets the very
        # convolution configurations the warm-up tuned (a 1-channel image is "contiguous" in both
        # layouts: re-laying it out would show cuDNN a configuration it first sees inside the capture).
        self._static = (x.clone(), y.clone())  # clone keeps the strides of a dense tensor
        self._lrs = [
            torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device) for g in self.inner.param_groups
        ]
        self._refresh_lr()
        self._frozen = _group_values(self.inner)
        self.opt.zero_grad(set_to_none=True)  # backward in the graph then allocates the gradients in its pool
        graph.capture(self._captured_body)

    def _guarded_replay(self, graph: StepGraph, what: str) -> None:
        """Replay; a failure may have run part of the step (on CUDA it is typically sticky): DeviceFault."""
        try:
            graph.replay()
        except Exception as error:
            distrust_capture(_describe(error))
            raise DeviceFault(
                f"{self.name}: {what} failed, so this process's weights and device cannot be trusted; "
                f"resume the run from its last checkpoint (a fresh process). The error: {_describe(error)}"
            ) from error

    def _fall_back(self, graph: StepGraph, error: Exception, rng: Tensor, lrs: list[Any]) -> None:
        """Undo a failed capture (random state, learning rates, gradients from the graph's pool), make sure
        the device still works (else DeviceFault), never capture again in this process, and warn once."""
        described = _describe(error)
        distrust_capture(described)
        try:
            graph.check_health()
        except Exception as broken:
            raise DeviceFault(
                f"{self.name}: the CUDA graph capture of the training step failed and left the device "
                f"unusable in this process ({_describe(broken)}); resume the run from its last checkpoint "
                f"(a fresh process). The capture's error: {described}"
            ) from error
        set_rng_state(self.device, rng)
        for group, lr in zip(self.inner.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self._static, self._lrs, self._pending, self._frozen = (torch.empty(0), torch.empty(0)), [], None, []
        self._refuse(described)

    def _refuse(self, error: str) -> None:
        """Go on eagerly from here, and say so once."""
        self.capture_error = error
        warnings.warn(
            f"{self.name}: the CUDA graph capture of the training step failed, so this run goes on with "
            f"eager steps (the same computation, slower); this process will not capture again (a resumed "
            f"run, in a fresh process, does). The error: {error}",
            CaptureFailedWarning,
            stacklevel=6,  # the caller of the step
        )

    def _refresh_lr(self) -> None:
        """Point every group at its captured lr tensor, holding the group's current value (a scheduler may
        have assigned a float): the graph reads the learning rate from there."""
        for group, lr in zip(self.inner.param_groups, self._lrs, strict=True):
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def reset_graph(self) -> None:
        """Forget the captured graph (recaptured at the next step): after optimizer state is replaced.
        A process whose capture failed stays eager (it never captures again)."""
        self._graph = self._pending = None
        self._static = (torch.empty(0), torch.empty(0))
        self._lrs, self._frozen = [], []


def _describe(error: BaseException) -> str:
    """The error in full, with the one it was raised while handling (e.g. capture_end's, after an op's)."""
    out = f"{type(error).__name__}: {error}"
    if error.__context__ is not None:
        out += f" (while handling {type(error.__context__).__name__}: {error.__context__})"
    return out


def _group_values(inner: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """What a captured inner step holds of each param group, other than its lr (a tensor the graph reads):
    every value as it is, a tensor by identity (the graph reads the one it saw at the capture)."""
    return [
        {
            key: ("tensor", id(value)) if isinstance(value, Tensor) else value
            for key, value in group.items()
            if key not in _NOT_IN_GRAPH
        }
        for group in inner.param_groups
    ]


_NOT_IN_GRAPH = frozenset({"params", "param_names", "lr", *LAPERM_GROUP_KEYS})


class DeviceStep(GraphedStep):
    """One training step with no host sync, eager or replayed from a CUDA graph; metrics kept on the device.

    Args:
        model, optimizer: the model (on its device) and its optimizer (a :class:`~laperm.optim.LaPerm`
            or a plain one, e.g. the Adam baseline).
        l2, l2_params: coupled L2 term ``l2 * sum(p**2)`` added to the loss.
        loss_scale: ``"mean"`` or ``"sum"`` (the gradient of the batch *sum*, as ``laperm train``).
        logit_scale: softmax temperature of the loss (1: none).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        channels_last: convert the model (do it before building the optimizer, or pass it already converted).
        graph: capture a CUDA graph (default: on CUDA); ``warmup_steps`` eager steps come first.
        graph_factory: makes the :class:`~laperm.fast.graph.StepGraph` (default: a CUDA graph); a test or
            the capture-safety checker passes a stand-in (then ``graph=True`` works on any device).

    A capture that fails (an exception while recording, or at the first replay) does not end the run:
    that step and the following ones are computed eagerly, the device's random state is put back as it
    was before the attempt, one :class:`CaptureFailedWarning` names the model and the full error, and
    :meth:`reset_graph` (called when optimizer state is replaced; a resumed run starts afresh) retries.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        l2: float = 0.0,
        l2_params: Sequence[Tensor] = (),
        loss_scale: str = "mean",
        logit_scale: float = 1.0,
        precision: str = "fp32",
        channels_last: bool = False,
        graph: bool | None = None,
        warmup_steps: int = 3,
        graph_factory: GraphFactory | None = None,
    ) -> None:
        self.device = next(model.parameters()).device
        _check_options(self.device, loss_scale, precision, graph and graph_factory is None, warmup_steps)
        self.model, self.opt = prepare_model(model, channels_last), optimizer
        self.laperm = optimizer if isinstance(optimizer, LaPerm) else None
        self.inner = self.laperm.base_optimizer if self.laperm is not None else optimizer
        self.l2, self.l2_params = float(l2), list(l2_params) if l2 else []
        self.loss_scale, self.logit_scale, self.precision = loss_scale, float(logit_scale), precision
        self.channels_last = channels_last
        self.name = type(model).__name__
        latent = any(g.get("sync_rule") == "latent" for g in optimizer.param_groups)
        self._setup_graph(
            (self.device.type == "cuda" if graph is None else graph) and not latent, warmup_steps, graph_factory
        )
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)

    def _forward_backward(self, x: Tensor, y: Tensor) -> None:
        """Forward, loss, backward and metric accumulation: the loop body of ``laperm train`` up to the step."""
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False
        ):  # (no weight-cast cache: it would not survive graph replay)
            logits = self.model(x)
            scaled = logits if self.logit_scale == 1.0 else logits * self.logit_scale
            loss = F.cross_entropy(scaled, y)
        if self.l2_params:
            loss = loss + self.l2 * l2_penalty(self.l2_params)
        (loss * len(y) if self.loss_scale == "sum" else loss).backward()
        self.loss_sum += loss.detach().double() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()

    def _eager(self, x: Tensor, y: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._forward_backward(x, y)
        self.opt.step()

    def _captured_body(self) -> None:
        """What the graph records: forward, loss, backward and the inner step on the static buffers."""
        self._forward_backward(*self._static)
        self.inner.step()

    def _after_replay(self) -> None:
        if self.laperm is not None:
            self.laperm.after_inner_step()  # LaPerm's own work: host-side step count, a sync when one is due

    # -- metrics ---------------------------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, float]:
        """Mean loss and accuracy over the images since the last read (one host sync), then reset."""
        loss_sum, correct = torch.stack([self.loss_sum, self.correct.double()]).tolist()
        n = max(self.images, 1)
        out = {"loss": loss_sum / n, "accuracy": correct / n, "images": float(self.images)}
        self.loss_sum.zero_()
        self.correct.zero_()
        self.images = 0
        return out


def _check_options(device: torch.device, loss_scale: str, precision: str, graph: bool | None, warmup: int) -> None:
    if loss_scale not in ("mean", "sum"):
        raise ValueError(f"loss_scale must be 'mean' or 'sum', got {loss_scale!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if graph and device.type != "cuda":
        raise ValueError(
            f"CUDA graphs need a model on a CUDA device, this one is on {device}; pass graph=False "
            "(or a graph_factory: a stand-in graph)"
        )
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup_steps must be an integer >= 1 (eager steps before the capture), got {warmup!r}")


def _check_capturable(inner: torch.optim.Optimizer) -> None:
    if not all(g.get("capturable", False) for g in inner.param_groups):
        raise ValueError(
            f"a CUDA graph needs a capturable inner optimizer; build it with capturable=True "
            f"(laperm.fast.make_adam does), not this {type(inner).__name__}, or pass graph=False"
        )
