"""What ``LaPerm.load_state_dict`` checks in a saved state, and what a state saved at synced weights carries.

**Saved at temporarily synced weights.**  Tools save the model inside ``LaPerm.synced_weights()`` so
that the model file is a row-wise permutation of θ0 (the Hugging Face callback, Lightning's callback,
a user's own save).  Under the paper's ``"overwrite"`` rule the model then holds the *synced* weights,
not the inner weights that training continues from.  So a ``state_dict()`` taken inside that context
carries them: ``laperm_inner`` in the per-parameter entry of each permuted tensor of an overwrite
group whose inner weights differ from its synced ones (only those), and each param group counts its
carried tensors in ``laperm_inner_count`` (0 otherwise, so a DCP template has the key and a loader
that dropped tensors is noticed).  Latent groups need nothing: their inner weights are the latent
weights, saved always.  A state taken outside the context carries nothing more than before.

**Loading.**  The inner weights are put back only where the model holds the synced weights of that
very moment, checked bit for bit: the synced weights are a function of the inner ones (θ0's sorted
values written at the inner weights' stable row ranks), so syncing the saved inner weights must give
exactly the model's values.  No flag or checksum is needed, and a model loaded from another moment (or
not loaded yet: load the model first) is left alone, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import reconnect, sharding
from .initial_values import COUNTS, SORTED, SortedRows
from .optim_format import LATENT
from .reconnect import RowLayout

__all__ = ["INNER", "INNER_COUNT", "carried_inner", "add_inner", "check_saved", "restore_inner", "loaded_entry"]

INNER = "laperm_inner"  # per parameter: the inner weights, in a state taken at temporarily synced weights
INNER_COUNT = "laperm_inner_count"  # per param group: how many of its tensors carry them


class SavedStateError(ValueError):
    """A saved LaPerm state does not fit this optimizer (the message says how to fix it)."""


def carried_inner(set_aside: Mapping[Tensor, Tensor] | None) -> dict[Tensor, Tensor]:
    """Of the inner weights ``synced_weights()`` set aside (``{param: inner value}``), those that differ
    from the synced values now in place: what a state taken now must carry."""
    if not set_aside:
        return {}
    return {p: z for p, z in set_aside.items() if not torch.equal(sharding.local(p), sharding.local(z))}


def add_inner(out: dict[str, Any], index: Mapping[Tensor, int], inner: Mapping[Tensor, Tensor]) -> None:
    """Put ``inner`` into state_dict ``out`` (positional) and count it per param group."""
    for p, z in inner.items():
        out["state"][index[p]][INNER] = z
    for group in out["param_groups"]:
        group[INNER_COUNT] = sum(INNER in out["state"].get(i, {}) for i in group["params"])


def check_saved(
    sd: dict[str, Any],
    params: list[Tensor],
    meta: Mapping[Tensor, Any],
    rules: list[str],
    latent: set[Tensor],
) -> None:
    """Raise :class:`SavedStateError` unless ``sd`` (format 2, positional) permutes the parameters
    ``meta`` holds (each with ``.name`` and ``.rows``), with the group ``rules``, latent weights for
    the ``latent`` ones, and well-formed tensors."""
    state = sd["state"]
    if {i for i, st in state.items() if SORTED in st} != {i for i, p in enumerate(params) if p in meta}:
        raise SavedStateError(
            "the saved LaPerm state permutes different parameters than this "
            "optimizer; build the model and param groups as in the saved run"
        )
    for i, (rule, g) in enumerate(zip(rules, sd["param_groups"], strict=False)):
        if g.get("sync_rule", "overwrite") != rule:
            raise SavedStateError(
                f"the saved LaPerm state has sync_rule {g.get('sync_rule', 'overwrite')!r} in param group "
                f"{i}, this optimizer {rule!r}; create it with the saved run's sync rule"
            )
    if {i for i, st in state.items() if LATENT in st} != {i for i, p in enumerate(params) if p in latent}:
        raise SavedStateError(
            "the saved LaPerm state has latent weights for different parameters than this "
            "optimizer's latent groups; build the model and param groups as in the saved run"
        )
    for i, p in enumerate(params):
        if p in meta:
            _check_entry(state[i], p, meta[p], p in latent)


def _check_entry(st: dict[str, Any], p: Tensor, meta: Any, latent: bool) -> None:
    for key, wanted in ((LATENT, latent), (INNER, INNER in st)):
        z = st.get(key)
        if wanted and (not isinstance(z, Tensor) or tuple(z.shape) != tuple(p.shape)):
            what = "latent" if key == LATENT else "inner"
            raise SavedStateError(
                f"saved {what} weights of {meta.name} are damaged (expected a tensor of shape {tuple(p.shape)})"
            )
    try:
        SortedRows.from_entry({SORTED: sharding.local(st[SORTED]), COUNTS: st.get(COUNTS)}, meta.rows)
    except (TypeError, ValueError) as e:
        raise SavedStateError(f"saved initial values of {meta.name} are damaged ({e})") from None


@torch.no_grad()
def restore_inner(saved: list[tuple[Tensor, Tensor, Tensor, RowLayout, str]], expected: int) -> bool:
    """Put saved inner weights back where the model holds their synced weights; True if any was.

    ``saved`` lists ``(param, saved inner weights, sorted θ0 rows, layout, name)``; ``expected`` is how
    many the saved param groups counted (fewer arrived: a loader dropped them)."""
    if len(saved) < expected:
        warnings.warn(
            f"this optimizer state was saved inside LaPerm.synced_weights() with the inner weights of {expected} "
            f"tensors, but {len(saved)} arrived (a torch.distributed.checkpoint template keeps only its own keys): "
            "training continues from the synced weights, not bit for bit; save DCP checkpoints outside "
            "synced_weights()",
            stacklevel=3,
        )
    restored, elsewhere = False, []
    for p, z, sorted_rows, layout, name in saved:
        here = sharding.local(p)
        inner = sharding.local(z).to(here.device, here.dtype)
        if torch.equal(reconnect.sync_tensor_(inner.clone(), sorted_rows, layout), here):
            here.copy_(inner)
            restored = True
        elif not torch.equal(inner, here):
            elsewhere.append(name)
    if elsewhere:
        warnings.warn(
            f"the model's {elsewhere[0]} holds neither the synced nor the inner weights this optimizer state "
            "was saved with, so its inner weights were not restored; load the model's weights from the same "
            "checkpoint before the optimizer's state",
            stacklevel=3,
        )
    return restored


def loaded_entry(p: Tensor, saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """``p``'s LaPerm tensors from its ``saved`` entry, on ``p``'s device. Latent weights are copied into the
    ``live`` entry's tensor, in place: the tensors the inner optimizer and the model's forward hold stay live."""
    local = sharding.local(p)
    entry: dict[str, Any] = {SORTED: sharding.like(p, sharding.local(saved[SORTED]).to(local.device, local.dtype))}
    if COUNTS in saved:
        entry[COUNTS] = saved[COUNTS].to(local.device)
    if LATENT in saved:
        z = live[LATENT]
        if z is not saved[LATENT]:  # (DCP loads into the live tensors themselves)
            sharding.local(z).copy_(sharding.local(saved[LATENT]))
        entry[LATENT] = z
    return entry
