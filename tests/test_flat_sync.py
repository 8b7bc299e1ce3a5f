"""The flat sync (every row of every tensor in a fixed handful of kernels) against the per-tensor kernel."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from laperm import flat_sync, optim, reconnect
from laperm.optim import LaPerm, LaPermError, laperm_param_groups
from laperm.reconnect import RowLayout

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
KINDS = ["linear", "conv", "conv_cl", "bias", "convT", "tensor", "empty"]
STRATEGIES = ["global", "by_length"]


@contextlib.contextmanager
def _strategy(name: str) -> Iterator[None]:
    saved = flat_sync.STRATEGY
    flat_sync.STRATEGY = name
    try:
        yield
    finally:
        flat_sync.STRATEGY = saved


def _shape_and_layout(kind: str, a: int, b: int) -> tuple[tuple[int, ...], RowLayout]:
    shape = {
        "linear": (a, b),
        "conv": (a, b, 3, 2),
        "conv_cl": (a, b, 2, 3),
        "bias": (a,),
        "convT": (2 * a, b, 2, 2),
        "tensor": (a, b),
        "empty": (a, 0),
    }[kind]
    layout = {"convT": RowLayout(transposed=True, groups=2), "tensor": RowLayout(granularity="tensor")}
    return shape, layout.get(kind, RowLayout())


def _values(shape: tuple[int, ...], ties: str, g: torch.Generator) -> torch.Tensor:
    if ties == "shared":  # a shared-value init: {0, v} (and here also -0.0), long runs of equal values
        pool = torch.tensor([0.0, -0.0, 0.0625])
        return pool[torch.randint(len(pool), shape, generator=g)]
    if ties == "few":  # duplicated values, zeros of both signs among them
        pool = torch.tensor([-1.5, -0.0, 0.0, 0.25, 2.0])
        return pool[torch.randint(len(pool), shape, generator=g)]
    if ties == "equal":  # every value of the tensor the same
        return torch.full(shape, 0.5)
    return torch.randn(shape, generator=g)


def _tensor(kind: str, a: int, b: int, ties: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, RowLayout]:
    g = torch.Generator().manual_seed(seed)
    shape, layout = _shape_and_layout(kind, a, b)
    t = _values(shape, ties, g).to(dtype)
    if kind == "conv_cl":
        t = t.contiguous(memory_format=torch.channels_last)
    return t, layout


def _init_for(t: torch.Tensor, layout: RowLayout, seed: int) -> torch.Tensor:
    """Sorted initial rows for ``t``: its own values shuffled in memory (ties kept), sorted per row."""
    g = torch.Generator().manual_seed(seed)
    flat = t.reshape(-1)
    return reconnect.sorted_rows(flat[torch.randperm(flat.numel(), generator=g)].reshape(t.shape), layout)


@st.composite
def _problem(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor], list[RowLayout]]:
    dtype = draw(st.sampled_from(DTYPES))
    tensors, inits, layouts = [], [], []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(KINDS))
        a, b = draw(st.integers(1, 7)), draw(st.integers(1, 7))
        ties = draw(st.sampled_from(["none", "few", "shared", "equal"]))
        seed = draw(st.integers(0, 2**31 - 1))
        t, layout = _tensor(kind, a, b, ties, dtype, seed)
        tensors.append(t)
        inits.append(_init_for(t, layout, seed + 1))
        layouts.append(layout)
    return tensors, inits, layouts


def _assert_bit_identical(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        assert torch.equal(reconnect.float_bits(g.cpu()), reconnect.float_bits(w.cpu())), "not bit-identical"


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.preserve_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=60, deadline=None)
@given(problem=_problem())
def test_flat_sync_is_bit_identical_to_the_per_tensor_sync_and_the_reference(device, strategy, problem):
    tensors, inits, layouts = problem
    want = [reconnect.sync_tensor_(_clone(t), s, lay) for t, s, lay in zip(tensors, inits, layouts, strict=True)]
    ref = [reconnect.reference_sync(t, s, lay) for t, s, lay in zip(tensors, inits, layouts, strict=True)]
    got = [_clone(t).to(device) for t in tensors]
    with _strategy(strategy):
        flat_sync.sync_flat_(got, [s.to(device) for s in inits], layouts)
    _assert_bit_identical(got, want)
    _assert_bit_identical(got, [r.to(memory_format=torch.preserve_format) for r in ref])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_sync_of_every_layout_and_tie_kind_at_once(dtype, strategy):
    tensors, inits, layouts = [], [], []
    for i, kind in enumerate(KINDS):
        for j, ties in enumerate(["none", "few", "shared", "equal"]):
            t, layout = _tensor(kind, 3 + i % 3, 2 + j, ties, dtype, seed=10 * i + j)
            tensors.append(t)
            inits.append(_init_for(t, layout, seed=100 + i + j))
            layouts.append(layout)
    want = [reconnect.sync_tensor_(_clone(t), s, lay) for t, s, lay in zip(tensors, inits, layouts, strict=True)]
    got = [_clone(t) for t in tensors]
    with _strategy(strategy):
        flat_sync.sync_flat_(got, inits, layouts)
    _assert_bit_identical(got, want)
    assert got[KINDS.index("conv_cl") * 4].is_contiguous(memory_format=torch.channels_last)


def test_flat_sync_writes_the_tensors_themselves_and_mixes_dtypes_and_odd_strides():
    lin = torch.nn.Linear(6, 5)
    base = torch.randn(4, 10)
    strided = base[:, ::2]  # gapped memory: goes through the per-length kernel
    half = torch.randn(3, 7).half()
    tensors = [lin.weight, strided, half]
    layouts = [RowLayout()] * 3
    inits = [reconnect.sorted_rows(torch.randn_like(t)) for t in tensors]
    want = [reconnect.sync_tensor_(t.detach().clone(), s) for t, s in zip(tensors, inits, strict=True)]
    ptr, version = lin.weight.data_ptr(), lin.weight._version
    flat_sync.sync_flat_(tensors, inits, layouts)
    assert lin.weight.data_ptr() == ptr and lin.weight._version > version  # in place, seen by autograd
    assert torch.equal(base[:, 1::2], base[:, 1::2].clone())  # (the gaps: left alone below)
    for t, w in zip(tensors, want, strict=True):
        assert torch.equal(t.detach(), w)


def test_flat_sync_of_nothing_and_of_empty_tensors():
    flat_sync.sync_flat_([], [], [])
    t = torch.empty(3, 0)
    flat_sync.sync_flat_([t], [torch.empty(3, 0)], [RowLayout()])
    assert t.shape == (3, 0)


def test_flat_sync_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one sorted matrix and one layout per tensor"):
        flat_sync.sync_flat_([torch.randn(2, 3)], [], [RowLayout()])
    with pytest.raises(ValueError, match="does not match the stored sorted values"):
        flat_sync.sync_flat_([torch.randn(2, 3)], [torch.randn(2, 4)], [RowLayout()])


def test_the_plan_depends_on_shapes_not_on_the_tensors_and_its_cache_is_bounded():
    layouts = [RowLayout(), RowLayout(transposed=True, groups=1)]
    for _ in range(2):  # the second round reuses the plan on new tensors of the same shapes
        tensors = [torch.randn(4, 3, 3), torch.randn(2, 4, 3)]
        inits = [reconnect.sorted_rows(torch.randn_like(t), lay) for t, lay in zip(tensors, layouts, strict=True)]
        want = [reconnect.sync_tensor_(t.clone(), s, lay) for t, s, lay in zip(tensors, inits, layouts, strict=True)]
        flat_sync.sync_flat_(tensors, inits, layouts)
        _assert_bit_identical(tensors, want)
    for n in range(flat_sync.PLAN_CACHE_SIZE + 5):
        t = torch.randn(2, n + 1)
        flat_sync.sync_flat_([t], [reconnect.sorted_rows(t)], [RowLayout()])
    assert len(flat_sync._plans) == flat_sync.PLAN_CACHE_SIZE


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that may launch a kernel (views and aliases excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _problem_of(n: int, cycle: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[RowLayout]]:
    """``n`` tensors of varied kinds, shapes and row lengths (``cycle``: the first ``cycle`` shapes repeated)."""
    g = torch.Generator().manual_seed(n)
    tensors, layouts = [], []
    for i in range(n):
        j = i if cycle is None else i % cycle
        kind = KINDS[(j + 2) % 6]  # (2 tensors: one channels_last, so both sets need the row-order gather)
        shape, layout = _shape_and_layout(kind, 2 + j % 5, 2 + j % 11)
        t = torch.randn(shape, generator=g)
        tensors.append(t.contiguous(memory_format=torch.channels_last) if kind == "conv_cl" else t)
        layouts.append(layout)
    inits = [reconnect.sorted_rows(torch.randn_like(t), lay) for t, lay in zip(tensors, layouts, strict=True)]
    return tensors, inits, layouts


def _ops_of_one_sync(sync, n: int, cycle: int | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """The kernel-like ops of one (warm: plan cached) sync of :func:`_problem_of`'s tensors."""
    tensors, inits, layouts = _problem_of(n, cycle)
    sync(tensors, inits, layouts)
    with _CountOps() as counter:
        sync(tensors, inits, layouts)
    return counter.ops


def test_one_global_flat_sync_dispatches_the_same_ops_for_2_or_50_tensors_of_any_lengths():
    # A device-independent proxy for the kernel launches of one sync on a GPU.
    with _strategy("global"):
        few, many = _ops_of_one_sync(flat_sync.sync_flat_, 2), _ops_of_one_sync(flat_sync.sync_flat_, 50)
    assert many == few, (few, many)
    assert len(few) <= 11 and few.count("aten.sort.stable") == 2
    # The per-length kernel's count grows with the tensors and row lengths: what this measure sees.
    assert len(_ops_of_one_sync(reconnect.sync_many_, 50)) > 3 * len(_ops_of_one_sync(reconnect.sync_many_, 2))


def test_one_by_length_flat_sync_dispatches_ops_per_row_length_not_per_tensor():
    with _strategy("by_length"):
        few = _ops_of_one_sync(flat_sync.sync_flat_, 6, cycle=6)
        many = _ops_of_one_sync(flat_sync.sync_flat_, 60, cycle=6)
    assert many == few, (few, many)
    tensors, _, layouts = _problem_of(6)
    lengths = {reconnect.to_rows(t, lay).shape[1] for t, lay in zip(tensors, layouts, strict=True)}
    assert few.count("aten.sort.stable") == len(lengths) and len(few) <= 2 * len(lengths) + 8
    assert len(_ops_of_one_sync(reconnect.sync_many_, 60, cycle=6)) > 3 * len(many)


def _train(batched: bool, monkeypatch: pytest.MonkeyPatch, channels_last: bool) -> list[torch.Tensor]:
    """A few LaPerm(Adam) steps of a small conv net (incl. a transposed conv), syncing flat when ``batched``."""
    monkeypatch.setattr(optim, "_batched_sync", lambda p: batched)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ConvTranspose2d(4, 4, 2, groups=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 10),
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model, permute_biases=True), lr=1e-2), k=2)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
    for _ in range(6):  # three syncs
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.verify()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_laperm_through_the_flat_sync_trains_bit_identically(monkeypatch, channels_last):
    plain = _train(False, monkeypatch, channels_last)
    flat = _train(True, monkeypatch, channels_last)
    _assert_bit_identical(flat, plain)


def test_laperm_flat_sync_refuses_non_finite_weights_before_writing_any(monkeypatch):
    monkeypatch.setattr(optim, "_batched_sync", lambda p: True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = LaPerm(torch.optim.SGD(laperm_param_groups(model), lr=0.1), k=1)
    with torch.no_grad():
        model[0].weight.add_(0.01)
        model[1].weight[0, 0] = float("nan")
    before = model[0].weight.detach().clone()
    with pytest.raises(LaPermError, match=r"1\.weight holds NaN or inf"):
        opt.sync()
    assert torch.equal(model[0].weight.detach(), before)


def test_auto_strategy_sorts_small_sets_globally_and_large_ones_by_row_length(monkeypatch):
    tensors, inits, layouts = _problem_of(8)
    total = sum(t.numel() for t in tensors)
    monkeypatch.setattr(flat_sync, "STRATEGY", "auto")
    for limit, strategy in ((total, "global"), (total - 1, "by_length")):
        monkeypatch.setattr(flat_sync, "GLOBAL_MAX_ELEMENTS", limit)
        flat_sync._plans.clear()
        with _CountOps() as counter:
            flat_sync.sync_flat_([_clone(t) for t in tensors], inits, layouts)
        plan = next(iter(flat_sync._plans.values()))
        assert (plan.segments is not None, bool(plan.blocks)) == (strategy == "global", strategy == "by_length")
        assert counter.ops.count("aten.sort.stable") == (2 if strategy == "global" else len(plan.blocks))


def test_an_unknown_strategy_is_refused(monkeypatch):
    monkeypatch.setattr(flat_sync, "STRATEGY", "fastest")
    with pytest.raises(ValueError, match="STRATEGY must be one of"):
        flat_sync.sync_flat_([torch.randn(2, 3)], [torch.randn(2, 3)], [RowLayout()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_signed_zeros_tie_in_long_rows_and_large_sets(device, strategy):
    # Long enough that a GPU sorts by radix (rows and the whole set > 4096), where -0.0 and 0.0
    # would differ by their bits: they must still tie, in index order, as in the per-tensor sync.
    g = torch.Generator().manual_seed(3)
    pool = torch.tensor([-0.0, 0.0, 0.5, -0.5])
    tensors = [pool[torch.randint(4, shape, generator=g)] for shape in ((3, 5000), (2, 70, 9, 9))]
    tensors[1] = tensors[1].contiguous(memory_format=torch.channels_last)
    layouts = [RowLayout(), RowLayout()]
    inits = [_init_for(t, RowLayout(), seed=i) for i, t in enumerate(tensors)]
    want = [reconnect.sync_tensor_(_clone(t), s) for t, s in zip(tensors, inits, strict=True)]
    got = [_clone(t).to(device) for t in tensors]
    with _strategy(strategy):
        flat_sync.sync_flat_(got, [s.to(device) for s in inits], layouts)
    _assert_bit_identical(got, want)
