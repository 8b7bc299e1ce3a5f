"""Tests for laperm.init: he-uniform, Keras init, random pruning, shared-value init."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from laperm.init import (
    he_uniform_,
    keras_fan_in,
    keras_init_,
    prunable_parameters,
    random_prune_,
    shared_value_,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- fan-in / he-uniform


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.Linear(7, 3), 7),
        (nn.Conv1d(4, 5, 3), 12),
        (nn.Conv2d(6, 4, 3), 54),
        (nn.Conv2d(6, 4, (3, 5)), 90),
        (nn.Conv2d(6, 4, 3, groups=2), 27),  # in_channels / groups * k * k
        (nn.Conv2d(6, 6, 3, groups=6), 9),  # depthwise
        (nn.Conv3d(2, 3, 2), 16),
    ],
)
def test_fan_in_of_kernels(module, expected):
    assert keras_fan_in(module.weight) == expected
    assert he_uniform_(module.weight, generator=gen()).fan_in == expected


def test_fan_in_transposed_and_bias():
    w = nn.ConvTranspose2d(6, 4, 3, groups=2).weight  # shape (6, 2, 3, 3)
    assert keras_fan_in(w, transposed=True) == 2 * 9
    assert keras_fan_in(torch.empty(13)) == 13
    with pytest.raises(ValueError):
        keras_fan_in(torch.tensor(1.0))


def test_he_uniform_bounds_and_moments():
    w = torch.empty(400, 1000)
    res = he_uniform_(w, generator=gen())
    bound = math.sqrt(6 / 1000)
    assert res.bound == pytest.approx(bound) and res.numel == w.numel()
    assert w.abs().max() <= bound
    n = w.numel()
    assert abs(w.mean().item()) < 5 * bound / math.sqrt(3 * n)  # 5 sigma
    assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.02)
    assert w.abs().max() > 0.99 * bound  # fills the whole interval


def test_he_uniform_explicit_fan_in_and_validation():
    w = torch.empty(50, 50)
    assert he_uniform_(w, fan_in=6, generator=gen()).bound == pytest.approx(1.0)
    assert w.abs().max() <= 1.0 and w.abs().max() > 0.5
    with pytest.raises(ValueError):
        he_uniform_(w, fan_in=0)


def test_he_uniform_deterministic():
    a, b, c = torch.empty(30, 20), torch.empty(30, 20), torch.empty(30, 20)
    he_uniform_(a, generator=gen(1))
    he_uniform_(b, generator=gen(1))
    he_uniform_(c, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_he_uniform_works_on_parameters_and_float64():
    lin = nn.Linear(10, 10).double()
    he_uniform_(lin.weight, generator=gen())
    assert lin.weight.dtype == torch.float64 and lin.weight.requires_grad
    assert lin.weight.abs().max() <= math.sqrt(6 / 10)


@settings(deadline=None)  # example count from the conftest profile
@given(
    out_ch=st.integers(1, 8),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 4),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_he_uniform_bound_property(out_ch, groups, per_group, k, seed):
    conv = nn.Conv2d(per_group * groups, out_ch * groups, k, groups=groups)
    res = he_uniform_(conv.weight, generator=gen(seed))
    assert res.fan_in == per_group * k * k
    assert conv.weight.abs().max() <= math.sqrt(6 / res.fan_in)


# ----------------------------------------------------------------------------- keras_init_


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
    )


def test_keras_init_he_uniform_biases():
    net = small_net()
    net[1].weight.data.fill_(3.0)
    net[1].running_mean.fill_(5.0)
    res = keras_init_(net, bias="he_uniform", generator=gen())
    assert (res.weights, res.biases, res.norms) == (3, 3, 1)
    for m in (net[0], net[5]):
        assert m.weight.abs().max() <= math.sqrt(6 / m.weight[0].numel())
    assert net[3].weight.abs().max() <= math.sqrt(6 / (4 * 2 * 2))
    for m in (net[0], net[3], net[5]):
        bound = math.sqrt(6 / m.bias.numel())
        assert m.bias.abs().max() <= bound and m.bias.abs().max() > 0
    assert torch.all(net[1].weight == 1) and torch.all(net[1].bias == 0)
    assert torch.all(net[1].running_mean == 0)


def test_keras_init_zero_biases_and_determinism():
    a, b = small_net(), small_net()
    keras_init_(a, bias="zeros", generator=gen(3))
    keras_init_(b, bias="zeros", generator=gen(3))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert all(torch.all(m.bias == 0) for m in (a[0], a[3], a[5]))
    with pytest.raises(ValueError, match="bias"):
        keras_init_(a, bias="ones")


# ----------------------------------------------------------------------------- pruning


def two_layer() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(1000, 1000))
    keras_init_(net, generator=gen())
    return net


def test_prunable_parameters_order_and_names():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    assert [n for n, _ in prunable_parameters(net)] == ["0.weight", "3.weight"]
    names = dict(net.named_parameters())
    assert all(names[n] is p for n, p in prunable_parameters(net))


def test_random_prune_fraction_first_layer_and_biases():
    net = two_layer()
    before = [p.clone() for p in net.parameters()]
    res = random_prune_(net, 0.5, generator=gen())
    big = res.keep_ratio("2.weight")
    assert abs(big - 0.5) < 5 * math.sqrt(0.25 / 1e6)
    assert abs(res.keep_ratio("0.weight") - 0.8) < 5 * math.sqrt(0.16 / 1e4)
    assert set(res.masks) == {"0.weight", "2.weight"}
    assert torch.equal(net[0].bias, before[1]) and torch.equal(net[2].bias, before[3])
    # kept entries unchanged, pruned ones exactly zero
    for (name, p), old in ((("0.weight", net[0].weight), before[0]), (("2.weight", net[2].weight), before[2])):
        m = res.masks[name]
        assert m.dtype == torch.bool
        assert torch.equal(p[m], old[m]) and torch.all(p[~m] == 0)
        assert res.kept[name] == int(m.sum()) and res.total[name] == p.numel()
    assert res.num_total == 10_000 + 1_000_000
    assert res.sparsity == pytest.approx(1 - res.num_kept / res.num_total)


def test_random_prune_first_layer_rule_variants():
    net = two_layer()
    res = random_prune_(net, 0.1, generator=gen())  # 1 - p = 0.9 > 0.8: first layer keeps 0.9
    assert abs(res.keep_ratio("0.weight") - 0.9) < 0.015
    net = two_layer()
    res = random_prune_(net, 0.7, first_layer_min_keep=0.0, generator=gen())
    assert abs(res.keep_ratio("0.weight") - 0.3) < 0.025
    net = two_layer()
    before = net[2].weight.clone()
    res = random_prune_(net, 0.0, generator=gen())
    assert res.sparsity == 0.0 and torch.equal(net[2].weight, before)


def test_random_prune_include_biases_and_determinism():
    a, b = two_layer(), two_layer()
    ra = random_prune_(a, 0.5, generator=gen(7), include_biases=True)
    rb = random_prune_(b, 0.5, generator=gen(7), include_biases=True)
    assert set(ra.masks) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(torch.equal(ra.masks[k], rb.masks[k]) for k in ra.masks)
    assert torch.all(a[2].bias[~ra.masks["2.bias"]] == 0)
    assert 0.4 < ra.keep_ratio("2.bias") < 0.6


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), 1.5])
def test_random_prune_validation(p):
    with pytest.raises(ValueError):
        random_prune_(two_layer(), p)


def test_random_prune_other_errors():
    with pytest.raises(ValueError):
        random_prune_(two_layer(), 0.5, first_layer_min_keep=1.2)
    with pytest.raises(ValueError, match="no Linear/Conv"):
        random_prune_(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(TypeError):
        random_prune_(two_layer(), "0.5")


# ----------------------------------------------------------------------------- shared value


def f2_like() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128, bias=False),
        nn.ReLU(),
        nn.Linear(128, 64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 10, bias=False),
    )


def test_shared_value_per_layer_ratios():
    net = f2_like()
    keeps = [Fraction(1, 15), Fraction(1, 7), Fraction(1, 3)]
    res = shared_value_(net, 0.03, keeps, generator=gen())
    for (name, p), k in zip(prunable_parameters(net), keeps):
        v = torch.tensor(0.03, dtype=p.dtype)
        assert torch.all((p == 0) | (p == v))
        assert torch.equal(p != 0, res.masks[name])
        n = p.numel()
        assert abs(res.keep_ratio(name) - float(k)) < 5 * math.sqrt(float(k) * (1 - float(k)) / n)


def test_shared_value_scalar_and_mapping():
    net = f2_like()
    res = shared_value_(net, -0.5, 1.0, generator=gen())
    assert res.sparsity == 0.0 and all(torch.all(p == -0.5) for p in net.parameters())
    a, b = f2_like(), f2_like()
    ra = shared_value_(a, 0.1, {"1": 0.5, "3.weight": 0.25, "5": 1.0}, generator=gen(4))
    rb = shared_value_(b, 0.1, [0.5, 0.25, 1.0], generator=gen(4))
    assert all(torch.equal(ra.masks[k], rb.masks[k]) for k in ra.masks)
    assert ra.keep_ratio("5.weight") == 1.0


def test_shared_value_leaves_biases():
    net = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 5))
    before = net[0].bias.clone()
    shared_value_(net, 0.08, 0.6, generator=gen())
    assert torch.equal(net[0].bias, before)


@pytest.mark.parametrize(
    "value, keep, exc",
    [
        (0.0, 0.5, ValueError),
        (float("inf"), 0.5, ValueError),
        (float("nan"), 0.5, ValueError),
        (0.1, 0.0, ValueError),
        (0.1, 1.5, ValueError),
        (0.1, [0.5, 0.5], ValueError),  # wrong length
        (0.1, {"1": 0.5, "3": 0.5}, ValueError),  # missing layer
        (0.1, {"1": 0.5, "3": 0.5, "5": 0.5, "nope": 0.5}, ValueError),
        (0.1, "0.5", TypeError),
    ],
)
def test_shared_value_validation(value, keep, exc):
    with pytest.raises(exc):
        shared_value_(f2_like(), value, keep)


def test_generator_must_be_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to build a CUDA generator")
    with pytest.raises(ValueError, match="CPU"):
        he_uniform_(torch.empty(3, 3), generator=torch.Generator(device="cuda"))
