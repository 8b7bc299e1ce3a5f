"""N models of one architecture trained as one: every parameter and buffer stacked along a new dim 0.

The members stay ordinary modules: after :meth:`StackedModel.bind`, each member's parameters and
buffers are views of its slice of the stacked tensors, so whatever works on a module (evaluation,
``state_dict``, LaPerm's sync of its rows, BatchNorm recalibration) works on a member unchanged,
in place on the stack. Training runs the N forward and backward passes as one: ``torch.func.vmap``
over ``functional_call`` (``vectorize=True``), or a loop over the members that computes exactly
what N single runs compute (``vectorize=False``: the reference the vectorised path is tested
against, and bit for bit equal to single runs on the same machine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["LossSpec", "StackedModel", "StackError"]


class StackError(ValueError):
    """Models that cannot be stacked (different architectures, or nothing to stack)."""


@dataclass(frozen=True)
class LossSpec:
    """A member's training objective, as a single run computes it (engine.trainer's eager step).

    ``l2_names``: the parameters of the coupled L2 penalty, in the order of ``l2_parameters()``."""

    l2: float = 0.0
    l2_names: tuple[str, ...] = ()
    logit_scale: float = 1.0
    sum_scale: bool = False  # loss_scale "sum": the objective times the batch size
    precision: str = "fp32"  # fast mode's "bf16": forward and cross-entropy autocast, as DeviceStep does
    foreach_l2: bool = False  # fast mode: the penalty summed as DeviceStep sums it (member loop only)


def _clone_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A member's state_dict holds copies: views would save the whole stack's storage (N times the bytes)."""
    for key, value in state_dict.items():
        if isinstance(value, Tensor):
            state_dict[key] = value.clone()


class StackedModel:
    """The stacked parameters (leaves with ``.grad``) and buffers of ``members``, and their training pass."""

    def __init__(self, members: list[nn.Module], channels_last: bool = False) -> None:
        if not members:
            raise StackError("a stack needs at least one model")
        self.members, self.channels_last = members, channels_last
        self.template = members[0]  # functional_call runs its code with each member's tensors
        shapes = _signature(self.template)
        for i, m in enumerate(members[1:], 1):
            if _signature(m) != shapes:
                raise StackError(f"member {i} is not the same architecture as member 0; only equal models stack")
        self.params: dict[str, Tensor] = {
            n: _stack([dict(m.named_parameters())[n].detach() for m in members], channels_last).requires_grad_()
            for n, _ in self.template.named_parameters()
        }
        self.buffers: dict[str, Tensor] = {
            n: torch.stack([dict(m.named_buffers())[n].detach() for m in members])
            for n, _ in self.template.named_buffers()
        }
        self.bind()

    def __len__(self) -> int:
        return len(self.members)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def bind(self) -> None:
        """Make every member's parameters and buffers views of its slice of the stack."""
        for i, m in enumerate(self.members):
            for n, p in m.named_parameters():
                p.data = self.params[n].detach()[i]
            for n in dict(m.named_buffers()):
                owner, _, leaf = n.rpartition(".")
                setattr(m.get_submodule(owner), leaf, self.buffers[n][i])
            if not getattr(m, "_laperm_stack_hook", False):
                m.register_state_dict_post_hook(_clone_state)
                m._laperm_stack_hook = True  # type: ignore[assignment]

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def stack_inputs(self, xs: list[Tensor]) -> Tensor:
        """The members' batches as one ``[N, B, ...]`` tensor. With ``channels_last`` images are laid out
        ``[B, H, W, N, C]`` in memory: vmap's grouped convolution then sees its ``[B, N*C, H, W]`` input as
        a channels_last view, as the weights (no re-layout copy before each convolution)."""
        if not self.channels_last or xs[0].dim() != 4:
            return torch.stack(xs)
        n, (b, c, h, w) = len(xs), xs[0].shape
        out = torch.empty((b, h, w, n, c), dtype=xs[0].dtype, device=xs[0].device).permute(3, 0, 4, 1, 2)
        for i, x in enumerate(xs):
            out[i].copy_(x)
        return out

    def train_pass(
        self,
        x: Tensor,
        y: Tensor,
        loss: LossSpec,
        vectorize: bool = True,
        around: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Forward and backward of every member on its batch ``x[i]``, ``y[i]``; gradients into ``.grad``.

        Returns each member's reported loss (objective before ``sum_scale``) and its logits. ``around(i)``
        (loop path only) is entered around member ``i``'s forward: e.g. its own random stream."""
        for p in self.params.values():
            p.grad = None
        if vectorize:
            losses, logits = self._vectorized(x, y, loss)
            objective = losses.sum()
        else:
            pairs = [self._member_pass(i, x[i], y[i], loss, around) for i in range(len(self))]
            losses, logits = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            objective = sum((p[0] for p in pairs), torch.zeros((), device=x.device))
        (objective * y.shape[1] if loss.sum_scale else objective).backward()
        return losses.detach(), logits.detach()

    def _vectorized(self, x: Tensor, y: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor]:
        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
            with _autocast(xb.device, spec.precision):
                logits = functional_call(self.template, (params, buffers), (xb,))
                ce = _cross_entropy(logits, yb, spec)
            return _with_l2(ce, params, spec, foreach=False), logits

        # randomness "different": each member draws its own dropout masks from the (one) global stream
        return vmap(one, randomness="different")(self.params, self.buffers, x, y)

    def _member_pass(
        self,
        i: int,
        xb: Tensor,
        yb: Tensor,
        spec: LossSpec,
        around: Callable[[int], contextlib.AbstractContextManager[Any]] | None,
    ) -> tuple[Tensor, Tensor]:
        params = {n: p[i] for n, p in self.params.items()}
        buffers = {n: b[i] for n, b in self.buffers.items()}
        with around(i) if around is not None else contextlib.nullcontext(), _autocast(xb.device, spec.precision):
            logits = functional_call(self.template, (params, buffers), (xb,))
            ce = _cross_entropy(logits, yb, spec)
        return _with_l2(ce, params, spec, foreach=spec.foreach_l2), logits

    @contextlib.contextmanager
    def frozen_rows(self, members: list[int]) -> Iterator[None]:
        """The stacked tensors of ``members`` restored on exit (members that stopped keep their values)."""
        if not members:
            yield
            return
        idx = torch.tensor(members, device=next(iter(self.params.values())).device)
        saved = {n: p.detach()[idx].clone() for n, p in self.params.items()}
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p[idx] = saved[n]


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    # (no weight-cast cache: it would not survive a CUDA graph's replay; as DeviceStep)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)


def _cross_entropy(logits: Tensor, yb: Tensor, spec: LossSpec) -> Tensor:
    scaled = logits if spec.logit_scale == 1.0 else logits * spec.logit_scale
    return F.cross_entropy(scaled, yb)


def _with_l2(loss: Tensor, params: dict[str, Tensor], spec: LossSpec, foreach: bool) -> Tensor:
    """The loss plus the L2 penalty, in the single run's order of operations (``foreach``: fast mode's sum;
    vmap's path sums tensor by tensor, ``_foreach_norm`` having no batching rule)."""
    if not spec.l2_names:
        return loss
    if foreach:
        return loss + spec.l2 * torch.stack(torch._foreach_norm([params[n] for n in spec.l2_names])).square().sum()
    return loss + spec.l2 * sum(params[n].pow(2).sum() for n in spec.l2_names)


def _stack(tensors: list[Tensor], channels_last: bool) -> Tensor:
    """``torch.stack(tensors)``; with ``channels_last`` a 4-D weight's slices are channels_last (and so is
    the [N*out, in, kh, kw] view vmap's grouped convolution takes of it)."""
    if not channels_last or tensors[0].dim() != 4:
        return torch.stack(tensors)
    n, (o, i, kh, kw) = len(tensors), tensors[0].shape
    out = torch.empty((n, o, kh, kw, i), dtype=tensors[0].dtype, device=tensors[0].device).permute(0, 1, 4, 2, 3)
    return out.copy_(torch.stack(tensors))


def _signature(m: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    tensors = [*m.named_parameters(), *m.named_buffers()]
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors]
