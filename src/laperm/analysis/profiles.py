"""Weight profiles: each unit's incoming weights, sorted (the paper's Fig. 1 observation).

LaPerm never changes a profile: it only moves values within a row.  The paper
observes that nets trained by ordinary optimizers also keep nearly coinciding
profiles within a layer.  Two numbers per layer summarise this:

* ``spread``: the share of the sorted weights' variance that is *not* the
  layer's mean profile, ``||S - mean_row(S)||² / ||S - mean(S)||²`` with ``S``
  the ``units × fan_in`` matrix of sorted rows.  0 when every unit has the same
  profile (e.g. all rows are permutations of one another); 1 when profiles
  share nothing beyond a constant.
* ``drift``: how far the profiles moved from the initial ones,
  ``||S_trained - S_init|| / ||S_init||`` (0 for any LaPerm-trained layer).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..reconnect import RowLayout, sorted_rows

__all__ = ["profile_matrix", "profile_spread", "profile_drift", "layer_profiles", "profile_quantiles"]


def profile_matrix(t: Tensor, layout: RowLayout = RowLayout()) -> Tensor:
    """``units × fan_in`` float64 matrix of every unit's weights sorted ascending."""
    return sorted_rows(t.detach().cpu().double(), layout)


def profile_spread(t: Tensor, layout: RowLayout = RowLayout()) -> float:
    """Fraction of the sorted weights' variance not explained by the layer's mean profile."""
    s = profile_matrix(t, layout)
    total = (s - s.mean()).pow(2).sum()
    if total == 0:
        return 0.0
    return float((s - s.mean(dim=0, keepdim=True)).pow(2).sum() / total)


def profile_drift(trained: Tensor, init: Tensor, layout: RowLayout = RowLayout()) -> float:
    """Relative distance between the trained and the initial profiles of a layer."""
    a, b = profile_matrix(trained, layout), profile_matrix(init, layout)
    norm = b.norm()
    return float((a - b).norm() / norm) if norm > 0 else float((a - b).norm())


def profile_quantiles(
    t: Tensor, layout: RowLayout = RowLayout(), units: int = 8, points: int = 64
) -> list[list[float]]:
    """Up to ``units`` evenly chosen profiles, each resampled at ``points`` quantiles (for plots)."""
    s = profile_matrix(t, layout)
    rows = torch.linspace(0, s.shape[0] - 1, min(units, s.shape[0])).round().long()
    cols = torch.linspace(0, s.shape[1] - 1, min(points, s.shape[1])).round().long()
    return s[rows][:, cols].tolist()


def layer_profiles(
    trained: Mapping[str, Tensor], init: Mapping[str, Tensor], layouts: Mapping[str, RowLayout]
) -> dict[str, dict]:
    """Per layer: spread (trained and init), drift from init, and sample profiles for a figure."""
    out = {}
    for name, layout in layouts.items():
        out[name] = {
            "units": int(profile_matrix(init[name], layout).shape[0]),
            "spread_trained": profile_spread(trained[name], layout),
            "spread_init": profile_spread(init[name], layout),
            "drift": profile_drift(trained[name], init[name], layout),
            "profiles_trained": profile_quantiles(trained[name], layout),
            "profiles_init": profile_quantiles(init[name], layout),
        }
    return out
