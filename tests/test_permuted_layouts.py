"""One answer to "which tensors does LaPerm permute, cut how": the optimizer's, used by analyses too."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from laperm import build, models
from laperm.analysis.rebuild import permutable_layouts
from laperm.config import PRESETS, TrainConfig
from laperm.optim import LaPerm, laperm_param_groups, permuted_layouts
from laperm.reconnect import RowLayout


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


# -- the paper's models are unchanged by the per-type units of issue 28 ----------------------------------------

RESULTS = Path(__file__).resolve().parents[1] / "results"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _rule_before_issue_28(model: nn.Module, permute_biases: bool, granularity: str) -> dict[str, RowLayout]:
    """laperm 0.1's choice, restated: every non-norm tensor of 2+ dims by rows on dim 0 (ConvTranspose: dim 1),
    1-D tensors only with permute_biases."""
    out: dict[str, RowLayout] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad or isinstance(module, _NORMS):
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _CONV_T) and p.dim() >= 2:
                out[name] = RowLayout(granularity, transposed=True, groups=module.groups)
            elif p.dim() >= 2 or (p.dim() == 1 and permute_biases):
                out[name] = RowLayout(granularity)
    return out


def _paper_configs(every_seed: bool) -> list[TrainConfig]:
    """Every preset, and every run under results/ (one per model, init and layout options; per seed too if asked)."""
    configs = [TrainConfig(**values) for values in PRESETS.values()]
    for path in sorted(RESULTS.glob("**/config.yaml")):
        configs.append(TrainConfig(**yaml.safe_load(path.read_text())))
    keys = {(c.model, c.init, c.permute_biases, c.granularity, c.seed if every_seed else 0): c for c in configs}
    return list(keys.values())


def _check_unchanged(configs: list[TrainConfig], describe: bool) -> None:
    for cfg in configs:
        model, _ = build.build_model(cfg, torch.device("cpu"))
        biases = build.resolve_permute_biases(cfg.model, cfg.permute_biases)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert build.model_layouts(cfg, model) == _rule_before_issue_28(model, biases, cfg.granularity), cfg
            # (model_layouts runs the untrainable check: a warning would fail here; the table says the same)
            if describe:
                assert not [line for line in build.describe_model(cfg, model).free if "untrainable" in line.reason]


def test_the_paper_models_permute_the_same_tensors_the_same_way_as_before():
    """The sets of permuted tensors (and their rows) of the presets and of the runs under results/ are
    laperm 0.1's, and none of their tensors is left free as untrainable (no warning). The run names under
    results/ are checked by test_config_metadata::test_existing_run_names_under_results_stay_valid."""
    configs = _paper_configs(every_seed=False)
    assert len(configs) >= len(PRESETS)
    _check_unchanged(configs, describe=False)


@pytest.mark.slow
def test_the_paper_models_are_unchanged_at_every_seed_under_results():
    """As above, at the seed of every run under results/ (the pruned and shared inits draw per seed)."""
    _check_unchanged(_paper_configs(every_seed=True), describe=True)
