"""Bring your own model: output units per module type, direct parameters, and tensors permutation cannot train.

Replicas of popular patterns (no torchvision here): a ViT with a zero head and a zero class token,
a ConvNeXt-style block with a ``(C, 1, 1)`` layer scale, a ``(1, L, D)`` position embedding.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import laperm
from laperm import LaPerm, UntrainableError, UntrainableWarning, describe, laperm_param_groups, register_unit_dim
from laperm.layouts import _RULES, plan_parameters, unit_dim_of
from laperm.optim import permuted_layouts
from laperm.reconnect import RowLayout, is_row_permutation, to_rows


class ViTReplica(nn.Module):
    """timm's ViT pattern: patch conv, zero class token, (1, L+1, D) position embedding, zero head."""

    def __init__(self, width: int = 16, patches: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, width, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width) * 0.02)
        self.block = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1) + self.pos_embed
        return self.head(self.norm(self.block(h))[:, 0])


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm-free MLP, and a (C, 1, 1) layer scale initialised to a constant."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.pw1, self.pw2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 1e-6))
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.gamma * self.pw2(torch.relu(self.pw1(self.dw(h))))
        return self.head(h.mean((2, 3)))


class Positional(nn.Module):
    """A sequence model with its (1, L, D) position embedding registered directly."""

    def __init__(self, length: int = 6, width: int = 8) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, length, width))
        self.fc = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + self.pos).mean((1, 2))


def _images(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, x, y) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- the unit of each module type --------------------------------------------------------------------------


def test_builtin_types_declare_their_output_unit_dim():
    assert unit_dim_of(nn.Linear(2, 3)) == unit_dim_of(nn.Conv2d(1, 2, 3)) == unit_dim_of(nn.Embedding(4, 2)) == 0
    assert unit_dim_of(nn.ConvTranspose2d(4, 6, 2, groups=2)) == 1
    assert unit_dim_of(nn.Module()) is None


def test_conv1d_is_found_by_name_without_importing_transformers():
    code = (
        "import sys, torch\n"
        "sys.modules['transformers'] = None  # absent: any import of it fails\n"
        "from torch import nn\n"
        "from laperm.layouts import permuted_layouts\n"
        "class Conv1D(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.weight = nn.Parameter(torch.randn(3, 5))\n"
        "Conv1D.__module__ = 'transformers.pytorch_utils'\n"
        "m = nn.Sequential(Conv1D())\n"
        "print(permuted_layouts(m)['0.weight'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "transposed=True" in out


def test_a_registered_user_type_is_permuted_on_its_declared_dim():
    class InOut(nn.Module):  # stores (in, out), like transformers' Conv1D
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 3))

    try:
        assert permuted_layouts(nn.Sequential(InOut()))["0.w"] == RowLayout()
        register_unit_dim(InOut, 1)
        assert permuted_layouts(nn.Sequential(InOut()))["0.w"] == RowLayout(transposed=True)
    finally:
        _RULES.pop(InOut, None)
    with pytest.raises(ValueError, match="unit dim must be 0"):
        register_unit_dim(InOut, 2)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_unit_dim(int, 0)  # type: ignore[arg-type]


def test_a_position_embedding_has_one_row_per_position_and_positions_keep_their_values():
    torch.manual_seed(0)
    model = Positional()
    assert permuted_layouts(model)["pos"] == RowLayout(unit_dim=1)
    theta0 = model.pos.detach().clone()
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=0.05), k=2)
    x = torch.randn(16, 6, 8)
    for _ in range(6):
        opt.zero_grad()
        (model(x) - x.sum((1, 2))).pow(2).mean().backward()
        opt.step()
    opt.verify()
    assert not torch.equal(model.pos, theta0)  # it reconnected
    for i in range(6):  # each position's row is a permutation of its own initial row
        assert torch.equal(model.pos[0, i].sort().values, theta0[0, i].sort().values)


# -- never frozen silently ---------------------------------------------------------------------------------


def test_replica_vit_with_a_zero_head_trains_under_latent_k1_and_the_warning_names_the_head():
    torch.manual_seed(0)
    model = ViTReplica()
    with pytest.warns(UntrainableWarning) as caught:
        groups = laperm_param_groups(model)
    message = str(caught[0].message)
    assert "head.weight" in message and "cls_token" in message and "every value equals 0" in message
    assert "pos_embed" not in message and "patch_embed" not in message
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LaPerm(torch.optim.Adam(groups, lr=0.01), k=1, sync_rule="latent")
    permuted = {opt.name_of(p) for _, p in opt.permuted_parameters()}
    assert "head.weight" not in permuted and "cls_token" not in permuted and "pos_embed" in permuted
    x, y = _images()
    losses = _train(model, opt, 20, x, y)
    assert losses[-1] < losses[0] - 0.05, losses
    opt.verify()
    assert not torch.equal(model.head.weight, theta0["head.weight"])  # the inner optimizer trained it
    moved = [n for n in permuted if not torch.equal(dict(model.named_parameters())[n], theta0[n])]
    assert "patch_embed.weight" in moved and len(moved) >= len(permuted) - 1, moved  # the others reconnect


def test_strict_raises_and_names_the_head():
    model = ViTReplica()
    with pytest.raises(UntrainableError, match=r"head\.weight \(every value equals 0\)"):
        laperm_param_groups(model, strict=True)


def test_a_convnext_layer_scale_with_rows_of_length_one_is_left_free_and_trained():
    torch.manual_seed(0)
    model = ConvNeXtBlock()
    with pytest.warns(UntrainableWarning, match=r"gamma \(its rows have length one\)"):
        groups = laperm_param_groups(model)
    opt = LaPerm(torch.optim.Adam(groups, lr=0.01), k=2)
    assert "gamma" not in {n for n, _ in opt.permuted_parameters()}
    x, y = _images()
    losses = _train(model, opt, 10, x, y)
    opt.sync()
    opt.verify()
    assert losses[-1] < losses[0]
    assert not torch.equal(model.gamma, torch.full_like(model.gamma, 1e-6))  # trained, not stuck at its init


def test_a_constant_row_is_free_unless_the_tensor_is_pruned():
    fc = nn.Linear(4, 3)
    with torch.no_grad():
        fc.weight[1] = 0.5
    with pytest.warns(UntrainableWarning, match=r"0\.weight \(row 1 and 0 more hold a single value"):
        assert "0.weight" not in permuted_layouts_of(nn.Sequential(fc))
    with torch.no_grad():
        fc.weight[2, 0] = 0.0  # an exact zero: a pruned tensor, whose constant rows stay permuted
        fc.weight[1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "0.weight" in permuted_layouts_of(nn.Sequential(fc))


def permuted_layouts_of(model: nn.Module) -> set[str]:
    opt = LaPerm(torch.optim.SGD(laperm_param_groups(model), lr=0.1), k=1)
    return {n for n, _ in opt.permuted_parameters()}


def test_pruned_models_zero_rows_stay_permuted_without_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight[1:3] = 0  # two units pruned away
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {"0.weight", "2.weight"} <= permuted_layouts_of(model)


# -- describe ------------------------------------------------------------------------------------------------


def test_describe_shows_each_parameter_its_unit_and_why(capsys):
    desc = describe(ViTReplica())
    printed = capsys.readouterr().out
    assert printed.strip().endswith(desc.total) and "Min distinct/row" in printed
    lines = {line.name: line for line in desc.lines}
    head = lines["head.weight"]
    assert not head.permuted and "every value equals 0" in head.reason and head.min_distinct == 1
    pos = lines["pos_embed"]
    assert pos.permuted and pos.unit_dim == "1" and (pos.rows, pos.row_length) == (5, 16)
    assert lines["patch_embed.weight"].unit_dim == "0" and lines["patch_embed.weight"].min_distinct == 16
    assert lines["norm.weight"].reason == "norm layer (permute_norm=False)"
    permuted = [line for line in desc.lines if line.permuted]
    assert f"{len(permuted)} of {len(desc.lines)} parameters permuted" in desc.total
    assert "2 of them untrainable by permutation" in desc.total
    assert {r["name"] for r in desc.records() if "untrainable" in r["reason"]} == {"cls_token", "head.weight"}


def test_describe_matches_what_the_optimizer_permutes():
    model = ConvNeXtBlock()
    with pytest.warns(UntrainableWarning):
        opt = LaPerm(torch.optim.SGD(laperm_param_groups(model), lr=0.1), k=1)
    desc = laperm.describe(model, show=False)
    assert {line.name for line in desc.lines if line.permuted} == {n for n, _ in opt.permuted_parameters()}
    for line in desc.lines:
        if line.permuted:
            p = dict(model.named_parameters())[line.name]
            assert to_rows(p, opt.layout_of(p)).shape == (line.rows, line.row_length)


def test_plans_cover_every_trainable_parameter_once():
    model = ViTReplica()
    names = [p.name for p in plan_parameters(model)]
    assert names == [n for n, _ in model.named_parameters()]
    assert is_row_permutation(model.pos_embed, model.pos_embed, RowLayout(unit_dim=1))


def test_verify_reports_what_was_free_and_why():
    from laperm.verify import VerifyReport

    free = [
        {"name": "head.weight", "reason": "untrainable by permutation: every value equals 0"},
        {"name": "fc.bias", "reason": "1-D (permute_biases=False)"},
        {"name": "fc2.bias", "reason": "1-D (permute_biases=False)"},
    ]
    message = VerifyReport(True, ["final.pt"], 1, 10, [], free).message()
    assert "free: head.weight (untrainable by permutation: every value equals 0)" in message
    assert "free: 2 x 1-D (permute_biases=False)" in message


def test_laperm_warns_of_a_tensor_it_cannot_train_in_groups_it_was_given():
    """Groups built by hand (``model.parameters()``) skip laperm_param_groups' check: LaPerm itself names
    such a tensor and the fix, and stays silent where laperm_param_groups already left it free."""
    model = ViTReplica()
    with pytest.warns(UntrainableWarning, match=r"head\.weight \(every value equals 0\).*laperm_param_groups"):
        LaPerm(torch.optim.Adam([{"params": [model.head.weight], "param_names": ["head.weight"]}]), k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LaPerm(torch.optim.Adam(laperm_param_groups(model)), k=2)
    assert len([w for w in caught if issubclass(w.category, UntrainableWarning)]) == 1  # laperm_param_groups' only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LaPerm(torch.optim.Adam([torch.nn.Parameter(torch.randn(4, 3))]), k=2)  # a trainable tensor: no warning
