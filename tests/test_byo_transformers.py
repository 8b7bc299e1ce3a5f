"""LaPerm on ``transformers`` models built from tiny configs (nothing downloaded): GPT-2, LLaMA, BERT, ViT.

Each trains a few steps under both sync rules and syncs; then every output unit's incoming weights
are checked to be a permutation of their initial ones, with the unit found here independently of
laperm (``Conv1D``: a column; ``nn.Linear``/``nn.Embedding``: a row; a ``(1, L, D)`` parameter: a
position), and a mid-run ``state_dict`` must resume exactly.  Only names that laperm 0.1 already had
are imported at module level, so the GPT-2 test also runs against an older checkout.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from laperm import LaPerm, laperm_param_groups  # noqa: E402

WIDTH, LAYERS, VOCAB, SEQ = 32, 2, 40, 8


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=LAYERS, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
        )
    )


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=SEQ, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=8,
        patch_size=4, num_channels=1, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "vit": _vit}


def _batch(name: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    if name == "vit":
        return {"pixel_values": torch.randn(4, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    if name == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def _build(name: str, rule: str) -> tuple[nn.Module, LaPerm]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()  # (eval: no dropout, so a resumed run is exact)
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=2, sync_rule=rule)
    return model, opt


def _train(model: nn.Module, opt: LaPerm, name: str, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(**_batch(name, g)).loss.backward()
        opt.step()


def _units(module: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """Each output unit's incoming weights as a row, found from the module type alone (not from laperm)."""
    if type(module).__name__ == "Conv1D":  # (in, out): a unit is a column
        return p.detach().t()
    if p.dim() == 3 and p.shape[0] == 1:  # (1, L, D) direct parameter: a unit is a position
        return p.detach()[0]
    return p.detach().reshape(p.shape[0], -1)


def _unit_checks(model: nn.Module, theta0: dict[str, torch.Tensor]) -> dict[str, bool]:
    """``{name: every unit of it is a permutation of its initial unit}`` for every 2+-dim parameter."""
    out, modules = {}, dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            module = modules[name.rpartition(".")[0]]
            now, then = _units(module, p), _units(module, theta0[name])
            out[name] = torch.equal(now.sort(dim=1).values, then.sort(dim=1).values)
    return out


def test_gpt2_conv1d_columns_are_permutations_of_their_initial_columns():
    """Fails on laperm before issue 28, which permuted Conv1D's rows (its input units)."""
    model, opt = _build("gpt2", "overwrite")
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 4 * LAYERS
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, "gpt2", 4, seed=1)
    opt.sync()
    checks = _unit_checks(model, theta0)
    weights = dict(model.named_parameters())
    for name in conv1d:
        assert not torch.equal(weights[f"{name}.weight"], theta0[f"{name}.weight"]), name  # it reconnected
        assert checks[f"{name}.weight"], f"{name}.weight: a column is not a permutation of its initial column"


@pytest.mark.parametrize("rule", ["overwrite", "latent"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_unit_is_a_permutation_nothing_constant_is_silently_permuted_and_resume_is_exact(name, rule):
    from laperm import describe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt = _build(name, rule)
    warned = " ".join(str(w.message) for w in caught)
    desc = {line.name: line for line in describe(model, show=False).lines}
    permuted = {n for n, _ in opt.permuted_parameters()}
    assert permuted == {n for n, line in desc.items() if line.permuted}
    params = dict(model.named_parameters())
    for n, line in desc.items():
        if n in permuted and line.min_distinct == 1:  # only a zero row may be constant (Embedding's padding_idx)
            rows = params[n].detach().reshape(line.rows, -1)
            constant = rows.eq(rows[:, :1]).all(dim=1)
            assert rows[constant].eq(0).all() and not constant.all(), f"{n} is permuted but holds a constant row"
        if "untrainable" in line.reason:
            assert n in warned, f"{n} left free without a warning"
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, name, 3, seed=1)  # k=2: one scheduled sync, then one step past it
    mid_model = {n: t.clone() for n, t in model.state_dict().items()}
    mid_opt = copy.deepcopy(opt.state_dict())  # (its tensors are the live ones)
    _train(model, opt, name, 3, seed=2)
    opt.sync()
    opt.verify()
    checks = _unit_checks(model, theta0)
    assert all(checks[n] for n in permuted), [n for n in permuted if not checks[n]]
    assert any(not torch.equal(dict(model.named_parameters())[n], theta0[n]) for n in permuted)

    again, opt2 = _build(name, rule)
    again.load_state_dict(mid_model)
    opt2.load_state_dict(mid_opt)
    _train(again, opt2, name, 3, seed=2)
    opt2.sync()
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} {rule}: {n} differs after resuming"


def test_vit_position_embedding_has_one_row_per_position():
    from laperm.optim import permuted_layouts
    from laperm.reconnect import RowLayout

    model = _vit()
    layouts = permuted_layouts(model)
    assert layouts["vit.embeddings.position_embeddings"] == RowLayout(unit_dim=1)
    assert layouts["vit.embeddings.cls_token"] == RowLayout()  # (1, 1, D): one row of D values
