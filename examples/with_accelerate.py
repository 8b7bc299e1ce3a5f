"""LaPerm with Hugging Face ``accelerate``: prepare, train, save_state / load_state, sync at the end.

accelerate wraps the optimizer (``AcceleratedOptimizer``); :func:`laperm.integrations.find_laperm`
reaches the LaPerm inside it for the final ``sync()`` and ``verify()``.  ``save_state`` stores the
model's current (inner) weights and LaPerm's state, so ``load_state`` resumes exactly, even between syncs.

    python examples/with_accelerate.py
"""

from __future__ import annotations

import tempfile

import torch
from accelerate import Accelerator
from torch import nn

from laperm import LaPerm, laperm_param_groups
from laperm.integrations import find_laperm

STEPS, K = 24, 4


def setup(seed: int = 0) -> tuple[Accelerator, nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, object]:
    """The model, LaPerm(Adam), data and schedule, passed through ``accelerator.prepare``."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=K)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=8, gamma=0.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * STEPS, 8, generator=g)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    return accelerator, *accelerator.prepare(model, opt, loader, sched)


def train(save_at: int | None = None, state_dir: str | None = None, resume: bool = False) -> nn.Module:
    """Train for STEPS steps; ``save_state`` after step ``save_at``, or (``resume``) start from there."""
    accelerator, model, opt, loader, sched = setup()
    start = 0
    if resume:
        accelerator.load_state(state_dir)
        start = save_at or 0
        loader = accelerator.skip_first_batches(loader, start)
    for step, (x, y) in enumerate(loader, start=start + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step == save_at and not resume:
            accelerator.save_state(state_dir)
    laperm = find_laperm(opt)
    laperm.sync()  # always end in a synced state
    laperm.verify()
    return accelerator.unwrap_model(model)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as state_dir:
        full = train(save_at=10, state_dir=state_dir)  # (step 10 falls between syncs: k=4)
        resumed = train(save_at=10, state_dir=state_dir, resume=True)
    same = all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters(), strict=True))
    assert same, "the resumed run should end bit-identical to the uninterrupted one"
    print("resumed from save_state at step 10: final weights bit-identical to the uninterrupted run; verified")
