"""Analysis computations on tiny models with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from laperm.analysis import plots
from laperm.analysis.dynamics import SyncRecorder, moved_per_layer
from laperm.analysis.profiles import layer_profiles, profile_drift, profile_spread
from laperm.analysis.rebuild import permutable_layouts, random_permutation_state, rebuild_state
from laperm.optim import LaPerm, laperm_param_groups
from laperm.reconnect import RowLayout, is_row_permutation


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def test_permutable_layouts_pick_kernels_and_optionally_biases():
    m = tiny()
    assert set(permutable_layouts(m)) == {"0.weight", "3.weight"}
    with_bias = permutable_layouts(m, permute_biases=True)
    assert set(with_bias) == {"0.weight", "3.weight", "0.bias", "3.bias"}  # never BatchNorm's
    convt = permutable_layouts(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2)))
    assert convt["0.weight"] == RowLayout("row", transposed=True, groups=2)


def test_rebuild_of_a_monotone_transform_gives_back_the_init():
    m = tiny()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    # "Training" that keeps every row's ranks: an increasing map of the weights.
    trained = {k: (3 * v + 1 if v.dim() >= 2 else v + 5) for k, v in init.items()}
    layouts = permutable_layouts(m)
    out = rebuild_state(trained, init, layouts)
    for name in layouts:
        assert torch.equal(out[name], init[name])
    assert torch.equal(out["0.bias"], trained["0.bias"])  # not permuted: left as trained


def test_rebuild_puts_init_values_at_trained_ranks():
    init = {"w": torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])}
    trained = {"w": torch.tensor([[0.5, -1.0, 0.0], [7.0, 9.0, 8.0]])}
    out = rebuild_state(trained, init, {"w": RowLayout()})
    assert out["w"].tolist() == [[3.0, 1.0, 2.0], [10.0, 30.0, 20.0]]


def test_random_permutation_keeps_row_multisets():
    m = tiny()
    init = m.state_dict()
    layouts = permutable_layouts(m)
    out = random_permutation_state(init, init, layouts, torch.Generator().manual_seed(1))
    for name, layout in layouts.items():
        assert is_row_permutation(out[name], init[name], layout)
        assert not torch.equal(out[name], init[name])  # 27 and 48 entries per row: a shuffle moves some


def test_profile_spread_known_values():
    assert profile_spread(torch.tensor([[3.0, 1.0, 2.0], [2.0, 3.0, 1.0]])) == 0.0  # permutations: one profile
    # sorted rows [0, 1] and [0, 3]: total variance 6, around the mean profile [0, 2] only 2
    assert profile_spread(torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx(1 / 3)
    assert profile_spread(torch.zeros(2, 3)) == 0.0


def test_profile_drift_known_values():
    w = torch.randn(4, 10)
    perm = w[:, torch.randperm(10)]
    assert profile_drift(perm, w) == pytest.approx(0.0)  # LaPerm never changes a profile
    assert profile_drift(2 * w, w) == pytest.approx(1.0)
    d = layer_profiles({"w": perm}, {"w": w}, {"w": RowLayout()})["w"]
    assert d["units"] == 4 and d["drift"] == pytest.approx(0.0)
    assert d["spread_init"] == pytest.approx(d["spread_trained"])
    assert len(d["profiles_trained"]) == 4 and len(d["profiles_trained"][0]) == 10


def test_moved_per_layer_known_values():
    a = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0]), "y": torch.ones(2, 2)}
    b = {"x": torch.tensor([2.0, 1.0, 3.0, 4.0]), "y": torch.ones(2, 2)}
    assert moved_per_layer(a, b) == {"x": 0.5, "y": 0.0}
    with pytest.raises(ValueError):
        moved_per_layer(a, {"x": torch.ones(3), "y": torch.ones(2, 2)})


def test_sync_recorder_sees_each_scheduled_sync():
    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False)
    opt = LaPerm(torch.optim.SGD(laperm_param_groups(model), lr=0.5), k=2)
    rec = SyncRecorder(snapshot=("weight",)).attach(opt)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert [r["step"] for r in rec.records] == [2, 4]
    for r in rec.records:
        assert set(r["moved"]) == {"weight"} and 0.0 <= r["moved_total"] <= 1.0
    assert len(rec.snapshots) == 3  # θ0 and one per sync
    assert [s for s, _ in rec.snapshots] == [0, 2, 4]
    # a large lr on 6 weights per row moves something at the first sync
    assert rec.records[0]["moved"]["weight"] > 0


def test_plots_write_files(tmp_path):
    assert plots.lines(tmp_path / "l.png", {"a": ([1, 2], [3, 4])}, logx=True, hline=(1, "c")).is_file()
    assert plots.bars(tmp_path / "b.png", ["F1", "F2"], {"x": [1, 2]}, {"x": [0.1, 0.2]}).is_file()
    layers = layer_profiles({"w": torch.randn(3, 5)}, {"w": torch.randn(3, 5)}, {"w": RowLayout()})
    assert plots.profiles_figure(tmp_path / "p.png", layers).is_file()
    syncs = [{"step": 2, "moved": {"w": 0.1}}, {"step": 4, "moved": {"w": 0.0}}]
    assert plots.dynamics_figure(tmp_path / "d.png", {"f1": syncs}).is_file()
    snaps = np.random.default_rng(0).random((3, 10, 784)).astype(np.float16)
    assert plots.templates_grid(tmp_path / "t.png", [0, 1, 2], snaps).is_file()
    gif = plots.templates_gif(tmp_path / "t.gif", [0, 1, 2], snaps)
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.size == (5 * 28 * 3, 2 * 28 * 3)
