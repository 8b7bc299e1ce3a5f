"""torch.amp (GradScaler, bf16/fp16 autocast) and torch.compile with LaPerm."""

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from laperm import LaPerm, laperm_param_groups
from laperm.reconnect import is_row_permutation

K = 4


def _setup() -> tuple[nn.Module, LaPerm]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    return model, LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=K)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 8, generator=g) for _ in range(n)]
    return [(x, (x[:, 0] > x[:, 1]).long()) for x in xs]


def _train(how: str, steps: int = 6 * K) -> tuple[list[torch.Tensor], list[int], LaPerm]:
    """Train eagerly, with a compiled model, or with the whole step compiled; frames compiled after each step."""
    torch._dynamo.reset()
    model, opt = _setup()
    counter = CompileCounterWithBackend("eager")
    forward = torch.compile(model, backend=counter) if how == "model" else model
    if how == "step":
        opt.step = torch._dynamo.disable(opt.step)  # the recipe: the sync runs eagerly, between graphs

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    if how == "step":
        step = torch.compile(step, backend=counter)
    frames = []
    for x, y in _batches(steps):
        step(x, y)
        frames.append(counter.frame_count)
    opt.sync()
    opt.verify()
    return [p.detach().clone() for p in model.parameters()], frames, opt


def test_torch_compile_model_and_whole_step_no_recompile_and_same_weights():
    eager, _, _ = _train("eager")
    for how in ("model", "step"):
        weights, frames, _ = _train(how)
        # Compiled once, in the first step; the syncs (steps 4, 8, ...) cause no recompilation.
        assert frames[0] >= 1 and frames[-1] == frames[0], (how, frames)
        assert all(torch.equal(a, b) for a, b in zip(weights, eager, strict=True)), how


def test_bf16_autocast_trains_and_keeps_the_invariant():
    model, opt = _setup()
    theta0 = [p.detach().clone() for p in model.parameters()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    for x, y in _batches(3 * K + 1):
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(x.to(device))
            loss = nn.functional.cross_entropy(logits, y.to(device))
        assert logits.dtype == torch.bfloat16
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.sync()
    opt.verify()
    for p, p0 in zip(model.parameters(), theta0, strict=True):
        assert p.dtype == torch.float32  # autocast leaves the master weights (and θ0) in float32
        if p.dim() >= 2:
            assert is_row_permutation(p.cpu(), p0) and not torch.equal(p.cpu(), p0)


def test_gradscaler_skipped_steps_do_not_count_towards_a_sync():
    # fp16 GradScaler on CUDA; on CPU torch.amp.GradScaler("cpu") with fp16 autocast is the same code path.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt = _setup()
    model.to(device)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    batches = _batches(3 * K)
    for i, (x, y) in enumerate(batches):
        with torch.autocast(device, dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        scaler.scale(loss).backward()
        if i == 2:  # an overflow: the scaler must skip this step
            next(model.parameters()).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
            assert scaler.get_scale() == 2.0**9
    # 12 calls, one skipped: 11 LaPerm steps, so the last sync was at step 8, and we are 3 past it.
    assert opt.param_groups[0]["laperm_step"] == 3 * K - 1
    assert opt.steps_to_next_sync() == 1
    opt.sync()
    opt.verify()
