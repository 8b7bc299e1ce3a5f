"""The stacked step: every member's forward and backward and one inner step over the stacked tensors.

:class:`StackStep` is the stack's counterpart of :class:`~laperm.fast.step.DeviceStep` and runs on
its machinery (:class:`~laperm.fast.step.GraphedStep`): in eager mode, and in fast mode on CPU, it
computes the step eagerly; in fast mode on CUDA (inner Adam fused and capturable, vectorised
members) the stacked forward, loss, backward, each member's loss and accuracy totals and the one
inner step are captured in one CUDA graph after a few warm-up steps and replayed, with
DeviceStep's fail-safe: a failed capture goes on eagerly. What each member does after the step --
LaPerm's host-side step count and its sync -- stays outside the graph (engine.stacked's Member).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..fast.graph import GraphFactory
from ..fast.step import GraphedStep
from ..models.stacked import LossSpec, StackedModel

__all__ = ["StackStep"]

Around = Callable[[int], contextlib.AbstractContextManager[Any]]


class StackStep(GraphedStep):
    """``step(x, y)`` on the members' batches ``x[i]``, ``y[i]``: gradients, inner step, totals on the device.

    ``totals``: each member's running loss sum (float64) and correct count (int64), shape ``[N]``, added
    to in place (a member's Trainer totals are views of them). ``around(i)`` (member loop only) is
    entered around member ``i``'s forward: its own random stream, which a graph cannot swap (so the
    member loop never captures)."""

    def __init__(
        self,
        model: StackedModel,
        opt: torch.optim.Optimizer,
        loss: LossSpec,
        totals: tuple[Tensor, Tensor],
        *,
        vectorize: bool,
        around: Around | None = None,
        graph: bool = False,
        graph_factory: GraphFactory | None = None,
        warmup_steps: int = 3,
    ) -> None:
        self.model, self.opt, self.inner, self.loss = model, opt, opt, loss
        self.device = model.device
        self.vectorize, self.around = vectorize, around
        self.loss_sum, self.correct = totals
        self.name = f"a stack of {len(model)} {type(model.template).__name__}"
        if graph and not vectorize:
            raise ValueError("the member loop swaps random streams between members: it cannot be captured")
        if graph and graph_factory is None and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the stack is on {self.device}; pass graph=False")
        self._setup_graph(graph, warmup_steps, graph_factory)

    def _forward_backward(self, x: Tensor, y: Tensor) -> None:
        losses, logits = self.model.train_pass(x, y, self.loss, self.vectorize, around=self.around)
        self.loss_sum += losses.double() * y.shape[1]
        self.correct += (logits.argmax(-1) == y).sum(-1)

    def _eager(self, x: Tensor, y: Tensor) -> None:
        self._forward_backward(x, y)
        self.opt.step()

    def _captured_body(self) -> None:
        self._forward_backward(*self._static)
        self.opt.step()
