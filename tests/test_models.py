"""Tests for laperm.models: exact parameter counts, layer details, init and the registry."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laperm.init import prunable_parameters
from laperm.models import (
    MODELS,
    Conv2dSame,
    ResNetV1,
    UnknownModelError,
    build,
    get_spec,
    same_padding,
)

EXPECTED_PARAMS = {
    "f1": 7_840,
    "f2": 109_184,
    "lenet300": 266_610,
    "conv7": 325_578,
    "conv2": 4_302_922,
    "conv4": 2_427_722,
    "conv13": 14_991_946,
    "resnet20": 273_066,
    "resnet50": 760_266,
}
BN_MODELS = ["conv2", "conv4", "conv13", "resnet50"]
_cache: dict[str, nn.Module] = {}


def model(name: str) -> nn.Module:
    """Build each model once per test session (seed 0); tests must not modify it."""
    if name not in _cache:
        _cache[name] = build(name, seed=0)
    return _cache[name]


def n_trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", EXPECTED_PARAMS)
def test_trainable_parameter_counts(name):
    assert n_trainable(model(name)) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", EXPECTED_PARAMS)
def test_forward_shape(name):
    m, spec = model(name), MODELS[name]
    x = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, spec.num_classes) and torch.isfinite(y).all()


def test_generic_resnet_depth():
    m = build("resnet", depth=20, seed=0)
    assert isinstance(m, ResNetV1) and n_trainable(m) == EXPECTED_PARAMS["resnet20"]
    for bad in (21, 2, 0):
        with pytest.raises(ValueError, match="6n\\+2"):
            ResNetV1(bad)


def test_conv7_spatial_sizes():
    m = model("conv7")
    sizes = []
    hooks = [
        c.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
        for c in m.modules()
        if isinstance(c, nn.Conv2d)
    ]
    try:
        m.eval()
        with torch.no_grad():
            m(torch.zeros(1, 1, 28, 28))
    finally:
        for h in hooks:
            h.remove()
    assert sizes == [26, 24, 12, 10, 8, 4, 1]


def test_keras_same_padding_rule():
    assert same_padding(24, 5, 2) == (1, 2)  # Conv7: more on bottom/right
    assert same_padding(8, 5, 2) == (1, 2)
    assert same_padding(32, 3, 2) == (0, 1)  # ResNet stage changes
    assert same_padding(32, 1, 2) == (0, 0)
    assert same_padding(32, 3, 1) == (1, 1)


@pytest.mark.parametrize("size, k, stride", [(24, 5, 2), (32, 3, 2), (32, 3, 1), (9, 4, 1), (32, 1, 2)])
def test_conv2d_same_matches_explicit_padding(size, k, stride):
    conv = Conv2dSame(2, 3, k, stride=stride)
    x = torch.randn(1, 2, size, size)
    (t, b), (left, right) = same_padding(size, k, stride), same_padding(size, k, stride)
    ref = F.conv2d(F.pad(x, (left, right, t, b)), conv.weight, conv.bias, stride)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / stride)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_keras_settings(name):
    bns = [m for m in model(name).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    for bn in bns:
        assert bn.eps == 1e-3 and bn.momentum == 0.01
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_cifar_relu_before_batchnorm():
    kinds = [type(m).__name__ for m in model("conv2").children()][:4]
    assert kinds == ["Conv2dSame", "ReLU", "BatchNorm2d", "Dropout"]


@pytest.mark.parametrize("name", EXPECTED_PARAMS)
def test_init_bounds(name):
    m = model(name)
    for _, w in prunable_parameters(m):
        assert w.abs().max() <= math.sqrt(6 / w[0].numel())
    he_biases = name in ("conv7", "conv2", "conv4", "conv13")
    for layer in m.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.bias is not None:
            if he_biases:
                bound = math.sqrt(6 / layer.bias.numel())
                assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0
            else:
                assert torch.all(layer.bias == 0)


def test_l2_parameters():
    def ids(params):
        return {id(p) for p in params}

    f2 = model("f2")
    assert ids(f2.l2_parameters()) == ids([f2.fc1.weight, f2.fc2.weight])
    for name in ("f1", "lenet300", "conv7"):
        assert model(name).l2_parameters() == [] and MODELS[name].l2 == 0.0
    for name in ("conv2", "conv4", "conv13"):
        m = model(name)
        kernels = [p for _, p in prunable_parameters(m)]
        assert ids(m.l2_parameters()) == ids(kernels[:-1])
        assert kernels[-1].shape == (10, m[-1].in_features) and MODELS[name].l2 == 1e-4
    r = model("resnet50")
    convs = [c.weight for c in r.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) == 1 + 6 * 8 + 2  # stem, 2 per block, 2 projections
    assert ids(r.l2_parameters()) == ids(convs) and id(r.fc.weight) not in ids(r.l2_parameters())


def test_resnet_projection_shortcuts_have_no_batchnorm():
    r = model("resnet50")
    shortcuts = [b.shortcut for s in (r.stage1, r.stage2, r.stage3) for b in s]
    projections = [s for s in shortcuts if isinstance(s, nn.Conv2d)]
    assert len(projections) == 2
    assert all(p.kernel_size == (1, 1) and p.stride == (2, 2) for p in projections)


def test_registry_specs():
    assert {"f1", "f2", "lenet300", "conv7", "conv2", "conv4", "conv13", "resnet20", "resnet50"} <= set(MODELS)
    assert {n for n, s in MODELS.items() if s.permute_biases} == {"f1", "f2", "conv7"}
    for name, spec in MODELS.items():
        assert spec.name == name
        expected = {(1, 28, 28): "mnist", (3, 32, 32): "cifar10"}.get(spec.input_shape, "text")
        assert spec.dataset == expected
    assert get_spec("Conv7") is MODELS["conv7"]


def test_build_deterministic():
    a, b, c = build("conv7", seed=1), build("conv7", seed=1), build("conv7", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    g = build("f2", generator=torch.Generator().manual_seed(5))
    assert torch.equal(g.fc1.weight, build("f2", seed=5).fc1.weight)
    with pytest.raises(ValueError):
        build("f1", seed=1, generator=torch.Generator())


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownModelError) as info:
        build("vgg19")
    assert isinstance(info.value, ValueError)
    for name in ("conv7", "resnet50", "f2"):
        assert name in str(info.value)
