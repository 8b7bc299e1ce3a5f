"""The batched sync (one sort per distinct row length across tensors) against the per-tensor kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laperm import flat_sync, optim, reconnect
from laperm.optim import LaPerm, laperm_param_groups
from laperm.reconnect import RowLayout

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _tensor(draw: st.DrawFn, dtype: torch.dtype) -> tuple[torch.Tensor, RowLayout]:
    """A random weight-like tensor, with many ties when drawn from a few distinct values."""
    kind = draw(st.sampled_from(["linear", "conv", "bias", "convT", "tensor"]))
    a, b = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    shape = {"linear": (a, b), "conv": (a, b, 3, 3), "bias": (a,), "convT": (2 * a, b, 2, 2), "tensor": (a, b)}[kind]
    layout = {"convT": RowLayout(transposed=True, groups=2), "tensor": RowLayout(granularity="tensor")}.get(
        kind, RowLayout()
    )
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g)
    if draw(st.booleans()):  # ties: a handful of distinct values, zeros of both signs among them
        pool = torch.tensor([-1.5, -0.0, 0.0, 0.25, 2.0])
        values = pool[torch.randint(len(pool), shape, generator=g)]
    return values.to(dtype), layout


@st.composite
def _problem(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor], list[RowLayout]]:
    dtype = draw(st.sampled_from(DTYPES))
    tensors, inits, layouts = [], [], []
    for _ in range(draw(st.integers(1, 5))):
        t, layout = _tensor(draw, dtype)
        init = t[torch.randperm(t.shape[0])] if t.dim() > 1 and t.shape[0] > 1 else t.flip(0)
        tensors.append(t.clone())
        inits.append(reconnect.sorted_rows(init.clone(), layout))
        layouts.append(layout)
    return tensors, inits, layouts


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(problem=_problem())
def test_sync_many_is_bit_identical_to_the_per_tensor_sync(device, problem):
    tensors, inits, layouts = problem
    expected = [reconnect.sync_tensor_(t.clone(), s, lay) for t, s, lay in zip(tensors, inits, layouts, strict=True)]
    got = [t.clone().to(device) for t in tensors]
    reconnect.sync_many_(got, [s.to(device) for s in inits], layouts)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(reconnect._bits(g.cpu()), reconnect._bits(e)), "not bit-identical"


def test_sync_many_writes_through_non_view_layouts_and_leaves_others_alone():
    w_convt = torch.randn(4, 3, 2, 2)
    w_lin = torch.randn(5, 12)  # row length 12 = the convT's (in/groups) * kernel: same sort batch
    lay_t = RowLayout(transposed=True, groups=2)
    s_t = reconnect.sorted_rows(torch.randn(4, 3, 2, 2), lay_t)
    s_l = reconnect.sorted_rows(torch.randn(5, 12))
    want_t = reconnect.sync_tensor_(w_convt.clone(), s_t, lay_t)
    want_l = reconnect.sync_tensor_(w_lin.clone(), s_l)
    reconnect.sync_many_([w_convt, w_lin], [s_t, s_l], [lay_t, RowLayout()])
    assert torch.equal(w_convt, want_t) and torch.equal(w_lin, want_l)


def test_sync_many_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one sorted matrix and one layout per tensor"):
        reconnect.sync_many_([torch.randn(2, 3)], [], [RowLayout()])
    with pytest.raises(ValueError, match="does not match the stored sorted values"):
        reconnect.sync_many_([torch.randn(2, 3)], [torch.randn(2, 4)], [RowLayout()])


def _train(batched: bool | None, monkeypatch: pytest.MonkeyPatch, device: str = "cpu") -> list[torch.Tensor]:
    """A few LaPerm(Adam) steps of a small conv net, syncing through sync_many_ when ``batched``
    (None: LaPerm's own choice)."""
    if batched is not None:
        monkeypatch.setattr(optim, "_batched_sync", lambda p: batched)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 36),
        torch.nn.Linear(36, 36),
    ).to(device)
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=3)
    x, y = torch.randn(8, 3, 6, 6, device=device), torch.randint(0, 36, (8,), device=device)
    for _ in range(7):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.sync()
    opt.verify()
    return [p.detach().cpu().clone() for p in model.parameters()]


def test_laperm_through_the_batched_sync_trains_bit_identically(monkeypatch):
    # The CUDA call site (the flat sync), exercised on CPU: it must not change a run.
    plain = _train(False, monkeypatch)
    batched = _train(True, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(plain, batched, strict=True))


@pytest.mark.cuda
def test_laperm_on_cuda_uses_the_flat_sync(monkeypatch):
    calls = []
    real = flat_sync.sync_flat_
    monkeypatch.setattr(flat_sync, "sync_flat_", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _train(None, monkeypatch, device="cuda")
    assert calls
