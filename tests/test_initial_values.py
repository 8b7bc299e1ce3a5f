"""Compact storage of the sorted θ0: exact round trips and the memory it saves."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from laperm import LaPerm, init, models, reconnect
from laperm.initial_values import SortedRows


@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 40),
    zeros=st.floats(0, 1),
    shared=st.booleans(),
    encoding=st.sampled_from(["auto", "dense", "rle"]),
    seed=st.integers(0, 10_000),
)
def test_round_trip_is_bit_exact(rows, n, zeros, shared, encoding, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.full((rows, n), 0.08) if shared else torch.randn(rows, n, generator=g)
    t = torch.where(torch.rand(rows, n, generator=g) < zeros, torch.zeros(()), t)
    t[torch.rand(rows, n, generator=g) < 0.1] = -0.0  # signed zeros must survive
    s = reconnect.sorted_rows(t)
    stored = SortedRows.from_sorted(s, encoding)
    assert reconnect.rows_match(stored.dense(), s)
    assert torch.equal(reconnect._bits(stored.dense()), reconnect._bits(s))
    again = SortedRows.from_state(stored.state())
    assert torch.equal(reconnect._bits(again.dense()), reconnect._bits(s))


def test_auto_picks_rle_for_shared_value_and_dense_for_dense():
    dense = SortedRows.from_sorted(reconnect.sorted_rows(torch.randn(20, 300)))
    assert dense.encoding == "dense"
    w = torch.where(torch.rand(20, 300) < 0.3, torch.full((), 0.03), torch.zeros(()))
    shared = SortedRows.from_sorted(reconnect.sorted_rows(w))
    assert shared.encoding == "rle"
    assert shared.nbytes() <= 0.05 * w.numel() * 4


def test_shared_value_f2_keeps_under_5_percent():
    model = models.build("f2", seed=0)
    init.shared_value_(model, 0.03, [1 / 15, 1 / 7, 1 / 3], generator=torch.Generator().manual_seed(0))
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-3), k=250)
    permuted_bytes = sum(p.numel() * p.element_size() for _, p in opt.permuted_parameters())
    assert opt.extra_memory_bytes() <= 0.05 * permuted_bytes
    dense = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-3), k=250, storage="dense")
    assert dense.extra_memory_bytes() == permuted_bytes


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(16, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["pruned", "shared"])
def test_rle_storage_trains_bit_identically_and_round_trips(kind):
    def make():
        m = models.build("f2", seed=1)
        g = torch.Generator().manual_seed(2)
        if kind == "pruned":
            init.random_prune_(m, 0.9, generator=g)
        else:
            init.shared_value_(m, 0.03, 0.2, generator=g)
        return m

    a, b = make(), make()
    opt_a = LaPerm(torch.optim.Adam(a.parameters(), lr=5e-3), k=3, storage="dense")
    opt_b = LaPerm(torch.optim.Adam(b.parameters(), lr=5e-3), k=3, storage="auto")
    assert "rle" in {opt_b.storage_of(p) for _, p in opt_b.permuted_parameters()}  # layer 1 keeps >= 80%
    _train(a, opt_a, 7, 0)
    _train(b, opt_b, 7, 0)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    c = make()
    c.load_state_dict(b.state_dict())
    opt_c = LaPerm(torch.optim.Adam(c.parameters(), lr=5e-3), k=3, storage="auto")
    opt_c.load_state_dict(torch.load(buf))
    _train(a, opt_a, 5, 1)
    _train(c, opt_c, 5, 1)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    opt_c.sync()
    opt_c.verify()


def test_damaged_counts_are_refused():
    w = torch.where(torch.rand(4, 50) < 0.5, torch.full((), 0.1), torch.zeros(()))
    state = SortedRows.from_sorted(reconnect.sorted_rows(w), "rle").state()
    state["counts"] = state["counts"].clone()
    state["counts"][0] += 1
    with pytest.raises(ValueError, match="add up"):
        SortedRows.from_state(state)
