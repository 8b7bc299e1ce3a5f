"""The layout of ``LaPerm.state_dict()`` and the migration of older files.

Format 2 (laperm >= 0.2) is the layout every torch optimizer uses, so that
``torch.distributed.checkpoint``, ``accelerate`` and Lightning handle it::

    {"state": {index: {...the inner optimizer's state..., "laperm_sorted": Tensor,
                       ["laperm_sorted_counts": Tensor,] ["laperm_latent": Tensor]}},
     "param_groups": [{...inner hyperparameters..., "k", "permute", "granularity", "sync_rule",
                       "laperm_step", "laperm_synced", "laperm_format": 2, "params": [index, ...]}],
     "laperm_format": 2}

The version marker sits in every param group as well as at the top, because
``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``.
Format 1 is laperm 0.1.0's ``{"base": inner state_dict, "sorted": {index: rows},
"synced": bool, ["latent": {index: Tensor}]}``; :func:`upgrade` converts it.
"""

from __future__ import annotations

from typing import Any

from .initial_values import SortedRows

__all__ = ["FORMAT", "LATENT", "LAPERM_PREFIX", "upgrade"]

FORMAT = 2
LATENT = "laperm_latent"
LAPERM_PREFIX = "laperm_"  # per-parameter keys with this prefix are LaPerm's, the rest the inner optimizer's


class FormatError(ValueError):
    """Not a LaPerm optimizer state_dict of a known format."""


def upgrade(state_dict: Any) -> dict[str, Any]:
    """``state_dict`` in format 2 with positional int indices, from format 2 (any index keys) or 0.1.0's."""
    if isinstance(state_dict, dict) and {"base", "sorted"} <= state_dict.keys():
        return _from_010(state_dict)
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise FormatError(
            "not a LaPerm state_dict (expected keys 'state' and 'param_groups', or laperm 0.1.0's "
            "'base' and 'sorted'); was it saved from another optimizer?"
        )
    groups = state_dict["param_groups"]
    if not any(isinstance(g, dict) and "laperm_step" in g for g in groups):
        raise FormatError(
            "not a LaPerm state_dict (its param groups have no LaPerm step counts); "
            "was it saved from the inner optimizer instead?"
        )
    versions = {g.get("laperm_format") for g in groups} | {state_dict.get("laperm_format")}
    newer = [v for v in versions if isinstance(v, int) and v > FORMAT]
    if newer:
        raise FormatError(
            f"this state_dict is LaPerm format {max(newer)}, newer than this laperm reads ({FORMAT}); upgrade laperm"
        )
    # Index keys may be anything (DCP uses parameter names): map them to positions, as torch does.
    ids = [pid for g in groups for pid in g["params"]]
    position = {pid: i for i, pid in enumerate(ids)}
    unknown = [k for k in state_dict["state"] if k not in position]
    if unknown:
        raise FormatError(f"state_dict has state for {unknown[:3]} that no param group lists")
    return {
        "state": {position[k]: dict(v) for k, v in state_dict["state"].items()},
        "param_groups": [dict(g, params=[position[pid] for pid in g["params"]]) for g in groups],
        "laperm_format": FORMAT,
    }


def _from_010(old: dict[str, Any]) -> dict[str, Any]:
    """laperm 0.1.0's layout: the inner state_dict under "base", sorted rows and latent weights beside it."""
    base = old["base"]
    if not isinstance(base, dict) or not {"state", "param_groups"} <= base.keys():
        raise FormatError("laperm 0.1.0 state_dict without the inner optimizer's state under 'base'")
    state = {int(i): dict(st) for i, st in base["state"].items()}
    for i, stored in old["sorted"].items():
        try:
            entry = SortedRows.from_state(stored).entry()
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"saved initial values of parameter {i} are damaged ({e})") from None
        state.setdefault(int(i), {}).update(entry)
    for i, z in (old.get("latent") or {}).items():
        state.setdefault(int(i), {})[LATENT] = z
    synced = bool(old.get("synced", False))
    groups = [
        dict(g, laperm_synced=synced, sync_rule=g.get("sync_rule", "overwrite"))  # (before sync_rule)
        for g in base["param_groups"]
    ]
    return {"state": state, "param_groups": groups, "laperm_format": FORMAT}
