"""Stacked training in fast mode (issue 22): the stack's step on the fast path's machinery.

On CPU fast mode computes eagerly (no CUDA graph): the member loop is then the single ``--mode fast``
runs' computation (bit for bit), and the graph path is driven with stand-in graphs
(``laperm.engine.fast.GRAPH_FACTORY``, as tests/test_capture_failsafe.py does for single runs).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_capture_failsafe import EagerGraph, FailingCapture
from test_stacked import base_config, files, metrics, quiet, singles

from laperm import checkpoint, verify
from laperm.config import TrainConfig
from laperm.engine import fast as engine_fast
from laperm.engine import stacked
from laperm.engine.capture_harness import check_stack
from laperm.engine.errors import TrainingInterrupted
from laperm.engine.stack_session import plan_stack, train_stack
from laperm.engine.stack_step import StackStep
from laperm.fast.step import CaptureFailedWarning
from laperm.optim import LaPerm
from laperm.rundir import read_run_config

pytestmark = pytest.mark.usefixtures("clean_engine_state")

# F2 on a shared-value init with L2 (fast mode's _foreach_norm penalty) and augmentation (drawn on the device)
F2 = {"model": "f2", "init": "shared:0.05:0.6", "augment": "mnist-paper"}


def fast_stack(out: Path, **kw) -> list[TrainConfig]:
    return plan_stack(base_config(out, **{"mode": "fast", **F2, **kw}), [0, 1], ["laperm", "adam"])


def same_files(a: Path, b: Path, cfgs: list[TrainConfig]) -> None:
    for c in cfgs:
        for name, state in files(a / c.run_name()).items():
            other = files(b / c.run_name())[name]
            assert all(torch.equal(state[k], other[k]) for k in state), (c.run_name(), name)
        assert metrics(a / c.run_name()) == metrics(b / c.run_name())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lenet300", "f2"])
def test_fast_member_loop_equals_single_fast_runs_bit_for_bit(tmp_path, model):
    """The member loop on device-resident batches computes what each single --mode fast run computes."""
    cfgs = (
        fast_stack(tmp_path / "stack")
        if model == "f2"
        else plan_stack(base_config(tmp_path / "stack", model, mode="fast"), [0, 1], ["laperm", "adam"])
    )
    assert len(train_stack(cfgs, vectorize=False, log=quiet)) == 4
    singles(cfgs, tmp_path / "single")
    same_files(tmp_path / "stack", tmp_path / "single", cfgs)
    for c in cfgs:
        if c.optimizer == "laperm":
            assert verify.verify_run(tmp_path / "stack" / c.run_name()).ok


@pytest.mark.slow
def test_fast_stack_trains_verifies_and_resumes_to_the_same_results(tmp_path, monkeypatch):
    """Vectorised fast stack: stopped in epoch 2 (every member checkpoints), resumed: the uninterrupted files."""
    cfgs = fast_stack(tmp_path / "ref", epochs=2, checkpoint_steps=3)
    train_stack(cfgs, log=quiet)
    victim = [TrainConfig(**{**c.to_dict(), "out": str(tmp_path / "victim")}) for c in cfgs]
    monkeypatch.setenv(checkpoint.FAULT_ENV, "int@step:6")
    with pytest.raises(TrainingInterrupted):
        train_stack(victim, log=quiet)
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    assert not (tmp_path / "victim" / cfgs[0].run_name() / "final.pt").exists()
    assert len(train_stack(victim, resume=True, log=quiet)) == 4
    same_files(tmp_path / "ref", tmp_path / "victim", cfgs)
    for c in cfgs:
        if c.optimizer == "laperm":
            assert verify.verify_run(tmp_path / "victim" / c.run_name()).ok


@pytest.mark.parametrize("stand_in", [EagerGraph, FailingCapture])
def test_the_graph_path_computes_the_eager_fast_stack(tmp_path, monkeypatch, stand_in):
    """A stand-in graph that replays the captured body, or one whose capture fails (eager fallback, one
    warning): the same computation as the eager fast stack, so the same weights bit for bit."""
    cfgs = fast_stack(tmp_path / "eager", epochs=1)[1:3]  # (a LaPerm and an Adam member)
    train_stack(cfgs, log=quiet)
    monkeypatch.setattr(engine_fast, "GRAPH_FACTORY", stand_in)
    stand_in.captures = 0
    graphed = [TrainConfig(**{**c.to_dict(), "out": str(tmp_path / "graph")}) for c in cfgs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(train_stack(graphed, log=quiet)) == 2
    failed = [w for w in caught if issubclass(w.category, CaptureFailedWarning)]
    assert stand_in.captures == 1  # captured once (after 3 eager warm-up steps), then replayed
    assert len(failed) == (stand_in is FailingCapture)
    if failed:
        assert str(failed[0].message).startswith("a stack of 2 F2:")
    same_files(tmp_path / "eager", tmp_path / "graph", cfgs)


def test_the_member_loop_is_never_captured(tmp_path):
    from laperm.models import build
    from laperm.models.stacked import LossSpec, StackedModel

    stack = StackedModel([build("lenet300", seed=s) for s in (0, 1)])
    opt = torch.optim.Adam(stack.parameters())
    totals = (torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="cannot be captured"):
        StackStep(stack, opt, LossSpec(), totals, vectorize=False, graph=True, graph_factory=EagerGraph)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_stacked_captured_region_of_conv2_is_capture_safe(precision):
    checker = check_stack("conv2", members=2, precision=precision)
    checker.assert_safe(f"conv2 x2 {precision}")


def test_the_stack_checker_sees_a_host_sync_in_the_stacked_region(monkeypatch):
    """The control: a .item() put into the stacked training pass is found (and named)."""
    from laperm.models.stacked import StackedModel

    train_pass = StackedModel.train_pass

    def syncing(self, *args, **kwargs):
        losses, logits = train_pass(self, *args, **kwargs)
        float(losses.sum())  # a host read: illegal inside a capture
        return losses, logits

    monkeypatch.setattr(StackedModel, "train_pass", syncing)
    checker = check_stack("lenet300", members=2, channels_last=False)
    assert checker.captures == 1
    assert any("_local_scalar_dense" in str(v) or "__float__" in str(v) for v in checker.violations)


@pytest.mark.slow
def test_laperm_run_stacks_fast_mode_runs(tmp_path, monkeypatch, capsys):
    """Runs whose config is fast mode (as the paper experiment's on_cuda settings: fast, channels_last) stack."""
    from laperm import cli
    from laperm.experiments import base
    from laperm.experiments.base import Experiment, Run

    common = dict(model="f1", dataset="synthetic", epochs=1, batch_size=64, val_size=64, k=4)
    fast = dict(common, mode="fast", channels_last=True)
    runs = [Run(dict(fast, seed=s, optimizer=o), {"seed": s, "method": o}) for s in (0, 1) for o in ("laperm", "adam")]
    monkeypatch.setitem(base.EXPERIMENTS, "tinyfast", Experiment("tinyfast", 1, "test", lambda b, s: runs))
    assert cli.main(["run", "tinyfast", "--out", str(tmp_path), "--threads", "1", "--stack"]) == 0
    assert "stacking 4 runs" in capsys.readouterr().out
    folder = tmp_path / "tinyfast"
    manifest = json.loads((folder / "experiment.json").read_text())["runs"]
    assert sorted(e.get("stacked") for e in manifest.values()) == [4, 4, 4, 4]
    for name in manifest:
        assert read_run_config(folder / name)["mode"] == "fast"
        if "-laperm-" in name:
            assert verify.verify_run(folder / name).ok


# -- one sync for all LaPerm members (engine.stack_sync) --------------------------------------------------------


def _laperms(n: int) -> list[LaPerm]:
    """``n`` LaPerm optimizers over small nets (a conv, two linears), two param groups of different k."""
    opts = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 8))
        net.add_module("head", torch.nn.Linear(8, 5))
        groups = [
            {"params": [*net[0].parameters(), *net[2].parameters()], "k": 2},
            {"params": net.head.parameters(), "k": 3},
        ]
        opts.append(LaPerm(torch.optim.Adam(groups, lr=1e-2), k=2))
        opts[-1].param_groups[1]["k"] = 3
    return opts


def _perturb(opts: list[LaPerm], step: int) -> None:
    """Stand in for the inner step: move every weight by a seeded amount."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for opt in opts:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _weights(opts: list[LaPerm]) -> list[torch.Tensor]:
    return [p.detach().clone() for opt in opts for group in opt.param_groups for p in group["params"]]


def test_one_sync_for_all_members_equals_their_own_syncs():
    """Counts, synced flags, hooks and every weight as each member's own LaPerm.step (bit for bit: the
    flat sync's contract), over steps where one group, both, or none is due."""
    own, together = _laperms(3), _laperms(3)
    calls: dict[str, list[tuple[int, int]]] = {"own": [], "together": []}
    for key, opts in (("own", own), ("together", together)):
        for i, opt in enumerate(opts):
            opt.register_sync_hook(lambda o, ps, i=i, key=key: calls[key].append((i, len(ps))))
    for step in range(1, 7):
        _perturb(own, step)
        _perturb(together, step)
        for opt in own:
            opt.after_inner_step()
        assert LaPerm.sync_together(together) == []
        assert all(torch.equal(a, b) for a, b in zip(_weights(own), _weights(together), strict=True)), step
        assert [[g["laperm_step"] for g in o.param_groups] for o in together] == [[step, step]] * 3
        assert [o.is_synced for o in together] == [o.is_synced for o in own]
    assert calls["together"] == calls["own"] and len(calls["own"]) == 3 * 4  # steps 2, 3, 4, 6


def test_one_sync_leaves_a_nan_member_unsynced_and_syncs_the_others():
    opts, reference = _laperms(3), _laperms(3)
    _perturb(opts, 1)
    _perturb(reference, 1)
    with torch.no_grad():
        opts[1].param_groups[0]["params"][0][0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in opts[1].param_groups[0]["params"]]
    assert LaPerm.sync_together(opts) == []  # step 1: nothing due
    assert LaPerm.sync_together(opts) == [1]  # step 2: group 0 due everywhere; member 1 holds a NaN
    for opt in reference:
        for _ in range(2):
            opt.after_inner_step()
    got, want = _weights(opts), _weights(reference)
    n = len(got) // 3
    assert all(torch.equal(a, b) for a, b in zip(got[:n] + got[2 * n :], want[:n] + want[2 * n :], strict=True))
    after = opts[1].param_groups[0]["params"]
    assert all(torch.equal(a.nan_to_num(), b.detach().nan_to_num()) for a, b in zip(before, after, strict=True))
    assert opts[1].param_groups[0]["laperm_step"] == 2


@pytest.mark.slow
def test_a_stack_synced_as_one_trains_as_with_each_members_own_sync(tmp_path, monkeypatch):
    """End to end on CPU (the combined sync is CUDA's default): the same files; a NaN member stops alone."""
    cfgs = fast_stack(tmp_path / "own", epochs=1)
    train_stack(cfgs, log=quiet)
    monkeypatch.setattr(stacked, "SYNC_TOGETHER", True)
    together = [TrainConfig(**{**c.to_dict(), "out": str(tmp_path / "together")}) for c in cfgs]
    train_stack(together, log=quiet)
    same_files(tmp_path / "own", tmp_path / "together", cfgs)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "nan@step:2")
    nan = [TrainConfig(**{**c.to_dict(), "out": str(tmp_path / "nan")}) for c in cfgs]
    lines: list[str] = []
    summaries = train_stack(nan, log=lines.append)
    assert [s["run"] for s in summaries] == [c.run_name() for c in cfgs[1:]]
    assert any("stopped" in line and "NaN" in line for line in lines)


def test_the_stacked_benchmark_times_the_fast_path():
    """benchmarks.stacked in fast mode (CUDA's default) runs StackStep and the one sync; on CPU, eagerly."""
    from benchmarks import stacked as bench

    row = bench.stacked_throughput("lenet300", 2, "cpu", seconds=0.05, batch=4, k=2, mode="fast")
    one = bench.single_throughput("lenet300", "cpu", seconds=0.05, batch=4, k=2, mode="fast")
    assert row["mode"] == one["mode"] == "fast" and row["steps"] % 2 == 0
    assert row["images_per_s"] > 0 and one["images_per_s"] > 0
    assert bench.default_mode("cpu") == "eager"


def test_channels_last_stack_lays_out_grouped_convolutions_and_matches_a_channels_last_run():
    """With channels_last, vmap's grouped convolution sees channels_last views of the stacked weights and
    inputs (no re-layout); member 0's gradients match one channels_last Conv2 step. Tolerance: the grouped
    convolution sums in another order (float32); measured ~3e-6 of each gradient's norm, bound 1e-4."""
    import copy

    import torch.nn.functional as F

    from laperm.models import build
    from laperm.models.stacked import LossSpec, StackedModel

    nets = [build("conv2", seed=s) for s in (0, 1)]
    for m in (m for net in nets for m in net.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # (vmap draws dropout from the stack's stream, the single net from its own)
    single = copy.deepcopy(nets[0]).to(memory_format=torch.channels_last)
    stack = StackedModel(nets, channels_last=True)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    y = torch.randint(0, 10, (2, 4), generator=g)
    x = stack.stack_inputs(xs)
    assert torch.equal(x, torch.stack(xs))
    assert x.movedim(0, 1).reshape(4, 6, 32, 32).is_contiguous(memory_format=torch.channels_last)
    w = stack.params["conv1.weight"]
    assert w.reshape(-1, *w.shape[2:]).is_contiguous(memory_format=torch.channels_last)
    assert nets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)  # a member's view, too
    stack.train_pass(x, y, LossSpec())
    F.cross_entropy(single(xs[0]), y[0]).backward()
    for n, p in single.named_parameters():
        got = stack.params[n].grad[0]
        assert got.stride() == nets[0].get_parameter(n).stride()
        assert float((got - p.grad).norm() / p.grad.norm()) < 1e-4, n
