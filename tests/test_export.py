"""Compact checkpoints (`laperm export`): bit-exact round trips, size targets, damaged files."""

import numpy as np
import pytest
import torch
from torch import nn

from laperm import cli, export, reconnect, verify
from laperm.config import TrainConfig, resolve_config
from laperm.export import CompactFormatError
from laperm.optim import LaPerm, laperm_param_groups
from laperm.reconnect import RowLayout
from laperm.train import build_model, build_optimizer


def bits_equal(a: dict, b: dict) -> bool:
    """Same keys in the same order, and every tensor equal bit for bit (-0.0 != 0.0)."""
    return list(a) == list(b) and all(export._same_bits(a[k], b[k]) for k in a)


def permute_rows(state: dict, layouts: dict, seed: int = 0) -> dict:
    """A copy of ``state`` with every permuted row shuffled, as training would leave it."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    for name, layout in layouts.items():
        rows = reconnect.to_rows(out[name], layout).clone()
        perm = torch.argsort(torch.rand(rows.shape, generator=g), dim=1)
        reconnect.from_rows_(out[name], rows.gather(1, perm), layout)
    return out


def trained_like(cfg: TrainConfig, seed: int = 0):
    """(final state, θ0, layouts, recipe) for ``cfg``'s model with randomly permuted rows."""
    model, _ = build_model(cfg, torch.device("cpu"))
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(cfg, model)
    layouts = {name: opt.layout_of(p) for name, p in opt.permuted_parameters()}
    recipe = {"model": cfg.model, "init": cfg.init, "seed": cfg.seed}
    return permute_rows(theta0, layouts, seed), theta0, layouts, recipe


@pytest.fixture(scope="module")
def conv7():
    return trained_like(resolve_config({"preset": "conv7", "seed": 3}))


@pytest.fixture(scope="module")
def f2():
    return trained_like(resolve_config({"preset": "f2"}))


def test_conv7_dense_round_trip_and_size(conv7):
    final, theta0, layouts, recipe = conv7
    assert "conv1.bias" in layouts and "fc.bias" in layouts  # Conv7 permutes its biases too
    data = export.encode_compact(final, theta0, layouts, recipe=recipe)
    back = export.decode_compact(data).state_dict  # θ0 rebuilt from the recipe
    assert bits_equal(back, final)
    ratio = len(data) / export.state_dict_nbytes(final)
    assert ratio <= 0.4, ratio
    header, _ = export._parse(data, "x")
    bits = {e["name"]: e["bits"] for e in header["tensors"] if e["kind"] == "codes"}
    assert bits["conv6.weight"] == 11 and bits["conv1.weight"] == 4  # ceil(log2(1600)), ceil(log2(9))


def test_f2_shared_value_is_a_bit_mask_and_small(f2):
    final, theta0, layouts, recipe = f2
    data = export.encode_compact(final, theta0, layouts, recipe=recipe)
    assert bits_equal(export.decode_compact(data).state_dict, final)
    assert len(data) <= export.state_dict_nbytes(final) / 16
    header, _ = export._parse(data, "x")
    assert {e["bits"] for e in header["tensors"] if e["kind"] == "codes"} == {1}


def test_pruned_rows_keep_signed_zeros_apart():
    torch.manual_seed(0)
    lin = nn.Linear(50, 6)
    with torch.no_grad():
        w = lin.weight
        w[torch.rand(w.shape) < 0.9] = 0.0
        w[:, ::3] = -0.0  # both zeros in every row
        w[0, 5] = w[0, 7] = 0.25  # a tie between non-zeros
    theta0 = {k: v.clone() for k, v in lin.state_dict().items()}
    layouts = {"weight": RowLayout()}
    final = permute_rows(theta0, layouts, seed=1)
    data = export.encode_compact(final, theta0, layouts)
    back = export.decode_compact(data, theta0).state_dict
    assert bits_equal(back, final)
    neg = torch.signbit(final["weight"]) & (final["weight"] == 0)
    assert neg.any() and torch.equal(torch.signbit(back["weight"]) & (back["weight"] == 0), neg)
    with pytest.raises(CompactFormatError, match="neither θ0 nor a recipe"):
        export.decode_compact(data)


def test_conv_transpose_layout_after_real_laperm_steps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 5, 5))  # materialise the lazy layer
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model, permute_biases=True), lr=0.05), k=2)
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(8, 4, 5, 5)).square().mean().backward()
        opt.step()
    layouts = {name: opt.layout_of(p) for name, p in opt.permuted_parameters()}
    assert layouts["0.weight"].transposed and layouts["0.weight"].groups == 2
    final = model.state_dict()
    assert not torch.equal(final["0.weight"], theta0["0.weight"])
    path = tmp_path / "m.laperm"
    export.save_compact(path, final, theta0, layouts, with_theta0=True)
    assert bits_equal(export.load_compact(path), final)
    assert verify.verify_compact(path).ok


def test_unsynced_weights_are_refused(f2):
    final, theta0, layouts, _ = f2
    moved = dict(final, **{"fc2.weight": final["fc2.weight"] + 1e-3})
    with pytest.raises(ValueError, match="fc2.weight: row 0 is not a permutation"):
        export.encode_compact(moved, theta0, layouts)


@pytest.mark.parametrize("bits,count", [(1, 13), (3, 70_001), (11, 65_536 + 9), (31, 40)])
def test_bit_packing_round_trip(bits, count):
    codes = np.random.default_rng(bits).integers(0, 2**bits, count)
    data = export.pack_bits(codes, bits)
    assert len(data) == (bits * count + 7) // 8
    assert np.array_equal(export.unpack_bits(data, bits, count), codes)


def test_damaged_files_give_clear_errors(tmp_path, f2, capsys):
    final, theta0, layouts, recipe = f2
    data = export.encode_compact(final, theta0, layouts, recipe=recipe)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    cases = {"flipped": bytes(flipped), "truncated": data[:-100], "tiny": data[:5], "other": b"PK\x03\x04" * 20}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CompactFormatError, match="damaged|not a laperm compact"):
            export.load_compact(tmp_path / name)
    # `laperm verify` on a damaged file: one line, exit code 2, no traceback.
    assert cli.main(["verify", str(tmp_path / "flipped")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("laperm: error:") and "checksum" in err and len(err.splitlines()) == 1
    # A valid checksum over inconsistent content (codes that do not permute θ0) is caught too.
    header, blobs = export._parse(data, "x")
    e = next(e for e in header["tensors"] if e["kind"] == "codes" and e["name"] == "fc3.weight")
    body = bytearray(data[:-32])
    start = len(data) - 32 - len(blobs) + e["offset"]
    body[start : start + e["nbytes"]] = b"\xff" * e["nbytes"]  # every position gets the value v
    forged = bytes(body) + __import__("hashlib").sha256(bytes(body)).digest()
    with pytest.raises(CompactFormatError, match="fc3.weight: decoded rows are not permutations"):
        export.decode_compact(forged)
    # The wrong θ0 (another seed) is detected, not silently decoded into other weights.
    other = {k: v.clone() for k, v in theta0.items()}
    other["fc1.weight"] = other["fc1.weight"].flip(1)
    with pytest.raises(CompactFormatError, match="θ0 .* differ"):
        export.decode_compact(data, other)


def test_cli_export_check_and_verify(tmp_path, capsys):
    assert (
        cli.main(
            [
                "train",
                "--dataset",
                "synthetic",
                "--preset",
                "f1",
                "--epochs",
                "1",
                "--k",
                "2",
                "--val-size",
                "64",
                "--out",
                str(tmp_path),
                "--name",
                "r",
                "--no-progress",
            ]
        )
        == 0
    )
    run = tmp_path / "r"
    capsys.readouterr()
    assert cli.main(["export", str(run), "--check"]) == 0
    out = capsys.readouterr().out
    assert "1 bits" in out and "reloads bit-exactly" in out
    assert cli.main(["verify", str(run / "final.laperm")]) == 0
    assert "verified: 7,840 permuted weights" in capsys.readouterr().out
    assert cli.main(["export", str(run), "--which", "best", "--with-theta0", "-o", str(tmp_path / "b.laperm")]) == 0
    assert (tmp_path / "b.laperm").stat().st_size > 7840 * 4  # θ0 itself is inside
    assert cli.main(["verify", str(tmp_path / "b.laperm")]) == 0
