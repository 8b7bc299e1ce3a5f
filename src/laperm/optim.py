r"""LaPerm: Lookahead Permutation as a wrapper around any PyTorch optimizer.

Given an inner optimizer (Adam in the paper) and a synchronisation period
:math:`k`, LaPerm keeps, for every permuted row (the incoming weights of one
output unit), its initial values sorted ascending, :math:`s = \operatorname{sort}(\theta_0)`.
Each call to :meth:`LaPerm.step` performs

.. math::

    \theta_t &\leftarrow \text{InnerStep}(\theta_{t-1}, g_t) \\
    \text{if } t \bmod k = 0:\quad
    \theta_t[\operatorname{argsort}(\theta_t)] &\leftarrow s
    \quad\text{(row by row, stable)}

so right after a synchronisation every permuted row is exactly a permutation
of its :math:`\theta_0` row, arranged in the rank order the inner optimizer
reached.  The inner optimizer's state (Adam's moments and step) is never reset.

That is the published ``"overwrite"`` sync rule: a sync overwrites the inner
weights, and between syncs the model runs on the inner weights.  The
``"latent"`` rule (a straight-through estimator) keeps the inner weights
:math:`z` apart, never overwrites them, and lets the model see only synced
weights :math:`\theta`; with :math:`\theta_0 = z_0` and
:math:`P_s(z)` the row-wise sync above (:math:`s` at the ranks of :math:`z`),

.. math::

    g_t &= \nabla L(\theta_{t-1}) \quad\text{(forward and backward at the synced weights)} \\
    z_t &\leftarrow \text{InnerStep}(z_{t-1}, g_t) \\
    \theta_t &\leftarrow P_s(z_t) \text{ if } t \bmod k = 0,
    \text{ else } \theta_{t-1}

so the model's weights are a permutation of :math:`\theta_0` at *every* step
(``is_synced`` is always true for such groups; ``synced_weights()`` leaves
them as they are, and ``sync()`` sets :math:`\theta \leftarrow P_s(z)` at once),
and the latent weights :math:`z` (kept in the optimizer state, saved by
``state_dict``) carry what the inner optimizer learnt across syncs; the inner
optimizer's state (Adam's moments) follows :math:`z`.

Like timm's ``Lookahead``, the wrapper shares ``param_groups`` with the inner
optimizer, so ``torch.optim.lr_scheduler`` schedulers, ``zero_grad`` and
``state_dict`` work on it unchanged.  Per-group options (set them in the
param-group dicts, or through :func:`laperm_param_groups`):

* ``k`` -- synchronisation period in steps (int >= 1); may be changed at any
  time, e.g. by a schedule: a sync happens after every step whose 1-based
  count is a multiple of the current ``k``.
* ``permute`` -- ``None`` (default: every parameter with >= 2 dims), ``True``
  (every parameter of the group, biases included) or ``False``.
* ``granularity`` -- ``"row"`` (one row per output unit) or ``"tensor"``.
* ``sync_rule`` -- ``"overwrite"`` (the paper's) or ``"latent"`` (see above);
  fixed when the group is added (changing it later raises :class:`LaPermError`).
* ``transposed`` / ``unit_groups`` -- for ``ConvTranspose*`` weights, whose
  output units sit on dim 1 (see :class:`laperm.reconnect.RowLayout`);
  ``unit_dim`` -- rows on a later dim after size-1 ones (:mod:`laperm.layouts`).
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import flat_sync, optim_state, reconnect, sharding
from .initial_values import COUNTS, SORTED, SortedRows
from .layouts import (
    NORM_LAYERS,
    group_layout,
    group_permutes,
    laperm_param_groups,
    permuted_layouts,
    warn_untrainable,
)
from .optim_format import FORMAT, LAPERM_PREFIX, LATENT, FormatError, upgrade
from .optim_state import INNER, INNER_COUNT
from .optim_steps import (
    DueSync,
    HookHandle,
    LaPermError,
    check_finite,
    count_steps,
    finite_check,
    observed,
    sync_due_together,
)
from .optim_steps import check_k as _check_k
from .reconnect import RowLayout

__all__ = ["LaPerm", "LaPermError", "laperm_param_groups", "permuted_layouts", "NORM_LAYERS", "SYNC_RULES"]


_GROUP_DEFAULTS = {"permute": None, "transposed": False, "unit_groups": 1}
SYNC_RULES = ("overwrite", "latent")


class _Permuted(NamedTuple):
    """What LaPerm knows of a permuted parameter beyond its state tensors (derived from its group, never saved)."""

    layout: RowLayout
    name: str
    shape: tuple[int, ...]  # of the local tensor (this rank's shard)
    rows: tuple[int, int]  # of the local sorted rows


class LaPerm(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` so that training reconnects weights instead of changing them.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``, already holding the
            parameters (their current values are taken as θ0:
            create the wrapper *after* any pruning or shared-value init).
        k: synchronisation period in steps (default for groups that set none).
        granularity: default unit of permutation, ``"row"`` or ``"tensor"``.
        check_finite: raise at a sync if a permuted weight is NaN or inf
            (ranks are undefined then) instead of scattering garbage.
        storage: how the sorted θ0 is kept: ``"auto"`` (run-length encoded
            where that is at most half the bytes, as for sparse and
            shared-value inits; dense otherwise), ``"dense"`` or ``"rle"``.
        sync_rule: default sync rule, ``"overwrite"`` (the paper's: a sync
            overwrites the inner weights) or ``"latent"`` (the model always
            sees synced weights; the inner weights are kept apart, as latent
            weights, and updated with the gradients taken at the synced ones).
            A latent group keeps one extra copy of its permuted weights.

    Example:
        ```python
        inner = torch.optim.Adam(laperm_param_groups(model), lr=1e-3)
        opt = LaPerm(inner, k=250)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        opt.sync()   # end of training: leave the weights in a synced state
        ```
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        k: int = 20,
        granularity: str = "row",
        check_finite: bool = True,
        storage: str = "auto",
        sync_rule: str = "overwrite",
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "LaPerm wraps an inner optimizer: pass e.g. "
                "LaPerm(torch.optim.Adam(model.parameters()), k=20), "
                f"not a {type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, LaPerm):
            raise TypeError("LaPerm cannot wrap another LaPerm optimizer")
        _check_k(k)
        _check_rule(sync_rule)
        if granularity not in reconnect.GRANULARITIES:
            raise ValueError(f"granularity must be one of {reconnect.GRANULARITIES}, got {granularity!r}")
        # Optimizer.__init__ would copy the param groups; we share them instead
        # (as timm's Lookahead does) and set up only what the base class needs.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        # (No _patch_step_function(): step runs torch's hook/profiler wrapper
        # itself, only when a hook or the profiler needs it; see step.)
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

        self.base_optimizer = base_optimizer
        self.defaults = dict(
            base_optimizer.defaults, k=k, granularity=granularity, sync_rule=sync_rule, **_GROUP_DEFAULTS
        )
        self.check_finite = check_finite
        if storage not in ("auto", "dense", "rle"):
            raise ValueError(f"storage must be auto, dense or rle, got {storage!r}")
        self.storage = storage
        # Per permuted parameter: its laperm_* state tensors (sorted θ0, latent weights), in a dict that
        # becomes the inner optimizer's own state dict for it once that exists (see `state`), and what
        # its group says of it.
        self._entries: dict[Tensor, dict[str, Any]] = {}
        self._meta: dict[Tensor, _Permuted] = {}
        self._unattached: set[Tensor] = set()
        self._synced = True
        self._inner_done = False  # inside after_inner_step: step() leaves the inner optimizer alone
        self._set_aside: dict[Tensor, Tensor] | None = None  # inner weights, inside synced_weights()
        self._sync_hooks: list[Callable[[LaPerm, list[Tensor]], None]] = []
        # Each group's sync rule as it was added, and for latent groups their (index,
        # [(param, its state entry holding the latent weights), ...]): empty when no group is
        # latent, so the overwrite path does no extra work.
        self._rules: list[str] = []
        self._latent: list[tuple[int, list[tuple[Tensor, dict[str, Any]]]]] = []
        for group in self.param_groups:
            self._init_group(group)

    # -- state ----------------------------------------------------------------
    @property
    def state(self) -> defaultdict[Tensor, dict[str, Any]]:  # type: ignore[override]
        """Per-parameter state, shared with the inner optimizer: its entries plus LaPerm's ``laperm_*`` tensors.

        Only tensors and numbers live here, so device walkers (Lightning's, ``optimizer_to``) and
        ``torch.distributed.checkpoint`` handle it.  LaPerm's tensors join a parameter's entry once the
        inner optimizer has created it (lazily initialising optimizers such as Adam test for an empty
        entry), so this is empty until the first step, as ``torch.distributed.checkpoint`` expects.
        """
        if self._unattached:
            self._attach()
        return self.base_optimizer.state

    @state.setter
    def state(self, value: defaultdict[Tensor, dict[str, Any]]) -> None:
        self.base_optimizer.state = value
        self._unattached = set(self._entries)

    def _attach(self) -> None:
        """Make each permuted parameter's entry the inner optimizer's state dict for it, where that exists."""
        inner = self.base_optimizer.state
        for p in list(self._unattached):
            theirs = inner.get(p)
            if theirs is self._entries[p]:
                self._unattached.discard(p)
            elif theirs:  # (its laperm_* values, if any, are newer: e.g. moved by a device walker)
                self._entries[p].update(theirs)
                inner[p] = self._entries[p]
                self._unattached.discard(p)

    def _entry(self, p: Tensor) -> dict[str, Any]:
        """``p``'s state dict holding its ``laperm_*`` tensors (the one a walker may have replaced, if so)."""
        theirs = self.base_optimizer.state.get(p)
        return theirs if theirs is not None and SORTED in theirs else self._entries[p]

    # -- param groups ---------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    def _init_group(self, group: dict[str, Any]) -> None:
        for key in ("k", "granularity", "sync_rule", *_GROUP_DEFAULTS):
            group.setdefault(key, self.defaults[key])
        group.setdefault("laperm_step", 0)
        _check_k(group["k"])
        _check_rule(group["sync_rule"])
        pairs, permuted = [], []
        for i, p in enumerate(group["params"]):
            if self._permuted(group, p):
                layout, name = self._layout(group, p), _param_name(group, i)
                entry = self._capture(p, layout, name)
                permuted.append((name, sharding.local(p).detach(), layout))
                if group["sync_rule"] == "latent":  # z_0 = θ0
                    entry[LATENT] = p.detach().clone()
                    pairs.append((p, entry))
        warn_untrainable(permuted)
        if pairs:
            self._latent.append((len(self._rules), pairs))
        self._rules.append(group["sync_rule"])

    def _capture(self, p: Tensor, layout: RowLayout, name: str) -> dict[str, Any]:
        """Record ``p``'s sorted θ0 (this rank's rows, for a sharded parameter) and return its state entry."""
        try:
            sharding.check_rows_whole(p, layout, name)
        except ValueError as e:
            raise LaPermError(str(e)) from None
        rows = reconnect.sorted_rows(sharding.local(p), layout)
        # (a sharded parameter's rows are stored dense: run lengths would differ from rank to rank)
        storage = "dense" if sharding.is_sharded(p) else self.storage
        entry: dict[str, Any] = SortedRows.from_sorted(rows, storage).entry()
        entry[SORTED] = sharding.like(p, entry[SORTED])
        self._entries[p] = entry
        self._meta[p] = _Permuted(layout, name, tuple(sharding.local(p).shape), (rows.shape[0], rows.shape[1]))
        self._unattached.add(p)
        return entry

    def _sorted_rows(self, p: Tensor) -> SortedRows:
        entry = self._entry(p)
        return SortedRows.from_entry(
            {SORTED: sharding.local(entry[SORTED]), COUNTS: entry.get(COUNTS)}, self._meta[p].rows
        )

    @staticmethod
    def _permuted(group: dict[str, Any], p: Tensor) -> bool:
        return group_permutes(group, p)

    @staticmethod
    def _layout(group: dict[str, Any], p: Tensor) -> RowLayout:
        return group_layout(group, p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its current values become its θ0."""
        self.base_optimizer.add_param_group(param_group)
        self._init_group(self.param_groups[-1])

    # -- stepping -------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One inner step, then a sync for each group whose step count is a multiple of its k."""
        # torch.optim wraps every step in a profiler range plus the step hooks;
        # the range alone costs ~10 us per call, about 0.5% of a small model's
        # training step.  So that wrapper runs only when something observes it:
        # a step hook on this optimizer, a global optimizer hook, or the profiler.
        if observed(self):
            return self._observed_step(closure)
        return self._step(closure)

    step.hooked = True  # type: ignore[attr-defined]  # tells torch.optim not to wrap it (e.g. on unpickling)

    def _step(self, closure: Callable[[], float] | None = None) -> Any:
        # This runs every training step, so it is kept lean: one pass over the
        # groups, no host sync, and the sync machinery only when a sync is due.
        if self._latent:
            return self._latent_step(closure)
        with torch.no_grad():  # (the inner step re-enables grad for the closure)
            loss = None if self._inner_done else self.base_optimizer.step(closure)
        self._synced = False
        due = count_steps(self.param_groups)
        if due is None:
            return loss
        if len(due) == len(self.param_groups):
            self.sync()
        else:
            with torch.no_grad():
                synced = [p for i in due for p in self._sync_group(self.param_groups[i])]
            self._run_hooks(synced)
        return loss

    def _latent_step(self, closure: Callable[[], float] | None) -> Any:
        """A step with latent groups: the inner step on the latent weights, with the gradients
        taken at the synced weights in place; then a sync from the latent ranks where one is due,
        and the previous synced weights back in place where not."""
        groups = self.param_groups
        for i, _ in self._latent:  # checked before anything is touched
            self._check_rule_unchanged(i)
            _check_k(groups[i]["k"])
        loss = None
        if closure is not None:
            # Evaluated once, at the synced weights; the inner optimizer then gets no closure
            # (so optimizers that re-evaluate it, such as LBFGS, do not fit the latent rule).
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            keep = []  # (param, synced weights) of latent groups that will not sync this step
            for i, pairs in self._latent:
                group = groups[i]
                due = (group["laperm_step"] + 1) % group["k"] == 0
                for p, entry in pairs:
                    if not due:
                        keep.append((p, p.detach().clone()))
                    p.copy_(entry[LATENT])
            self.base_optimizer.step()
            for _, pairs in self._latent:
                for p, entry in pairs:
                    entry[LATENT].copy_(p)  # the updated latent weights
        if len(self._latent) < len(groups):
            self._synced = False  # (latent groups alone never leave the synced state)
        try:
            due = count_steps(groups)
            if due is not None:
                with torch.no_grad():
                    synced = [p for i in due for p in self._sync_group(groups[i])]
                if set(due) >= self._overwrite_groups():
                    self._synced = True  # (latent groups that were not due still hold synced weights)
                self._run_hooks(synced)
        finally:
            with torch.no_grad():  # latent groups not due: their synced weights back in place
                for p, value in keep:
                    p.copy_(value)
        return loss

    _observed_step = torch.optim.Optimizer.profile_hook_step(_step)

    def after_inner_step(self) -> None:
        """Count a step whose inner step has already been done elsewhere (a CUDA graph's replay, a stacked
        inner step) and sync if due: :meth:`step` without its inner step, step hooks, sync hooks and
        profiler range included.  The inner optimizer is never touched (nor are its methods replaced)."""
        if self._latent:
            raise LaPermError(
                "after_inner_step() does not fit the latent sync rule (its inner step runs on the latent "
                "weights, inside LaPerm.step); call step() instead"
            )
        self._inner_done = True
        try:
            self.step()
        finally:
            self._inner_done = False

    @staticmethod
    def sync_together(optimizers: Sequence[LaPerm]) -> list[int]:
        """:meth:`after_inner_step` for every one of ``optimizers`` at once, their due syncs as one flat
        sync (:func:`laperm.optim_steps.sync_due_together`; bit for bit each one's own sync).  Each one's
        step hooks and profiler range run around the whole, its sync hooks after it with its own synced
        parameters.  Returns the indices of the optimizers whose due tensors were not finite: those are
        left unsynced (their step is counted), for the caller to report as their own fault."""
        opts = list(optimizers)
        if any(opt._latent for opt in opts):
            raise LaPermError("sync_together() does not fit the latent sync rule; call each optimizer's step()")
        run: Callable[[], list[int]] = functools.partial(LaPerm._sync_due, opts)
        for opt in reversed(opts):
            run = functools.partial(opt._hooked, run)
        return run()

    def _hooked(self, work: Callable[[], Any]) -> Any:
        """``work()`` inside this optimizer's step hooks and profiler range, as :meth:`step`, when observed."""
        if observed(self):
            return torch.optim.Optimizer.profile_hook_step(lambda _self: work())(self)
        return work()

    @staticmethod
    @torch.no_grad()
    def _sync_due(opts: list[LaPerm]) -> list[int]:
        """Count a step in each of ``opts``; their due syncs as one (see :meth:`sync_together`)."""
        dues, todos = [], []
        for opt in opts:
            opt._synced = False
            dues.append(count_steps(opt.param_groups) or [])
            todos.append([x for g in dues[-1] for x in opt._sync_todo(opt.param_groups[g])])
        plans = [
            DueSync(
                [t for _, t, _ in todo],
                [opt._sorted_rows(p).dense() for p, _, _ in todo],
                [st.layout for _, _, st in todo],
                opt.check_finite,
            )  # fmt: skip
            for opt, todo in zip(opts, todos)
        ]
        bad = sync_due_together(plans)
        for i, (opt, due, todo) in enumerate(zip(opts, dues, todos)):
            if due and i not in bad:
                opt._synced = len(due) == len(opt.param_groups)  # (a sync of every group: as sync())
                opt._run_hooks([p for p, _, _ in todo])
        return sorted(bad)

    @torch.no_grad()
    def sync(self) -> None:
        """Synchronise every permuted parameter now (e.g. at the end of training).

        Overwrite groups are synced from the inner weights (the parameters);
        latent groups get the synced weights of their current latent weights.
        """
        self._run_hooks(self._sync_all(from_latent=True))

    def _sync_all(self, from_latent: bool = False) -> list[Tensor]:
        """Sync overwrite groups, and latent groups (from their latent weights) only if ``from_latent``."""
        if not self._latent:
            synced = [p for group in self.param_groups for p in self._sync_group(group)]
        else:
            latent = {i for i, _ in self._latent}
            if from_latent:
                for _, pairs in self._latent:
                    for p, entry in pairs:
                        p.copy_(entry[LATENT])
            synced = [
                p
                for i, group in enumerate(self.param_groups)
                if from_latent or i not in latent
                for p in self._sync_group(group)
            ]
        self._synced = True
        return synced

    def _overwrite_groups(self) -> set[int]:
        latent = {i for i, _ in self._latent}
        return {i for i in range(len(self.param_groups)) if i not in latent}

    def _check_rule_unchanged(self, i: int) -> None:
        if i >= len(self._rules) or "laperm_step" not in self.param_groups[i]:
            raise LaPermError(
                "a param group was added to the inner optimizer after wrapping it; "
                "add groups through LaPerm.add_param_group so their θ0 is recorded"
            )
        rule, now = self._rules[i], self.param_groups[i].get("sync_rule")
        if now != rule:
            raise LaPermError(
                f"sync_rule of param group {i} was changed from {rule!r} to {now!r}; it is fixed when "
                "the group is added (create a new LaPerm optimizer, or add a param group, for the other rule)"
            )

    def register_sync_hook(self, hook: Callable[[LaPerm, list[Tensor]], None]) -> HookHandle:
        """Call ``hook(optimizer, params)`` after every sync of ``params``.

        Scheduled syncs and :meth:`sync` run hooks; the temporary sync of
        :meth:`synced_weights` does not.  Useful for invariant checks,
        reconnection statistics, or comparing replicas in distributed runs.
        Returns a handle whose ``remove()`` unregisters the hook.
        """
        self._sync_hooks.append(hook)
        return HookHandle(self._sync_hooks, hook)

    def _run_hooks(self, params: list[Tensor]) -> None:
        for hook in list(self._sync_hooks):
            hook(self, params)

    def _sync_group(self, group: dict[str, Any]) -> list[Tensor]:
        todo = self._sync_todo(group)
        if todo and _batched_sync(todo[0][1]):  # CUDA: all rows in a few kernels (docs/gpu.md)
            flat_sync.sync_flat_(
                [t for _, t, _ in todo],
                [self._sorted_rows(p).dense() for p, _, _ in todo],
                [st.layout for _, _, st in todo],
                check=finite_check(*_tensors_and_names(todo)) if self.check_finite else None,
            )
            return [p for p, _, _ in todo]
        if self.check_finite:
            check_finite(*_tensors_and_names(todo))
        for p, t, st in todo:  # CPU: the per-tensor kernel (int64 keys, threaded) is the fastest there
            reconnect.sync_tensor_(t, self._sorted_rows(p).dense(), st.layout)
        return [p for p, _, _ in todo]

    def _sync_todo(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor, _Permuted]]:
        """The group's permuted parameters to sync: (parameter, its local tensor, its θ0 record)."""
        if group.get("sync_rule") != "overwrite":  # (one look-up per sync: the overwrite path stays lean)
            self._check_rule_unchanged(next(i for i, g in enumerate(self.param_groups) if g is group))
        todo = []
        for p in group["params"]:
            st = self._meta.get(p)
            if st is None:
                if self._permuted(group, p):
                    raise LaPermError(
                        "a parameter was added to the optimizer after LaPerm was created, "
                        "so its initial values are unknown; add it through "
                        "LaPerm.add_param_group instead"
                    )
                continue
            t = sharding.local(p)  # (a sharded parameter syncs its local rows: no collective)
            if tuple(t.shape) != st.shape:
                raise LaPermError(
                    f"parameter {st.name} changed shape from {st.shape} to "
                    f"{tuple(t.shape)} after LaPerm recorded its initial values; "
                    "create the optimizer after the model's final shape is set"
                )
            todo.append((p, t, st))
        return todo

    @property
    def is_synced(self) -> bool:
        """True when the parameters are synced weights: no inner step since the last full sync
        (always, when every group uses the latent rule)."""
        return self._synced

    def steps_to_next_sync(self) -> int:
        """Steps until the next scheduled sync of the first group (for progress displays)."""
        group = self.param_groups[0]
        return group["k"] - group["laperm_step"] % group["k"]

    @contextlib.contextmanager
    def synced_weights(self) -> Iterator[None]:
        """Temporarily put the weights in their synced state (for evaluation, or to save a model file).

        The inner weights are restored on exit, so evaluating does not change the training trajectory;
        a ``state_dict()`` taken inside carries them, so a checkpoint saved here resumes exactly
        (:mod:`laperm.optim_state`).  Latent groups already hold their synced weights and are left as they are.
        """
        if self._synced:
            yield
            return
        latent = self.latent_weights()
        self._set_aside = {p: p.detach().clone() for p in self._meta if p not in latent}
        try:
            self._sync_all()
            yield
        finally:
            with torch.no_grad():
                for p, value in self._set_aside.items():
                    p.copy_(value)
            self._set_aside, self._synced = None, False

    @contextlib.contextmanager
    def inner_weights(self) -> Iterator[None]:
        """Temporarily put the inner weights in place: the latent weights of latent groups (the
        parameters of overwrite groups already are theirs).  Restored on exit."""
        pairs = [(p, entry[LATENT]) for _, group_pairs in self._latent for p, entry in group_pairs]
        saved = [(p, p.detach().clone()) for p, _ in pairs]
        try:
            with torch.no_grad():
                for p, z in pairs:
                    p.copy_(z)
            yield
        finally:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)

    def latent_weights(self) -> dict[Tensor, Tensor]:
        """``{parameter: latent weights}`` of every permuted parameter in a latent group (live tensors)."""
        return {p: entry[LATENT] for _, pairs in self._latent for p, entry in pairs}

    def permuted_parameters(self) -> list[tuple[str, Tensor]]:
        """``(name, parameter)`` for every parameter that LaPerm permutes."""
        return [(st.name, p) for p, st in self._meta.items()]

    def layout_of(self, p: Tensor) -> RowLayout:
        """How permuted parameter ``p`` is cut into rows (KeyError if LaPerm does not permute it)."""
        return self._meta[p].layout

    def name_of(self, p: Tensor) -> str:
        """The name errors and run folders use for permuted parameter ``p``."""
        return self._meta[p].name

    def storage_of(self, p: Tensor) -> str:
        """How ``p``'s sorted θ0 is kept: ``"dense"`` or ``"rle"`` (run-length encoded)."""
        return "rle" if COUNTS in self._entry(p) else "dense"

    def initial_sorted(self, p: Tensor) -> Tensor:
        """The sorted initial rows kept for permuted parameter ``p``, as a ``(rows, n)`` matrix (local rows)."""
        return self._sorted_rows(p).dense()

    def extra_memory_bytes(self) -> int:
        """Bytes LaPerm keeps beyond the inner optimizer (the stored sorted θ0, and latent weights)."""
        tensors = [
            sharding.local(v) for p in self._meta for k, v in self._entry(p).items() if k.startswith(LAPERM_PREFIX)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def verify(self) -> None:
        """Raise :class:`LaPermError` unless every permuted row is a permutation of its θ0 row.

        A sharded parameter is checked on each rank's rows, and the ranks agree on the outcome
        (one all-reduce), so every rank raises or none does.
        """
        if not self._synced:
            raise LaPermError("weights are between syncs; call sync() before verify()")
        bad = next(
            (
                st.name
                for p, st in self._meta.items()
                if not reconnect.rows_match(reconnect.to_rows(sharding.local(p), st.layout), self.initial_sorted(p))
            ),
            None,
        )
        if not sharding.all_ranks_agree(bad is None, list(self._meta)):
            raise LaPermError(
                f"parameter {bad or '(on another rank)'} is not a row-wise permutation of its initial values"
            )

    # -- state ------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The layout every torch optimizer uses (see :mod:`laperm.optim_format`): the inner optimizer's
        state_dict, with each permuted parameter's sorted θ0 (and latent weights) in its entry and LaPerm's
        options, step counts and synced flag in the param groups: everything to resume.  Inside
        :meth:`synced_weights` it also carries the inner weights the model file lacks (:mod:`laperm.optim_state`)."""
        out = self.base_optimizer.state_dict()
        index = {p: i for i, p in enumerate(self._all_params())}
        for p in self._meta:
            i = index[p]
            ours = {k: v for k, v in self._entry(p).items() if k.startswith(LAPERM_PREFIX)}
            out["state"][i] = {**out["state"].get(i, {}), **ours}  # (a new dict: the live entry stays as it is)
        optim_state.add_inner(out, index, optim_state.carried_inner(self._set_aside))
        for group in out["param_groups"]:
            group.update(laperm_synced=self._synced, laperm_format=FORMAT)
        out["laperm_format"] = FORMAT
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state_dict of this layout (from torch.save, DCP, accelerate, ...) or laperm 0.1.0's.

        Everything is checked before anything is loaded: the same permuted parameters, sync rules and
        shapes as the saved run.  Load the model's weights first: a state saved at temporarily synced
        weights puts its inner weights back where the model holds those synced weights.
        """
        try:
            sd = upgrade(state_dict)
            optim_state.check_saved(sd, self._all_params(), self._meta, self._rules, set(self.latent_weights()))
        except (FormatError, optim_state.SavedStateError) as e:
            raise LaPermError(str(e)) from None
        inner_state = {
            i: {k: v for k, v in st.items() if not k.startswith(LAPERM_PREFIX)} for i, st in sd["state"].items()
        }
        # (an entry holding only LaPerm's tensors would look initialised to a lazily initialising inner optimizer)
        self.base_optimizer.load_state_dict(
            {"state": {i: st for i, st in inner_state.items() if st}, "param_groups": sd["param_groups"]}
        )
        for group in self.param_groups:
            group.setdefault("sync_rule", "overwrite")
            for key in ("laperm_format", "laperm_synced", INNER_COUNT):
                group.pop(key, None)
        carried = []
        with torch.no_grad():
            for i, p in enumerate(self._all_params()):
                if p in self._meta:
                    self._entries[p] = optim_state.loaded_entry(p, sd["state"][i], self._entries[p])
                    if INNER in sd["state"][i]:
                        st = self._meta[p]
                        carried.append((p, sd["state"][i][INNER], self.initial_sorted(p), st.layout, st.name))
        self._latent = [(i, [(p, self._entries[p]) for p, _ in pairs]) for i, pairs in self._latent]
        self._unattached = set(self._entries)
        self._synced = all(bool(g.get("laperm_synced", False)) for g in sd["param_groups"])
        if optim_state.restore_inner(carried, sum(int(g.get(INNER_COUNT, 0)) for g in sd["param_groups"])):
            self._synced = False  # (the model is back between syncs, as when it was saved)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def __repr__(self) -> str:
        ks = sorted({g["k"] for g in self.param_groups})
        n = sum(p.numel() for p in self._meta)
        rule = ", sync_rule=latent" if self._latent else ""
        return (
            f"LaPerm(k={ks if len(ks) > 1 else ks[0]}{rule}, permuted={n:,} weights, "
            f"inner={type(self.base_optimizer).__name__})"
        )


def _batched_sync(p: Tensor) -> bool:
    """Whether a group whose first permuted tensor is ``p`` syncs through :func:`flat_sync.sync_flat_`."""
    return p.is_cuda


def _tensors_and_names(todo: list[tuple[Tensor, Tensor, _Permuted]]) -> tuple[list[Tensor], list[str]]:
    return [t for _, t, _ in todo], [st.name for _, _, st in todo]


def _check_rule(rule: Any) -> None:
    if rule not in SYNC_RULES:
        raise LaPermError(
            f"sync_rule must be 'overwrite' (the paper's: a sync overwrites the inner weights) or 'latent' "
            f"(the inner weights are kept apart, the model always sees synced weights), got {rule!r}"
        )


def _param_name(group: dict[str, Any], i: int) -> str:
    names = group.get("param_names")
    return names[i] if names and i < len(names) else f"#{i} of its param group"
