"""One answer to "which tensors does LaPerm permute, cut how": the optimizer's, used by analyses too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laperm import build, models
from laperm.analysis.rebuild import permutable_layouts
from laperm.config import TrainConfig
from laperm.optim import LaPerm, laperm_param_groups, permuted_layouts


class Mixed(nn.Module):
    """Every kind of layer the rule distinguishes, norms with affine parameters included."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.up = nn.ConvTranspose2d(4, 6, 2, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.emb = nn.Embedding(7, 5)  # not a Conv/Linear, but a 2-D weight: permuted by rows


def _optimizer_layouts(model: nn.Module, permute_biases: bool, granularity: str) -> dict:
    groups = laperm_param_groups(model, permute_biases=permute_biases)
    opt = LaPerm(torch.optim.SGD(groups, lr=0.1), k=1, granularity=granularity)
    return {name: opt.layout_of(p) for name, p in opt.permuted_parameters()}


@pytest.mark.parametrize("permute_biases", [False, True])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_permuted_layouts_is_what_the_optimizer_permutes(permute_biases, granularity):
    model = Mixed()
    expected = _optimizer_layouts(model, permute_biases, granularity)
    assert permuted_layouts(model, permute_biases, granularity) == expected
    assert permutable_layouts(model, permute_biases, granularity) == expected  # the analyses' name
    # norms are never permuted, even with permute_biases (the old analysis copy permuted their 1-D weights)
    assert not any(name.startswith(("gn.", "ln.", "bn.")) for name in expected)
    assert ("conv.bias" in expected) == permute_biases and "emb.weight" in expected
    assert expected["up.weight"].transposed and expected["up.weight"].groups == 2  # units on dim 1, per group


@pytest.mark.parametrize("name", ["f2", "conv7", "lenet300"])
def test_the_runs_layouts_follow_its_config(name):
    cfg = TrainConfig(model=name, granularity="tensor")
    model, _ = build.build_model(cfg, torch.device("cpu"))
    opt = build.build_optimizer(cfg, model)
    assert isinstance(opt, LaPerm)
    assert build.model_layouts(cfg, model) == {name: opt.layout_of(p) for name, p in opt.permuted_parameters()}
    assert build.resolve_permute_biases(name, None) == models.get_spec(name).permute_biases
    assert build.resolve_permute_biases(name, False) is False
