"""The device-resident step: on CPU it must train exactly as the plain eager loop does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laperm.data.augment import PRESETS, Augment
from laperm.data.device import DeviceBatches
from laperm.fast.step import DeviceStep, _check_capturable, l2_penalty, make_adam
from laperm.optim import LaPerm, LaPermError, laperm_param_groups


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(32, 10),
    )


def _optimizer(model: nn.Module, laperm: bool, k: int = 4) -> torch.optim.Optimizer:
    inner = make_adam(laperm_param_groups(model), lr=3e-3, eps=1e-7, device="cpu")
    return LaPerm(inner, k=k) if laperm else inner


def _data() -> DeviceBatches:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    return DeviceBatches(
        x, torch.randint(0, 10, (64,), generator=g), 8, seed=2, device="cpu", augment=Augment(**PRESETS["cifar-paper"])
    )


def _plain_loop(laperm: bool, l2: float, steps: int, penalty=l2_penalty) -> tuple[nn.Sequential, float, float]:
    """What ``laperm train``'s loop body does (loss_scale="sum"), written out by hand."""
    model = _net()
    opt = _optimizer(model, laperm)
    l2_params = [m.weight for m in model if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    data, loss_acc, correct, seen = _data(), 0.0, 0, 0
    torch.manual_seed(7)  # dropout
    for _, (xb, yb) in zip(range(steps), _forever(data), strict=False):
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        if l2:
            loss = loss + l2 * penalty(l2_params)
        opt.zero_grad(set_to_none=True)
        (loss * len(yb)).backward()
        opt.step()
        loss_acc += float(loss.detach().double()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
    return model, loss_acc / seen, correct / seen


def _fast(laperm: bool, l2: float, steps: int, **kw) -> tuple[nn.Sequential, dict[str, float], DeviceStep]:
    model = _net()
    opt = _optimizer(model, laperm)
    l2_params = [m.weight for m in model if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    step = DeviceStep(model, opt, l2=l2, l2_params=l2_params, loss_scale="sum", **kw)
    torch.manual_seed(7)
    for _, (xb, yb) in zip(range(steps), _forever(_data()), strict=False):
        step(xb, yb)
    return model, step.read_metrics(), step


def _forever(data: DeviceBatches):
    while True:
        yield from data


@pytest.mark.parametrize("laperm", [True, False])
@pytest.mark.parametrize("l2", [0.0, 1e-3])
def test_eager_device_step_trains_bit_identically_to_the_plain_loop(laperm, l2):
    steps = 13  # three LaPerm syncs (k=4) and an epoch boundary (8 batches per epoch)
    ref, ref_loss, ref_acc = _plain_loop(laperm, l2, steps)
    fast, metrics, _ = _fast(laperm, l2, steps)
    for (name, a), b in zip(ref.state_dict().items(), fast.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-12) and metrics["accuracy"] == ref_acc
    assert metrics["images"] == 8 * steps


def test_metrics_reset_after_a_read():
    _, first, step = _fast(False, 0.0, 3)
    assert first["images"] == 24 and step.read_metrics() == {"loss": 0.0, "accuracy": 0.0, "images": 0.0}


def test_l2_penalty_equals_the_per_tensor_sum_and_its_gradient():
    ps = [torch.randn(5, 7, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True)]
    fast, slow = l2_penalty(ps), sum(p.pow(2).sum() for p in ps)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=0)
    (g_fast,) = torch.autograd.grad(fast, ps[1])
    torch.testing.assert_close(g_fast, 2 * ps[1].detach(), rtol=1e-6, atol=1e-7)


def test_bf16_and_channels_last_train_the_same_network_closely():
    fp32, _, _ = _fast(False, 0.0, 6)
    cl, _, _ = _fast(False, 0.0, 6, channels_last=True)
    bf16, metrics, _ = _fast(False, 0.0, 6, precision="bf16")
    for a, b, c in zip(fp32.parameters(), cl.parameters(), bf16.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # same math, other kernels
        assert (c - a).abs().max() < 0.05  # bf16 forward: close, not equal
    assert any(not torch.equal(a, c) for a, c in zip(fp32.parameters(), bf16.parameters(), strict=True))
    assert 0 < metrics["loss"] < 10


def test_laperm_with_channels_last_weights_stays_a_permutation():
    model, _, step = _fast(True, 0.0, 8, channels_last=True)  # k=4: the last step synced
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    step.opt.verify()


def _wrapper(fn):
    """What an LR scheduler puts on ``inner.step``: a wrapper on the instance, counting calls."""

    def wrapped(*args, **kwargs):
        wrapped.calls += 1
        return fn(*args, **kwargs)

    wrapped.calls = 0
    return wrapped


def test_graph_path_laperm_bookkeeping_matches_a_plain_step():
    # What a replay does for LaPerm, on CPU: the inner step runs (in the graph), then
    # LaPerm.after_inner_step must count and sync exactly as a normal LaPerm step, leaving the inner
    # optimizer's methods alone (an LR scheduler wraps inner.step on the instance: it must stay).
    runs = []
    for replayed in (False, True):
        model = _net()
        opt = _optimizer(model, True, k=2)
        wrapped = opt.base_optimizer.step = _wrapper(opt.base_optimizer.step)
        for xb, yb in list(_data())[:5]:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            if replayed:
                opt.base_optimizer.step()
                opt.after_inner_step()
            else:
                opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert opt.param_groups[0]["laperm_step"] == 5 and vars(opt.base_optimizer)["step"] is wrapped
        assert wrapped.calls == 5  # (the replayed run's inner steps are the test's own calls)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_learning_rate_changes_reach_the_captured_lr_tensors():
    # The graph reads the lr from a device tensor; a scheduler that assigns floats must still be obeyed.
    model = _net()
    opt = _optimizer(model, True)
    step = DeviceStep(model, opt)
    step._lrs = [torch.tensor(0.0) for _ in opt.param_groups]
    step._refresh_lr()
    assert all(
        g["lr"] is t and float(t) == pytest.approx(3e-3) for g, t in zip(opt.param_groups, step._lrs, strict=True)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    sched.step()
    opt.param_groups[0]["lr"] = 1e-4  # a plain float assignment replaces the tensor
    step._refresh_lr()
    assert opt.param_groups[0]["lr"] is step._lrs[0] and float(step._lrs[0]) == pytest.approx(1e-4)
    assert float(step._lrs[1]) == pytest.approx(1.5e-3)


def test_bad_options_fail_with_a_clear_message():
    model = _net()
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        DeviceStep(model, _optimizer(model, True), graph=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        DeviceStep(model, _optimizer(model, True), precision="fp8")
    with pytest.raises(ValueError, match="loss_scale"):
        DeviceStep(model, _optimizer(model, True), loss_scale="max")
    with pytest.raises(ValueError, match="capturable=True"):
        _check_capturable(torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="'adam' or 'adamw'"):
        make_adam(model.parameters(), lr=1e-3, eps=1e-7, device="cpu", weight_decay_free="sgd")


@pytest.mark.cuda
@pytest.mark.parametrize("laperm", [True, False])
def test_cuda_graph_step_trains_like_the_eager_step(laperm):
    def run(graph: bool) -> list[torch.Tensor]:
        model = _net().cuda()
        inner = make_adam(laperm_param_groups(model), lr=3e-3, eps=1e-7, device="cuda")
        opt = LaPerm(inner, k=4) if laperm else inner
        step = DeviceStep(model, opt, loss_scale="sum", graph=graph)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
        data = DeviceBatches(x, torch.randint(0, 10, (64,), generator=g), 8, seed=2, device="cuda")
        model[6].p = 0.0  # type: ignore[assignment]  # no dropout: the two paths draw it differently
        for _, (xb, yb) in zip(range(13), _forever(data), strict=False):
            step(xb, yb)
        torch.cuda.synchronize()
        return [p.detach().cpu() for p in model.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_after_inner_step_and_sync_together_run_step_hooks_and_the_profiler_range():
    opts = [_optimizer(_net(seed), True, k=1) for seed in (0, 1)]
    seen: list[tuple[str, int]] = []
    for i, opt in enumerate(opts):
        opt.register_step_pre_hook(lambda o, a, kw, i=i: seen.append(("pre", i)))
        opt.register_step_post_hook(lambda o, a, kw, i=i: seen.append(("post", i)))
        opt.register_sync_hook(lambda o, ps, i=i: seen.append(("sync", i)))
    opts[0].after_inner_step()
    assert seen == [("pre", 0), ("sync", 0), ("post", 0)]
    seen.clear()
    assert LaPerm.sync_together(opts) == []
    assert seen == [("pre", 0), ("pre", 1), ("sync", 0), ("sync", 1), ("post", 1), ("post", 0)]
    for call in (opts[1].after_inner_step, lambda: LaPerm.sync_together(opts)):  # torch's step range, as step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        assert "Optimizer.step#LaPerm.step" in [e.name for e in prof.events()]


def test_after_inner_step_refuses_the_latent_rule():
    model = _net()
    opt = LaPerm(torch.optim.Adam(model.parameters(), lr=1e-3), k=2, sync_rule="latent")
    with pytest.raises(LaPermError, match="latent"):
        opt.after_inner_step()
    with pytest.raises(LaPermError, match="latent"):
        LaPerm.sync_together([opt])
