"""The sync kernel and row views: exact agreement with the reference rule."""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from laperm import reconnect
from laperm.reconnect import RowLayout

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def python_sync(w: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct rule on 2-D rows: rank by (value, index)."""
    out = w.clone()
    for r in range(w.shape[0]):
        row = w[r].tolist()
        order = sorted(range(len(row)), key=lambda i: (row[i], i))
        values = sorted(theta0[r].tolist())
        for rank, i in enumerate(order):
            out[r, i] = values[rank]
    return out


@st.composite
def weight_pairs(draw):
    """(theta0, w, layout): random shapes, dtypes, layouts, with ties forced in."""
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["linear", "conv", "bias", "convT", "tensor"]))
    if kind == "linear":
        shape = (draw(st.integers(1, 6)), draw(st.integers(1, 9)))
        layout = RowLayout()
    elif kind == "conv":
        shape = (draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), 2)
        layout = RowLayout()
    elif kind == "bias":
        shape, layout = (draw(st.integers(1, 12)),), RowLayout()
    elif kind == "convT":
        g = draw(st.integers(1, 3))
        shape = (g * draw(st.integers(1, 3)), draw(st.integers(1, 3)), 2, draw(st.integers(1, 2)))
        layout = RowLayout(transposed=True, groups=g)
    else:
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
        layout = RowLayout(granularity="tensor")
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=g)
    if draw(st.booleans()):  # sparse or shared-value: many exact ties
        theta0 = torch.where(torch.rand(shape, generator=g) < 0.5, torch.zeros(shape), theta0)
    w = torch.randn(shape, generator=g)
    if draw(st.booleans()):  # ties in the inner weights too
        w = torch.round(w * 2) / 2
    return theta0.to(dtype), w.to(dtype), layout


@given(weight_pairs())
def test_sync_is_row_permutation_following_ranks(pair):
    theta0, w, layout = pair
    before = w.clone()
    reconnect.sync_tensor_(w, reconnect.sorted_rows(theta0, layout), layout)
    assert reconnect.is_row_permutation(w, theta0, layout)
    rows_before = reconnect.to_rows(before, layout)
    expected = python_sync(rows_before, reconnect.to_rows(theta0, layout))
    assert torch.equal(reconnect.to_rows(w, layout), expected)


@given(weight_pairs())
def test_matches_reference_argsort_of_argsort(pair):
    theta0, w, layout = pair
    s = reconnect.sorted_rows(theta0, layout)
    ref = reconnect.reference_sync(w, s, layout)
    reconnect.sync_tensor_(w, s, layout)
    assert torch.equal(w, ref)


def test_sync_is_idempotent_and_changes_nothing_on_synced_weights():
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(7, 30, generator=g)
    theta0[:, ::3] = 0.0
    w = torch.randn(7, 30, generator=g)
    s = reconnect.sorted_rows(theta0)
    reconnect.sync_tensor_(w, s)
    again = w.clone()
    reconnect.sync_tensor_(again, s)
    assert torch.equal(w, again)


def test_transposed_rows_are_output_units():
    """Row r of a ConvTranspose layout drives output channel r and nothing else."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False)
    layout = RowLayout(transposed=True, groups=2)
    x = torch.randn(1, 6, 5, 5)
    rows = reconnect.to_rows(conv.weight.detach(), layout)
    assert rows.shape == (4, 3 * 9)
    for r in range(4):
        w = conv.weight.detach().clone()
        zeroed = rows.clone()
        zeroed[r] = 0
        reconnect.from_rows_(w, zeroed, layout)
        out = nn.functional.conv_transpose2d(x, w, groups=2)
        assert torch.all(out[0, r] == 0)
        others = [c for c in range(4) if c != r]
        assert torch.equal(out[0, others], conv(x)[0, others].detach())


def test_row_views_round_trip():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2 * 2, 3, 2, 5)
    for layout in [RowLayout(), RowLayout(transposed=True, groups=2), RowLayout("tensor")]:
        out = torch.zeros_like(t)
        reconnect.from_rows_(out, reconnect.to_rows(t, layout).clone(), layout)
        assert torch.equal(out, t)


def test_rebuild_by_rank_known_answer():
    trained = torch.tensor([[0.3, -1.0, 2.0], [5.0, 4.0, 6.0]])
    init = torch.tensor([[10.0, 20.0, 30.0], [1.0, 3.0, 2.0]])
    rebuilt = reconnect.rebuild_by_rank(trained, init)
    assert torch.equal(rebuilt, torch.tensor([[20.0, 10.0, 30.0], [2.0, 1.0, 3.0]]))
    assert torch.equal(trained, torch.tensor([[0.3, -1.0, 2.0], [5.0, 4.0, 6.0]]))


def test_is_row_permutation_detects_changes():
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert reconnect.is_row_permutation(a[:, [2, 0, 1]], a)
    assert not reconnect.is_row_permutation(a.flip(0), a)  # values moved between rows
    b = a.clone()
    b[1, 1] = 5.000001
    assert not reconnect.is_row_permutation(b, a)
    assert not reconnect.is_row_permutation(torch.tensor([[0.0, -0.0]]), torch.tensor([[0.0, 0.0]]))
    assert reconnect.is_row_permutation(a.flip(0), a, RowLayout("tensor"))


def test_errors():
    with pytest.raises(ValueError, match="granularity"):
        RowLayout("column")
    with pytest.raises(ValueError, match="does not match"):
        reconnect.sync_rows_(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="0-dimensional"):
        reconnect.to_rows(torch.tensor(1.0))


def test_moved_fraction():
    assert reconnect.moved_fraction(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == 0.5


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(1)
    theta0 = torch.randn(64, 300, generator=g).to(dtype)
    w = torch.randn(64, 300, generator=g).to(dtype)
    s = reconnect.sorted_rows(theta0)
    cpu = reconnect.sync_tensor_(w.clone(), s)
    gpu = reconnect.sync_tensor_(w.cuda(), s.cuda())
    assert torch.equal(cpu, gpu.cpu())


# -- the CPU fast path (int64 keys, blocks, threads) against torch's stable sort --

F32 = np.finfo(np.float32)
# Values that stress the key mapping: ties, both zeros, subnormals, extremes.
SPECIAL = np.array(
    [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        -0.5,
        F32.smallest_subnormal,
        -F32.smallest_subnormal,
        2 * F32.smallest_subnormal,
        -3 * F32.smallest_subnormal,
        F32.smallest_normal,
        -F32.smallest_normal,
        F32.max,
        -F32.max,
        1e-30,
        -1e-30,
        3e38,
        -3e38,
    ],
    dtype=np.float32,
)


def torch_stable_sync(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    idx = torch.argsort(rows, dim=1, stable=True)
    return rows.clone().scatter_(1, idx, s)


@contextlib.contextmanager
def kernel_settings(threads, block=None, min_parallel=None):
    """Force threads and tiny blocks so small inputs exercise the pool and block edges."""
    saved = reconnect.BLOCK_ELEMS, reconnect._MIN_PARALLEL
    reconnect.set_num_threads(threads)
    if block is not None:
        reconnect.BLOCK_ELEMS = block
    if min_parallel is not None:
        reconnect._MIN_PARALLEL = min_parallel
    try:
        yield
    finally:
        reconnect.set_num_threads(None)
        reconnect.BLOCK_ELEMS, reconnect._MIN_PARALLEL = saved


@st.composite
def float32_rows(draw):
    """Finite float32 row matrices, mostly tie-heavy; some of length 1 or > 65,536."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = draw(
        st.sampled_from(
            [
                (draw(st.integers(1, 6)), draw(st.integers(1, 40))),
                (draw(st.integers(1, 40)), 1),
                (draw(st.integers(1, 3)), draw(st.integers(65_537, 70_000))),
                (draw(st.integers(20, 60)), draw(st.integers(1000, 4608))),
            ]
        )
    )
    normal = rng.standard_normal(draw(st.integers(1, 50))).astype(np.float32)
    pool = np.concatenate([SPECIAL, normal])
    x = rng.choice(pool, size=shape)
    if draw(st.booleans()):  # also all the other magnitudes, through random bit patterns
        bits = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
        rand = bits.view(np.float32)
        x = np.where(np.isfinite(rand) & (rng.random(shape) < 0.5), rand, x)
    theta0 = rng.choice(pool, size=shape).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(theta0)


@given(float32_rows(), st.sampled_from([1, 2, 3]), st.booleans())
def test_fast_path_matches_torch_stable_sort(case, threads, tiny_blocks):
    rows, theta0 = case
    s = reconnect.sorted_rows(theta0)
    expected_idx = torch.argsort(rows, dim=1, stable=True)
    expected = torch_stable_sync(rows, s)
    block, min_par = (64, 0) if tiny_blocks else (None, None)
    with kernel_settings(threads, block, min_par):
        assert torch.equal(reconnect.argsort_rows(rows), expected_idx)
        out = rows.clone()
        reconnect.sync_rows_(out, s)
    # Bit for bit (torch.equal would take -0.0 == 0.0).
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


def test_fast_path_zeros_tie_in_index_order():
    rows = torch.tensor([[0.0, -0.0, 0.0, -0.0, -1e-45, 1e-45]])
    assert reconnect.argsort_rows(rows).tolist() == [[4, 0, 1, 2, 3, 5]]
    s = torch.tensor([[-2.0, -0.0, 0.0, 1.0, 2.0, 3.0]])
    out = reconnect.sync_rows_(rows.clone(), s)
    assert out.view(torch.int32).tolist() == s[:, [1, 2, 3, 4, 0, 5]].view(torch.int32).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_rows_and_float64(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.round(torch.randn(300, 90, generator=g) * 3).to(dtype)
    rows = base.t()  # (90, 300), a non-contiguous view
    s = reconnect.sorted_rows(torch.randn(90, 300, generator=g).to(dtype))
    expected = torch_stable_sync(rows, s)
    with kernel_settings(2, block=512, min_parallel=0):
        assert torch.equal(reconnect.argsort_rows(rows), torch.argsort(rows, dim=1, stable=True))
        reconnect.sync_rows_(rows, s)
    assert torch.equal(rows, expected)
    assert torch.equal(base.t(), expected)  # written through the view


def test_sync_rows_keeps_autograd_error_on_leaf():
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="in-place"):
        reconnect.sync_rows_(p, reconnect.sorted_rows(p))


def test_set_num_threads():
    try:
        reconnect.set_num_threads(3)
        assert reconnect.get_num_threads() == 3
        reconnect.set_num_threads(None)
        assert reconnect.get_num_threads() == torch.get_num_threads()
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="threads"):
                reconnect.set_num_threads(bad)
    finally:
        reconnect.set_num_threads(None)


def test_sync_from_inside_a_pool_worker_runs_serially():
    """A sync started by a kernel thread must not wait on the (busy) pool: no deadlock."""
    rows = torch.randn(50, 40)
    s = reconnect.sorted_rows(torch.randn(50, 40))
    expected = torch_stable_sync(rows, s)
    with kernel_settings(2, block=64, min_parallel=0):
        busy_pool = reconnect._get_pool(1)
        busy_pool.submit(reconnect.sync_rows_, rows, s).result(timeout=30)
    assert torch.equal(rows, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_is_seen_by_autograd_as_in_place(dtype):
    """A graph that saved the weights must refuse to backprop through a sync."""
    p = torch.nn.Parameter(torch.randn(8, 40, dtype=dtype))
    s = reconnect.sorted_rows(torch.randn(8, 40, dtype=dtype))
    loss = (p * p).sum()  # saves p for backward
    reconnect.sync_tensor_(p, s)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
