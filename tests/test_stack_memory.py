"""A stack's memory is checked before anything is made: the estimate, the limit, the largest stack that fits.

The 100,001-seed case of issue 33 made 24,835 run folders in a minute before this check existed;
now it is refused from one model's size, in well under 2 s, with nothing written.
"""

from __future__ import annotations

import re
import sys
import time

import pytest
import torch
from conftest import run_cli, time_limit

from laperm import models
from laperm.config import ConfigError, resolve_config
from laperm.engine import stack_memory
from laperm.engine.stack_memory import USABLE_FRACTION, check_stack_memory, member_cost
from laperm.optim import permuted_layouts

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _here(monkeypatch, tmp_path, clean_engine_state):
    monkeypatch.chdir(tmp_path)  # whatever a command would write lands here, where the test looks


def test_the_100001_seed_stack_is_refused_in_under_2_s_naming_the_largest_that_fits(capsys, tmp_path):
    """Issue 33: ``laperm train --model lenet300 --seeds 0-100000`` made run folders for a minute; now one
    line with the estimate, the limit and the largest stack that fits here, and nothing on disk."""
    models.build("lenet300", seed=0)  # (torch's own first-call costs are not the check's)
    t0 = time.perf_counter()
    with time_limit(20):  # (before the check, this command made folders until killed)
        rc, out, err = run_cli(capsys, "train", "--model", "lenet300", "--seeds", "0-100000", "--epochs", "1")
    elapsed = time.perf_counter() - t0
    assert rc == 2, (out, err)
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("laperm: error: a stack of 100,001 lenet300 runs needs")
    assert elapsed < 2.0, f"the refusal took {elapsed:.2f} s"
    assert list(tmp_path.iterdir()) == [], "a refused stack must not leave anything behind"
    found = re.search(r"needs about ([\d.]+) GiB .* the limit is ([\d.]+) (GiB|MiB) .*", line)
    assert found and "activations" in line and "not counted" in line, line
    fits = re.search(r"the largest stack that fits is ([\d,]+) runs \(--seeds 0-(\d+)\)", line)
    assert fits, line
    largest = int(fits.group(1).replace(",", ""))
    assert largest == int(fits.group(2)) + 1 and 2 <= largest < 100_001
    # and that stack is accepted by the check (half of it: other processes on this machine may take memory meanwhile)
    base = resolve_config(None, {"model": "lenet300"})
    check_stack_memory(base, ["laperm"] * (largest // 2), CPU)


def _bytes_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(stack_memory, "free_bytes", lambda device: free)


def test_the_largest_stack_named_fits_and_one_more_does_not(monkeypatch):
    base = resolve_config(None, {"model": "f1"})
    cost = member_cost(base)
    per_member = cost.device + cost.host  # (the CPU: one memory holds both)
    _bytes_free(monkeypatch, int(10.5 * per_member / USABLE_FRACTION))
    check_stack_memory(base, ["laperm"] * 10, CPU)  # fits: no error
    with pytest.raises(
        ConfigError, match=r"a stack of 11 f1 runs .* the largest stack that fits is 10 runs \(--seeds 0-9\)"
    ):
        check_stack_memory(base, ["laperm"] * 11, CPU)
    # two optimizers: whole seeds of both
    with pytest.raises(
        ConfigError, match=r"the largest stack that fits is \d+ runs \(--seeds 0-\d+ with 2 optimizers\)"
    ):
        check_stack_memory(base, ["laperm"] * 20 + ["adam"] * 20, CPU)
    _bytes_free(monkeypatch, per_member)
    with pytest.raises(ConfigError, match="not even two runs fit: train them alone"):
        check_stack_memory(base, ["laperm"] * 2, CPU)


def test_the_estimate_counts_the_copies_training_keeps():
    """weights + gradients + the inner state per parameter (buffers once), plus three copies of LaPerm's
    permuted weights (sorted θ0, set-aside/latent, previous synced), in bytes of float32."""
    base = resolve_config(None, {"model": "conv2"})  # (BatchNorm buffers; biases not permuted)
    net = models.build("conv2", seed=0)
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers() if b.is_floating_point())
    named = dict(net.named_parameters())
    permuted = sum(named[n].numel() for n in permuted_layouts(net, False))
    assert 0 < permuted < params and buffers > 0
    laperm, adam = member_cost(base, "laperm"), member_cost(base, "adam")
    assert adam.device == 4 * (params + buffers + params + 2 * params)
    assert laperm.device == adam.device + 4 * 3 * permuted
    assert laperm.host == adam.host == 4 * 2 * (params + buffers)
    sgd = resolve_config(None, {"model": "conv2", "optimizer": "sgd"})
    assert member_cost(sgd).device == 4 * (params + buffers + params + params)  # momentum: one copy


def test_cuda_checks_the_device_and_the_host_memory(monkeypatch):
    base = resolve_config(None, {"model": "lenet300"})
    cost = member_cost(base)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * cost.device, 80 * 2**30))
    monkeypatch.setattr(stack_memory, "_host_free", lambda: 100 * 2**30)
    check_stack_memory(base, ["laperm"] * 2, torch.device("cuda"))  # 2 x device < 80% of 3 x device
    with pytest.raises(ConfigError, match="free memory of cuda"):
        check_stack_memory(base, ["laperm"] * 3, torch.device("cuda"))
    monkeypatch.setattr(stack_memory, "_host_free", lambda: cost.host)  # now the host copies do not fit
    with pytest.raises(ConfigError, match="free host memory"):
        check_stack_memory(base, ["laperm"] * 2, torch.device("cuda"))


def test_free_memory_without_proc_meminfo(monkeypatch, tmp_path):
    monkeypatch.setattr(stack_memory, "MEMINFO", tmp_path / "no-meminfo")
    psutil = pytest.importorskip("psutil")
    assert stack_memory.free_bytes(CPU) == pytest.approx(psutil.virtual_memory().available, rel=0.5)
    monkeypatch.setitem(sys.modules, "psutil", None)  # neither: the check says it cannot check
    assert stack_memory.free_bytes(CPU) is None
    base = resolve_config(None, {"model": "lenet300"})
    with pytest.warns(UserWarning, match="memory is not checked"):
        check_stack_memory(base, ["laperm"] * 100_001, CPU)


def test_laperm_run_refuses_a_stack_that_does_not_fit_before_writing(capsys, monkeypatch, tmp_path):
    from laperm.experiments import base as experiments
    from laperm.experiments.base import Experiment, Run

    common = dict(model="f1", dataset="synthetic", epochs=1, val_size=64)
    runs = [Run(dict(common, seed=s), {"seed": s}) for s in range(4)]
    monkeypatch.setitem(experiments.EXPERIMENTS, "tiny", Experiment("tiny", 1, "test", lambda b, s: runs))
    _bytes_free(monkeypatch, 1000)
    rc, out, err = run_cli(capsys, "run", "tiny", "--out", "results", "--stack")
    assert rc == 2 and err.startswith("laperm: error: a stack of 4 f1 runs needs"), err
    assert "or train these runs alone with --no-stack" in err
    assert list(tmp_path.iterdir()) == []
