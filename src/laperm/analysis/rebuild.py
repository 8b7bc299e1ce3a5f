"""Rebuild a trained network from its initial values ("locations hold the information").

``rebuild_state`` places, row by row, the *initial* values of every permutable
layer at the ranks of the trained weights: exactly one LaPerm sync applied to a
net trained by any optimizer.  Two controls tell what the ranks are worth:

* ``random_permutation_state``: the initial values shuffled randomly within each
  row (right values, random locations);
* ``rebuild_state`` with the values of a *fresh* random init (trained ranks,
  other values of the same distribution).

Pure functions on ``state_dict``-like mappings; nothing here trains or loads files.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..init import NORM_TYPES, PRUNABLE_TYPES
from ..reconnect import RowLayout, from_rows_, rebuild_by_rank, to_rows

__all__ = ["permutable_layouts", "rebuild_state", "random_permutation_state"]


def permutable_layouts(model: nn.Module, permute_biases: bool = False) -> dict[str, RowLayout]:
    """``{parameter name: RowLayout}`` of the tensors LaPerm would permute in ``model``.

    Chosen by module type as the optimizer does: Linear/Conv kernels by output
    unit (ConvTranspose with units on dim 1), embedding tables by entry, biases as one row each only when
    ``permute_biases``; normalisation layers never.
    """
    out: dict[str, RowLayout] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, (*NORM_TYPES, nn.LayerNorm)):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.dim() >= 2 and isinstance(module, nn.Embedding):
                out[name] = RowLayout()  # one row per token's (or position's) vector
            elif p.dim() >= 2 and isinstance(module, PRUNABLE_TYPES):
                transposed = bool(getattr(module, "transposed", False))
                out[name] = RowLayout("row", transposed, module.groups if transposed else 1)
            elif p.dim() == 1 and permute_biases:
                out[name] = RowLayout()
    return out


def rebuild_state(
    trained: Mapping[str, Tensor], values: Mapping[str, Tensor], layouts: Mapping[str, RowLayout]
) -> dict[str, Tensor]:
    """A copy of ``trained`` whose tensors in ``layouts`` hold ``values``' entries at the trained ranks."""
    out = {k: v.detach().clone() for k, v in trained.items()}
    for name, layout in layouts.items():
        out[name] = rebuild_by_rank(trained[name].detach().cpu(), values[name].detach().cpu(), layout).to(
            trained[name].device
        )
    return out


def random_permutation_state(
    trained: Mapping[str, Tensor],
    values: Mapping[str, Tensor],
    layouts: Mapping[str, RowLayout],
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """A copy of ``trained`` whose tensors in ``layouts`` hold ``values`` shuffled within each row."""
    out = {k: v.detach().clone() for k, v in trained.items()}
    for name, layout in layouts.items():
        rows = to_rows(values[name].detach().cpu(), layout)
        # argsort of uniform noise: an independent random permutation per row
        perm = torch.rand(rows.shape, generator=generator).argsort(dim=1)
        shuffled = torch.gather(rows, 1, perm)
        t = values[name].detach().cpu().clone()
        out[name] = from_rows_(t, shuffled.contiguous(), layout).to(trained[name].device)
    return out
