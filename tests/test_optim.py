"""The LaPerm optimizer wrapper: exactness, schedules, state and bad input."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from laperm import reconnect
from laperm.optim import LaPerm, LaPermError, laperm_param_groups


def make_model(seed: int, sparse: float = 0.0, shared: float | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                continue
            keep = torch.rand(p.shape, generator=g) >= sparse
            if shared is not None:
                p.copy_(torch.where(keep, torch.full_like(p, shared), torch.zeros_like(p)))
            else:
                p.mul_(keep)
    return model


def batches(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)]


def reference_run(model, data, k, lr=1e-2):
    """Plain Adam plus the reference rule (argsort of argsort, per row) every k steps."""
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for t, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if t % k == 0:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in theta0:
                        rows = p.reshape(p.shape[0], -1)
                        for r in range(rows.shape[0]):
                            rank = torch.argsort(torch.argsort(rows[r], stable=True), stable=True)
                            rows[r] = torch.sort(theta0[n].reshape(p.shape[0], -1)[r]).values[rank]
    return model, opt


def laperm_run(model, data, k, lr=1e-2):
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=lr), k=k)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def assert_models_equal(a: nn.Module, b: nn.Module):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("k", [1, 4, 7])
def test_bit_identical_to_adam_plus_reference_sync(k):
    data = batches(0, 30)
    ref, ref_opt = reference_run(make_model(3, sparse=0.3), data, k)
    got, opt = laperm_run(make_model(3, sparse=0.3), data, k)
    assert_models_equal(got, ref)
    # The inner optimizer's moments were never reset.
    for p, q in zip(got.parameters(), ref.parameters()):
        assert torch.equal(opt.base_optimizer.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])


@given(
    k=st.integers(1, 9),
    steps=st.integers(1, 25),
    init=st.sampled_from(["dense", "sparse", "shared"]),
    seed=st.integers(0, 1000),
)
def test_property_rows_stay_permutations(k, steps, init, seed):
    kwargs = {"dense": {}, "sparse": {"sparse": 0.6}, "shared": {"sparse": 0.7, "shared": 0.08}}[init]
    model = make_model(seed, **kwargs)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref, _ = reference_run(make_model(seed, **kwargs), batches(seed, steps), k)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=k)
    for t, (x, y) in enumerate(batches(seed, steps), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert opt.is_synced == (t % k == 0)
        if t % k == 0:
            for n, p in model.named_parameters():
                if p.dim() >= 2:
                    assert reconnect.is_row_permutation(p, theta0[n]), n
    # Ranks followed the inner weights, and 1-D tensors (biases) went untouched by syncs.
    assert_models_equal(model, ref)


def test_lr_scheduler_drives_the_inner_optimizer():
    model = make_model(0)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches(0, 4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_k_may_change_during_training():
    model = make_model(0)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=2)
    synced = []
    for t, (x, y) in enumerate(batches(0, 12), start=1):
        if t == 5:
            for g in opt.param_groups:
                g["k"] = 5
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        synced.append(opt.is_synced)
    assert [t for t, s in enumerate(synced, start=1) if s] == [2, 4, 5, 10]


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.AdamW, torch.optim.RMSprop])
def test_wraps_other_optimizers(inner):
    model = make_model(1)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = LaPerm(inner(model.parameters(), lr=0.05), k=3)
    for x, y in batches(1, 6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.is_synced
    permuted = [(p, p0) for p, p0 in zip(model.parameters(), theta0) if p.dim() >= 2]
    assert all(reconnect.is_row_permutation(p, p0) for p, p0 in permuted)
    assert any(not torch.equal(p, p0) for p, p0 in permuted)  # something did reconnect


def test_state_dict_round_trip_continues_bit_identically():
    data = batches(2, 20)

    def train(model, opt, chunk):
        for x, y in chunk:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model = make_model(4, sparse=0.2)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3)
    train(model, opt, data[:7])  # stop between syncs
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[7:])

    buf.seek(0)
    saved = torch.load(buf)
    model2 = make_model(99)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2 = LaPerm(torch.optim.Adam(model2.parameters(), lr=1e-2), k=3)
    opt2.load_state_dict(saved["opt"])
    assert not opt2.is_synced
    train(model2, opt2, data[7:])
    assert_models_equal(model2, model)
    assert opt2.param_groups[0]["laperm_step"] == 20


def test_sync_and_synced_weights_context():
    model = make_model(5)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=100)
    for x, y in batches(5, 3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert not opt.is_synced
    inner = [p.detach().clone() for p in model.parameters()]
    with opt.synced_weights():
        assert opt.is_synced
        for p, p0 in zip(model.parameters(), theta0):
            if p.dim() >= 2:
                assert reconnect.is_row_permutation(p, p0)
        opt.verify()
    assert not opt.is_synced
    for p, q in zip(model.parameters(), inner):
        assert torch.equal(p, q)  # evaluation did not disturb training
    opt.sync()
    assert opt.is_synced
    opt.verify()


def test_granularity_tensor_moves_values_across_rows():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    theta0 = lin.weight.detach().clone()
    opt = LaPerm(torch.optim.SGD(lin.parameters(), lr=5.0), k=1, granularity="tensor")
    lin(torch.randn(8, 6)).pow(2).sum().backward()
    opt.step()
    assert reconnect.is_row_permutation(lin.weight, theta0, reconnect.RowLayout("tensor"))
    assert not reconnect.is_row_permutation(lin.weight, theta0)


def test_param_groups_by_module_type():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 2, groups=2), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.randn(1, 3, 6, 6))
    groups = laperm_param_groups(model, k=7)
    opt = LaPerm(torch.optim.Adam(groups, lr=1e-2))
    names = sorted(n for n, _ in opt.permuted_parameters())
    assert names == ["0.weight", "2.weight", "4.weight"]
    assert all(g["k"] == 7 for g in opt.param_groups)
    groups = laperm_param_groups(model, permute_biases=True)
    opt = LaPerm(torch.optim.Adam(groups, lr=1e-2))
    names = {n for n, _ in opt.permuted_parameters()}
    assert "0.bias" in names and "1.weight" not in names
    # ConvTranspose weights train as permutations of their output units' rows.
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()
    opt.sync()
    opt.verify()


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -3, 1.5, "3", True, None])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        LaPerm(torch.optim.SGD(make_model(0).parameters(), lr=0.1), k=k)


def test_bad_k_set_later_in_a_group():
    model = make_model(0)
    opt = LaPerm(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    opt.param_groups[0]["k"] = 0
    model(torch.randn(1, 2, 6, 6)).sum().backward()
    with pytest.raises(ValueError, match="k must be"):
        opt.step()


@pytest.mark.parametrize("base", [None, "adam", nn.Linear(2, 2), [torch.zeros(2)]])
def test_base_must_be_an_optimizer(base):
    with pytest.raises(TypeError, match="wraps an inner optimizer"):
        LaPerm(base, k=2)


def test_shape_change_is_refused():
    lin = nn.Linear(4, 3)
    opt = LaPerm(torch.optim.SGD(laperm_param_groups(lin), lr=0.1), k=1)
    lin.weight.data = torch.randn(3, 5)
    lin.weight.grad = torch.zeros(3, 5)
    with pytest.raises(LaPermError, match=r"weight changed shape from \(3, 4\) to \(3, 5\)"):
        opt.step()


def test_nan_at_sync_names_the_parameter():
    lin = nn.Linear(4, 3)
    opt = LaPerm(torch.optim.SGD(laperm_param_groups(lin), lr=0.1), k=1)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    lin(torch.randn(2, 4)).sum().backward()
    with pytest.raises(LaPermError, match="parameter weight holds NaN or inf"):
        opt.step()


def test_group_added_behind_the_wrappers_back_is_refused():
    model = make_model(0)
    extra = nn.Linear(3, 3)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=1)
    opt.base_optimizer.add_param_group({"params": extra.parameters()})
    model(torch.randn(1, 2, 6, 6)).sum().backward()
    with pytest.raises(LaPermError, match="add_param_group"):
        opt.step()


def test_add_param_group_through_the_wrapper_records_theta0():
    model = make_model(0)
    extra = nn.Linear(3, 3)
    theta0 = extra.weight.detach().clone()
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=2)
    opt.add_param_group({"params": list(extra.parameters()), "lr": 1.0})
    for _ in range(2):
        opt.zero_grad()
        (model(torch.randn(1, 2, 6, 6)).sum() + extra(torch.randn(2, 3)).sum()).backward()
        opt.step()
    assert opt.is_synced
    assert reconnect.is_row_permutation(extra.weight, theta0)
    assert not torch.equal(extra.weight, theta0)


def test_load_state_dict_rejects_foreign_state():
    model = make_model(0)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=2)
    with pytest.raises(LaPermError, match="not a LaPerm state_dict"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())
    other = LaPerm(torch.optim.Adam(nn.Linear(3, 3).parameters()), k=2)
    with pytest.raises((LaPermError, ValueError)):
        opt.load_state_dict(other.state_dict())


@pytest.mark.cuda
def test_cuda_matches_cpu():
    data = batches(0, 12)
    cpu, _ = laperm_run(make_model(3, sparse=0.3), data, 4, lr=1e-3)
    model = make_model(3, sparse=0.3).cuda()
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-3), k=4)
    theta0 = [p.detach().clone() for p in make_model(3, sparse=0.3).parameters()]
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
        opt.step()
    for p, p0 in zip(model.parameters(), theta0):
        if p.dim() >= 2:
            assert reconnect.is_row_permutation(p.cpu(), p0)


def test_sync_hooks_see_scheduled_syncs_only():
    model = make_model(0)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3)
    calls = []
    handle = opt.register_sync_hook(lambda o, params: calls.append((o.param_groups[0]["laperm_step"], len(params))))
    for x, y in batches(0, 7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with opt.synced_weights():  # temporary syncs for evaluation are not reported
            pass
    opt.sync()
    assert calls == [(3, 3), (6, 3), (7, 3)]
    handle.remove()
    opt.sync()
    assert len(calls) == 3
