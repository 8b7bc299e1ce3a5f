"""A LaPerm sync rule that keeps the inner weights ("latent" sync), for the F2 research runs.

Published LaPerm *overwrites* the inner weights with their synced permutation
every k steps, so between syncs the inner optimizer trains a different, freely
signed network, and all it hands to the synced net is a ranking.  With the
latent rule the inner weights are never overwritten: the forward and backward
passes always use the synced weights (the permutation of θ0 at the ranks of
the inner weights, refreshed every k steps), and the inner optimizer applies
those gradients to the inner weights (a straight-through estimator).  The
trained net is still, at every step, a row-wise permutation of θ0.

``attach_latent(opt)`` changes a :class:`laperm.optim.LaPerm` instance in place
(no engine change); it is not saved in checkpoints, so a latent run cannot be
resumed exactly.
"""

from __future__ import annotations

import types
from typing import Any

import torch

__all__ = ["attach_latent"]


def attach_latent(opt: Any) -> Any:
    """Make ``opt`` (a LaPerm optimizer whose weights are synced) keep its inner weights across syncs."""
    params = [p for _, p in opt.permuted_parameters()]
    latent = {p: p.detach().clone() for p in params}
    base = opt.base_optimizer
    base_step = base.step
    original_step = opt.step

    def inner_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = base_step(*args, **kwargs)
        with torch.no_grad():
            for p in params:  # the updated inner weights, captured before LaPerm may sync them
                latent[p].copy_(p)
        return out

    @torch.no_grad()
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        forward = {p: p.detach().clone() for p in params}  # the synced weights the gradient was taken at
        for p in params:
            p.copy_(latent[p])
        out = original_step(*args, **kwargs)
        if not self.is_synced:  # no sync due: keep using the last synced weights
            for p in params:
                p.copy_(forward[p])
        return out

    base.step = types.MethodType(inner_step, base)
    opt.step = types.MethodType(step, opt)
    opt.latent_weights = latent
    return opt
