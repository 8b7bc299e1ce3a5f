"""Which parameters LaPerm permutes, and along which dim each one's output units (rows) run.

LaPerm's unit of permutation is one output unit's incoming weights.  Where that unit sits in a
weight tensor depends on the module type, so it is declared per type in a registry:

* ``nn.Linear``, ``nn.Bilinear``, ``Conv*d``, ``nn.Embedding``, ``nn.EmbeddingBag``: dim 0;
* ``ConvTranspose*d``: dim 1, per group (its weight is ``(in, out/groups, *k)``);
* ``transformers``' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``, weight ``(in, out)``): dim 1.
  It is recognised by its qualified class name, so ``transformers`` is never imported here.

:func:`register_unit_dim` adds a user's own module type.  A parameter with two or more dims on a
module of no registered type (a class token, position embedding, relative-position table, layer
scale registered directly on a custom module) has its leading size-1 dims dropped and its rows on
the first dim left: a ``(1, L, D)`` position embedding has one row of ``D`` values per position.

Permutation cannot train a tensor whose rows hold a single distinct value each: a tensor with one
distinct value (a zero-initialised head or class token), rows of length one (a ``(C, 1, 1)`` layer
scale), or a constant row in a tensor that is not pruned (a tensor holding exact zeros, as a pruned
init leaves, counts as pruned: its zero rows stay permuted).  :func:`laperm_param_groups` leaves
such a tensor free (the inner optimizer trains it) with one warning naming it and why, or raises
with ``strict=True``.  :func:`describe` shows the whole plan, one line per parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .reconnect import RowLayout, to_rows

__all__ = [
    "NORM_LAYERS",
    "UntrainableError",
    "UntrainableWarning",
    "ParamPlan",
    "register_unit_dim",
    "unit_dim_of",
    "plan_parameters",
    "laperm_param_groups",
    "permuted_layouts",
    "group_permutes",
    "group_layout",
    "untrainable_reason",
]

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


class UntrainableError(ValueError):
    """``strict=True`` and a parameter that permutation cannot train would be permuted."""


class UntrainableWarning(UserWarning):
    """Parameters that permutation cannot train were left to the inner optimizer."""


@dataclass(frozen=True)
class _UnitRule:
    dim: int
    groups_attr: str | None


_RULES: dict[type | str, _UnitRule] = {}


def register_unit_dim(module_type: type[nn.Module] | str, dim: int, *, groups_attr: str | None = None) -> None:
    """Declare that the output units of ``module_type``'s weights (every parameter of 2+ dims) lie on ``dim``.

    ``module_type`` is a class (its subclasses follow it) or a qualified class name such as
    ``"transformers.pytorch_utils.Conv1D"`` (matched without importing its package).  ``dim`` is 0
    (``nn.Linear``'s ``(out, in)``) or 1 (``(in, out)``); ``groups_attr`` names the module attribute
    holding the number of groups of a grouped dim-1 weight (``ConvTranspose*d``'s ``"groups"``).
    A later registration of the same type replaces the earlier one.
    """
    if not (isinstance(module_type, str) or (isinstance(module_type, type) and issubclass(module_type, nn.Module))):
        raise TypeError(f"register_unit_dim takes an nn.Module subclass or a qualified class name, got {module_type!r}")
    if dim not in (0, 1) or isinstance(dim, bool):
        raise ValueError(
            f"unit dim must be 0 (weights stored (out, in, ...)) or 1 (stored (in, out, ...)), got {dim!r}"
        )
    if groups_attr is not None and dim != 1:
        raise ValueError("groups_attr applies to dim-1 weights only (grouped transposed layouts)")
    _RULES[module_type] = _UnitRule(dim, groups_attr)


for _t in (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag):
    register_unit_dim(_t, 0)
register_unit_dim(nn.modules.conv._ConvTransposeNd, 1, groups_attr="groups")
for _name in ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"):
    register_unit_dim(_name, 1)


def _rule(module: nn.Module) -> _UnitRule | None:
    """The registered rule of ``module``'s class or its nearest registered base class."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def unit_dim_of(module: nn.Module) -> int | None:
    """The registered unit dim of ``module``'s weights, or None for an unregistered type."""
    rule = _rule(module)
    return None if rule is None else rule.dim


def _leading_ones(p: Tensor) -> int:
    """How many leading size-1 dims of ``p`` to drop so that its rows are the first dim left (if 2+ are left)."""
    lead = 0
    while lead < p.dim() and p.shape[lead] == 1:
        lead += 1
    return lead if p.dim() - lead >= 2 else 0


# -- the group options LaPerm reads, and what it makes of them ---------------------------------------


def group_permutes(group: dict[str, Any], p: Tensor) -> bool:
    """Whether LaPerm permutes ``p`` in ``group`` (``permute``: None = every tensor of 2+ dims)."""
    permute = group.get("permute")
    return p.dim() >= 2 if permute is None else bool(permute) and p.dim() >= 1


def group_layout(group: dict[str, Any], p: Tensor) -> RowLayout:
    """How LaPerm cuts ``p`` of ``group`` into rows."""
    transposed = bool(group.get("transposed", False)) and p.dim() >= 2
    return RowLayout(
        granularity=group.get("granularity", "row"),
        transposed=transposed,
        groups=int(group.get("unit_groups", 1)),
        unit_dim=0 if transposed else int(group.get("unit_dim", 0)),
    )


@dataclass(frozen=True)
class ParamPlan:
    """What :func:`laperm_param_groups` does with one parameter, and why."""

    name: str
    param: Tensor
    module_type: str
    key: tuple  # its param group
    options: dict[str, Any]  # the group's LaPerm options
    reason: str  # why it is permuted or free

    @property
    def permuted(self) -> bool:
        return group_permutes(self.options, self.param)

    def layout(self, granularity: str = "row") -> RowLayout | None:
        """Its rows if it is, or could be, permuted (None for a scalar)."""
        return group_layout({"granularity": granularity, **self.options}, self.param) if self.param.dim() else None


def _plan_one(name: str, module: nn.Module, p: Tensor, permute_biases: bool, permute_norm: bool) -> ParamPlan:
    kind = type(module).__name__

    def plan(key: tuple, reason: str, **options: Any) -> ParamPlan:
        return ParamPlan(name, p, kind, key, options, reason)

    if isinstance(module, NORM_LAYERS):
        return plan(
            ("norm",), "norm layer" if permute_norm else "norm layer (permute_norm=False)", permute=permute_norm
        )
    if p.dim() == 1:
        return plan(
            ("bias",), "1-D: one row" if permute_biases else "1-D (permute_biases=False)", permute=permute_biases
        )
    if p.dim() == 0:
        return plan(("weight",), "scalar", permute=None)
    rule = _rule(module)
    if rule is not None and rule.dim == 1:
        groups = int(getattr(module, rule.groups_attr)) if rule.groups_attr else 1
        return plan(("convT", groups), "registered type", permute=True, transposed=True, unit_groups=groups)
    if rule is not None:
        return plan(("weight",), "registered type", permute=None)
    lead = _leading_ones(p)
    if lead:
        return plan(
            ("custom", lead), f"direct parameter, {lead} leading size-1 dim(s) dropped", permute=True, unit_dim=lead
        )
    return plan(("weight",), "direct parameter", permute=None)


def _named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Module, Tensor]]:
    """``(name, owning module, parameter)`` for every trainable parameter, shared ones once."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), module, p


def _whole(p: Tensor) -> Tensor:
    """``p``'s full value, gathered if it is sharded (every rank then decides alike)."""
    full = getattr(p, "full_tensor", None)
    return full().detach() if callable(full) else p.detach()


def untrainable_reason(p: Tensor, layout: RowLayout) -> str | None:
    """Why permutation cannot train ``p`` cut by ``layout``, or None if it can."""
    rows = to_rows(_whole(p), layout)
    if rows.numel() == 0:
        return None
    lo, hi = torch.aminmax(rows, dim=1)
    flat = rows.reshape(-1)
    if rows.shape[1] == 1:
        return "its rows have length one"
    if bool(flat.eq(flat[0]).all()):
        return f"every value equals {flat[0].item():g}"
    constant = lo.eq(hi)
    if bool(constant.any()) and not bool(flat.eq(0).any()):
        row = int(constant.nonzero()[0, 0])
        return f"row {row} and {int(constant.sum()) - 1} more hold a single value each (and it is not pruned)"
    return None


def warn_untrainable(params: list[tuple[str, Tensor, RowLayout]]) -> None:
    """LaPerm's own check of the tensors its groups permute (groups not built by
    :func:`laperm_param_groups`, which leaves such tensors free): one warning naming each tensor that
    permutation cannot train, with the fix. ``params``: (name, local tensor, layout)."""
    bad = [(name, why) for name, p, layout in params if (why := untrainable_reason(p, layout)) is not None]
    if bad:
        warnings.warn(
            f"LaPerm permutes {len(bad)} tensor(s) that a permutation cannot change, so they stay at their "
            f"initial values: {'; '.join(f'{n} ({why})' for n, why in bad)}. Build the param groups with "
            "laperm.laperm_param_groups(model), which leaves such tensors to the inner optimizer, or put them in "
            "a group with permute=False.",
            UntrainableWarning,
            stacklevel=4,
        )


def plan_parameters(
    model: nn.Module,
    permute_biases: bool = False,
    permute_norm: bool = False,
    granularity: str = "row",
) -> list[ParamPlan]:
    """One :class:`ParamPlan` per trainable parameter of ``model``, in its order; those permutation
    cannot train are moved to the free group ``("free",)`` with the reason."""
    out = []
    for name, module, p in _named_trainable(model):
        plan = _plan_one(name, module, p, permute_biases, permute_norm)
        layout = plan.layout(granularity)
        why = untrainable_reason(p, layout) if plan.permuted and layout is not None else None
        if why is not None:
            plan = ParamPlan(
                name, p, plan.module_type, ("free",), {"permute": False}, f"untrainable by permutation: {why}"
            )
        out.append(plan)
    return out


def _report_untrainable(plans: list[ParamPlan], strict: bool) -> None:
    bad = [p for p in plans if p.key == ("free",)]
    if not bad:
        return
    lines = "; ".join(f"{p.name} ({p.reason.removeprefix('untrainable by permutation: ')})" for p in bad)
    if strict:
        raise UntrainableError(
            f"permutation cannot train {lines}: give them distinct initial values, or drop strict=True "
            "to leave them to the inner optimizer"
        )
    warnings.warn(
        f"LaPerm leaves {len(bad)} parameter(s) free, trained by the inner optimizer, since a permutation of "
        f"their initial values cannot change them: {lines}. Pass strict=True to make this an error.",
        UntrainableWarning,
        stacklevel=3,
    )


def laperm_param_groups(
    model: nn.Module,
    permute_biases: bool = False,
    permute_norm: bool = False,
    strict: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``model`` chosen by module type, ready for an inner optimizer.

    * weights of registered layer types: permuted with output units on their declared dim
      (:func:`register_unit_dim`; ``nn.Linear``/``Conv*d``/``nn.Embedding`` dim 0,
      ``ConvTranspose*d`` and ``transformers``' ``Conv1D`` dim 1);
    * other parameters of 2+ dims: permuted by rows after dropping leading size-1 dims;
    * biases (1-D): permuted (each as one row) only if ``permute_biases``;
    * normalisation-layer parameters: never permuted unless ``permute_norm``;
    * a tensor permutation cannot train (see the module doc): left free with a warning, or
      :class:`UntrainableError` if ``strict``.

    Every group carries ``param_names`` so errors name the offending tensor.
    ``group_options`` (e.g. ``k=250``) are copied into every group.
    """
    plans = plan_parameters(model, permute_biases, permute_norm, group_options.get("granularity", "row"))
    _report_untrainable(plans, strict)
    groups: dict[tuple, dict[str, Any]] = {}
    for plan in plans:
        g = groups.setdefault(plan.key, {"params": [], "param_names": [], **plan.options, **group_options})
        g["params"].append(plan.param)
        g["param_names"].append(plan.name)
    return list(groups.values())


def permuted_layouts(
    model: nn.Module,
    permute_biases: bool = False,
    granularity: str = "row",
    permute_norm: bool = False,
) -> dict[str, RowLayout]:
    """``{parameter name: RowLayout}`` of the tensors that ``LaPerm`` over :func:`laperm_param_groups`
    permutes in ``model``, in its parameter order: the optimizer's own choice (same groups, same
    per-group rule and layout), without building an optimizer, for analyses and rebuilt records."""
    out: dict[str, RowLayout] = {}
    for plan in plan_parameters(model, permute_biases, permute_norm, granularity):
        layout = plan.layout(granularity)
        if plan.permuted and layout is not None:
            out[plan.name] = layout
    return out
