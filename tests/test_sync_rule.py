"""LaPerm's latent sync rule (``sync_rule="latent"``): exactness, invariants, state, config and CLI."""

import io
import json
import types

import pytest
import torch
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st
from test_optim import batches, make_model
from torch import nn

from laperm import checkpoint, reconnect
from laperm.config import ConfigError, TrainConfig, resolve_config
from laperm.optim import LaPerm, LaPermError


def attach_latent(opt):
    """The research monkeypatch that the latent rule replaced (formerly laperm.experiments.latent),
    kept verbatim as the reference the option must reproduce bit for bit."""
    params = [p for _, p in opt.permuted_parameters()]
    latent = {p: p.detach().clone() for p in params}
    base = opt.base_optimizer
    base_step = base.step
    original_step = opt.step

    def inner_step(self, *args, **kwargs):
        out = base_step(*args, **kwargs)
        with torch.no_grad():
            for p in params:  # the updated inner weights, captured before LaPerm may sync them
                latent[p].copy_(p)
        return out

    @torch.no_grad()
    def step(self, *args, **kwargs):
        forward = {p: p.detach().clone() for p in params}  # the synced weights the gradient was taken at
        for p in params:
            p.copy_(latent[p])
        out = original_step(*args, **kwargs)
        if not self.is_synced:  # no sync due: keep using the last synced weights
            for p in params:
                p.copy_(forward[p])
        return out

    base.step = types.MethodType(inner_step, base)
    opt.step = types.MethodType(step, opt)
    opt.latent_weights = latent
    return opt


def train_steps(model, opt, data, scale=1.0, after_step=None):
    for t, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x) * scale, y).backward()
        opt.step()
        if after_step is not None:
            after_step(t)


def bits(t):
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


def exactly(a, b):
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


# -- the same computation as the research monkeypatch -----------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("init", ["dense", "shared"])
def test_bit_identical_to_the_attach_latent_monkeypatch(k, init):
    kwargs = {"dense": {}, "shared": {"sparse": 0.6, "shared": 0.03}}[init]
    data = batches(11, 14)
    ref_model = make_model(7, **kwargs)
    ref = attach_latent(LaPerm(torch.optim.Adam(ref_model.parameters(), lr=1e-2), k=k))
    model = make_model(7, **kwargs)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=k, sync_rule="latent")
    for t, batch in enumerate(data, start=1):
        train_steps(ref_model, ref, [batch], scale=30.0)
        train_steps(model, opt, [batch], scale=30.0)
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert exactly(p, q), (t, n)
        ours, theirs = opt.latent_weights(), ref.latent_weights
        assert len(ours) == len(theirs) == 3
        for z, q in zip(ours.values(), theirs):
            assert exactly(z, theirs[q]), t
        assert opt.is_synced
    for p, q in zip(model.parameters(), ref_model.parameters()):  # Adam's moments too
        assert exactly(opt.base_optimizer.state[p]["exp_avg"], ref.base_optimizer.state[q]["exp_avg"])


# -- invariants -------------------------------------------------------------------------------


@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    k=st.integers(1, 5),
    steps=st.integers(1, 12),
    granularity=st.sampled_from(["row", "tensor"]),
    seed=st.integers(0, 1000),
)
def test_property_every_step_leaves_rows_permutations_of_theta0(widths, k, steps, granularity, seed):
    torch.manual_seed(seed)
    dims = [5, *widths, 3]
    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=0.05), k=k, granularity=granularity, sync_rule="latent")
    layout = reconnect.RowLayout(granularity)
    g = torch.Generator().manual_seed(seed)
    before = {}
    for t in range(1, steps + 1):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert opt.is_synced  # the model runs on synced weights at every step
        opt.verify()
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                assert reconnect.is_row_permutation(p, theta0[n], layout), (t, n)
                if t % k:  # no sync due: the synced weights stay exactly as they were
                    assert exactly(p, before[n]), (t, n)


def test_latent_weights_are_kept_apart_from_the_model_weights():
    model = make_model(3, sparse=0.5, shared=0.03)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=1, sync_rule="latent")
    train_steps(model, opt, batches(3, 15), scale=30.0)
    named = dict(model.named_parameters())
    latent = opt.latent_weights()
    assert set(latent) == {named[n] for n in ("0.weight", "3.weight", "5.weight")}
    for p, z in latent.items():
        assert not torch.equal(z, p)  # trained on: real-valued, no longer the shared values
        assert not reconnect.is_row_permutation(z, p)
        assert exactly(p, reconnect.rebuild_by_rank(z, theta0[[n for n, q in named.items() if q is p][0]]))
    # inner_weights() puts them in place for a moment and restores the synced ones.
    synced = {p: p.detach().clone() for p in latent}
    with opt.inner_weights():
        assert all(exactly(p, z) for p, z in latent.items())
    assert all(exactly(p, synced[p]) for p in latent)
    # synced_weights() is a no-op; sync() refreshes from the latent ranks (here: already fresh, k=1).
    with opt.synced_weights():
        assert all(exactly(p, synced[p]) for p in latent)
    opt.sync()
    assert all(exactly(p, synced[p]) for p in latent)
    opt.verify()
    # The extra memory is one copy of the permuted weights.
    plain = LaPerm(torch.optim.Adam(make_model(3, sparse=0.5, shared=0.03).parameters()), k=1)
    assert opt.extra_memory_bytes() - plain.extra_memory_bytes() == sum(z.numel() * 4 for z in latent.values())
    assert "sync_rule=latent" in repr(opt)


def test_explicit_sync_between_scheduled_ones_takes_the_latent_ranks():
    model = make_model(4)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=0.05), k=100, sync_rule="latent")
    train_steps(model, opt, batches(4, 10))
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            assert exactly(p, theta0[n])  # no sync yet: still θ0
    seen = []
    opt.register_sync_hook(lambda o, params: seen.append(len(params)))
    opt.sync()
    assert seen == [3]
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            assert exactly(p, reconnect.rebuild_by_rank(opt.latent_weights()[p], theta0[n]))
    assert any(not torch.equal(p, theta0[n]) for n, p in model.named_parameters())


def test_sync_hooks_see_every_scheduled_latent_sync():
    model = make_model(5)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3, sync_rule="latent")
    theta0 = {p: p.detach().clone() for _, p in opt.permuted_parameters()}
    calls = []

    def hook(o, params):
        calls.append(o.param_groups[0]["laperm_step"])
        assert all(reconnect.is_row_permutation(p, theta0[p]) for p in params)

    opt.register_sync_hook(hook)
    train_steps(model, opt, batches(5, 10))
    assert calls == [3, 6, 9]


def test_mixed_groups_only_overwrite_groups_leave_the_synced_state():
    model = make_model(6)
    w = [p for p in model.parameters() if p.dim() >= 2]
    b = [p for p in model.parameters() if p.dim() < 2]
    inner = torch.optim.Adam(
        [{"params": w[:1], "sync_rule": "overwrite"}, {"params": w[1:], "sync_rule": "latent"}, {"params": b}], lr=1e-2
    )
    opt = LaPerm(inner, k=4)
    theta0 = {p: p.detach().clone() for p in w}
    train_steps(model, opt, batches(6, 3))
    assert not opt.is_synced
    assert set(opt.latent_weights()) == set(w[1:])
    for p in w[1:]:
        assert exactly(p, theta0[p])  # latent groups: still the synced θ0 (no sync yet)
    assert not reconnect.is_row_permutation(w[0], theta0[w[0]])  # overwrite group: inner weights
    inner_w0 = w[0].detach().clone()
    with opt.synced_weights():
        assert opt.is_synced
        opt.verify()
        for p in w[1:]:
            assert exactly(p, theta0[p])  # not touched by the temporary sync
    assert exactly(w[0], inner_w0) and not opt.is_synced
    train_steps(model, opt, batches(7, 1))  # step 4: everything syncs
    assert opt.is_synced
    opt.verify()
    for p in w[1:]:
        assert not torch.equal(p, theta0[p])


def test_closure_is_evaluated_at_the_synced_weights():
    model = make_model(8)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=2, sync_rule="latent")
    x, y = batches(8, 1)[0]
    seen = []

    def closure():
        opt.zero_grad()
        seen.append([p.detach().clone() for _, p in opt.permuted_parameters()])
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        synced = [p.detach().clone() for _, p in opt.permuted_parameters()]
        loss = opt.step(closure)
        assert loss is not None and torch.isfinite(loss)
        assert all(exactly(a, b) for a, b in zip(seen[-1], synced))


# -- state ------------------------------------------------------------------------------------


def test_state_dict_round_trip_mid_run_continues_bit_identically():
    data = batches(2, 20)
    model = make_model(4, sparse=0.5, shared=0.03)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3, sync_rule="latent")
    train_steps(model, opt, data[:7], scale=30.0)  # stop between syncs
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert sum("laperm_latent" in st for st in opt.state_dict()["state"].values()) == 3
    train_steps(model, opt, data[7:], scale=30.0)

    buf.seek(0)
    saved = torch.load(buf)
    model2 = make_model(99)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2 = LaPerm(torch.optim.Adam(model2.parameters(), lr=1e-2), k=3, sync_rule="latent")
    before = {p: z for p, z in opt2.latent_weights().items()}
    opt2.load_state_dict(saved["opt"])
    assert opt2.is_synced
    assert all(opt2.latent_weights()[p] is z for p, z in before.items())  # loaded in place
    train_steps(model2, opt2, data[7:], scale=30.0)
    for p, q in zip(model2.parameters(), model.parameters()):
        assert exactly(p, q)
    for z2, z in zip(opt2.latent_weights().values(), opt.latent_weights().values()):
        assert exactly(z2, z)
    assert opt2.param_groups[0]["laperm_step"] == 20
    assert opt2.param_groups[0]["sync_rule"] == "latent"


def test_state_dicts_of_the_other_rule_are_refused_and_old_ones_still_load():
    model = make_model(1)
    overwrite = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=3)
    train_steps(model, overwrite, batches(1, 4))
    state = overwrite.state_dict()
    assert not any("laperm_latent" in st for st in state["state"].values())
    # A state_dict written before sync_rule existed: no such key in its param groups.
    old = {**state, "param_groups": [{k: v for k, v in g.items() if k != "sync_rule"} for g in state["param_groups"]]}
    fresh = LaPerm(torch.optim.Adam(make_model(1).parameters(), lr=1e-2), k=3)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["sync_rule"] == "overwrite" and fresh.param_groups[0]["laperm_step"] == 4
    latent = LaPerm(torch.optim.Adam(make_model(1).parameters(), lr=1e-2), k=3, sync_rule="latent")
    for foreign in (state, old):
        with pytest.raises(LaPermError, match="sync_rule 'overwrite'.*this optimizer 'latent'"):
            latent.load_state_dict(foreign)
    assert latent.param_groups[0]["laperm_step"] == 0  # nothing was loaded
    with pytest.raises(LaPermError, match="sync_rule 'latent'"):
        fresh.load_state_dict(latent.state_dict())
    damaged = latent.state_dict()
    for entry in damaged["state"].values():
        if "laperm_latent" in entry:
            entry["laperm_latent"] = torch.zeros(1)
    with pytest.raises(LaPermError, match="latent weights of .* are damaged"):
        latent.load_state_dict(damaged)
    missing = latent.state_dict()
    for entry in missing["state"].values():
        entry.pop("laperm_latent", None)
    with pytest.raises(LaPermError, match="latent weights for different parameters"):
        latent.load_state_dict(missing)


@pytest.mark.cuda
def test_latent_weights_load_onto_the_parameters_device():
    model = make_model(2)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=2, sync_rule="latent")
    train_steps(model, opt, batches(2, 3))
    state = opt.state_dict()
    gpu = make_model(2).cuda()
    gpu.load_state_dict(model.state_dict())
    opt2 = LaPerm(torch.optim.Adam(gpu.parameters(), lr=1e-2), k=2, sync_rule="latent")
    opt2.load_state_dict(state)
    for p, z in opt2.latent_weights().items():
        assert z.device == p.device
    assert all(torch.equal(a.cpu(), b) for a, b in zip(opt2.latent_weights().values(), opt.latent_weights().values()))


# -- bad input --------------------------------------------------------------------------------


def test_bad_sync_rule_is_refused_and_the_rule_cannot_change_later():
    params = make_model(0).parameters
    with pytest.raises(LaPermError, match="sync_rule must be 'overwrite'.*or 'latent'.*got 'bogus'"):
        LaPerm(torch.optim.Adam(params()), sync_rule="bogus")
    with pytest.raises(LaPermError, match="got 'lattent'"):
        LaPerm(torch.optim.Adam([{"params": list(params()), "sync_rule": "lattent"}]))
    model = make_model(0)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=1, sync_rule="latent")
    opt.param_groups[0]["sync_rule"] = "overwrite"
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LaPermError, match="changed from 'latent' to 'overwrite'"):
        train_steps(model, opt, batches(0, 1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # refused before any change
    model = make_model(0)
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-2), k=1)
    opt.param_groups[0]["sync_rule"] = "latent"
    with pytest.raises(LaPermError, match="changed from 'overwrite' to 'latent'"):
        train_steps(model, opt, batches(0, 1))


# -- config and command line --------------------------------------------------------------------


def test_config_field_validation():
    assert TrainConfig().sync_rule == "overwrite"
    assert resolve_config({"sync_rule": "latent"}).sync_rule == "latent"
    for bad in ("bogus", "", None, 1, "Latent"):
        with pytest.raises(ConfigError, match="sync_rule must be 'overwrite'.*--sync-rule overwrite or latent"):
            TrainConfig(sync_rule=bad).validate()
    # (run names at the default: tests/test_logit_scale.py::test_fields_added_later_keep_run_names)


TINY = [
    "--model",
    "f2",
    "--dataset",
    "synthetic",
    "--val-size",
    "64",
    "--epochs",
    "2",
    "--k",
    "1",
    "--batch-size",
    "32",
    "--checkpoint-steps",
    "4",
    "--logit-scale",
    "100",
    "--sync-rule",
    "latent",
    "--threads",
    "1",
    "--no-progress",
]


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("laperm: error: "), err
    assert "Traceback" not in err
    return lines[0]


pytestmark = pytest.mark.usefixtures("clean_engine_state")


def test_cli_latent_run_resumes_bit_identically_after_sigterm(tmp_path, capsys, monkeypatch):
    rc, out, err = run_cli(capsys, "train", *TINY, "--out", str(tmp_path), "--name", "ref")
    assert rc == 0, err
    assert "k=1, latent sync rule" in out
    ref = tmp_path / "ref"
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["verified"]  # laperm verify passed on final.pt and best.pt
    opt_state = checkpoint.load(checkpoint.list_checkpoints(ref / "checkpoints")[0])["optimizer"]
    assert sum("laperm_latent" in st for st in opt_state["state"].values()) == 3  # the F2 net's three weight matrices

    # SIGTERM (through the real handler) at step 9: epoch 1, between checkpoints.
    monkeypatch.setenv(checkpoint.FAULT_ENV, "term@step:9")
    rc, _, err = run_cli(capsys, "train", *TINY, "--out", str(tmp_path), "--name", "run")
    run = tmp_path / "run"
    assert rc == 3 and "stopped by SIGTERM at step 9" in one_error_line(err)
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    rc, out, err = run_cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert "step 9" in out
    for name in ("final.pt", "best.pt"):
        a, b = checkpoint.load(ref / name)["model"], checkpoint.load(run / name)["model"]
        assert a.keys() == b.keys() and all(exactly(a[k], b[k]) for k in a), name

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in {"epoch_time_s", "images_per_s"}} for r in rs]

    from laperm import rundir

    assert strip(rundir.read_metrics(ref / "metrics.jsonl")) == strip(rundir.read_metrics(run / "metrics.jsonl"))

    # The rule changes results: it cannot change on resume.
    rc, _, err = run_cli(capsys, "train", "--resume", str(run), "--sync-rule", "overwrite")
    assert rc == 2
    assert "cannot change sync_rule ('latent' -> 'overwrite') when resuming" in one_error_line(err)
    # And an overwrite run of the same settings is a different run, with different weights.
    over = [a if a != "latent" else "overwrite" for a in TINY]
    assert run_cli(capsys, "train", *over, "--out", str(tmp_path), "--name", "over")[0] == 0
    c = checkpoint.load(tmp_path / "over" / "final.pt")["model"]
    a = checkpoint.load(ref / "final.pt")["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cli_bogus_sync_rule_is_one_clean_error_line(capsys):
    rc, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--sync-rule", "bogus", "--no-progress")
    assert rc == 2
    line = one_error_line(err)
    assert "sync_rule must be 'overwrite'" in line and "got 'bogus'" in line
