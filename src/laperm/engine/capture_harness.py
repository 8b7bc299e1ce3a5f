"""The capture-safety checker's harness: registry models and stacks built as ``laperm train --mode fast``
builds them, their fast step run through :class:`~laperm.fast.capture_check.CaptureChecker`.

:func:`check_model` checks one run's :class:`~laperm.fast.step.DeviceStep`, :func:`check_stack` a stack's
:class:`~laperm.engine.stack_step.StackStep`; ``python -m laperm.engine.capture_harness [--device D]
[MODEL ...]`` checks every image model x fp32/bf16 x LaPerm/Adam, one line each (exit 1 if any is unsafe).
The checker itself knows nothing of the registry (:mod:`laperm.fast` sits below the engine).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from .. import build
from ..config import PRESETS, resolve_config
from ..data.device import DeviceBatches
from ..fast.capture_check import CaptureChecker
from ..fast.step import DeviceStep
from ..models import MODELS, get_spec
from ..models.stacked import LossSpec, StackedModel
from .stack_step import StackStep

__all__ = ["image_models", "check_model", "check_stack", "main"]


def image_models() -> list[str]:
    """The registry's models that ``--mode fast`` trains (image classifiers; ``resnet`` needs ``depth=``:
    ``resnet20`` and ``resnet50`` are its instances)."""
    return [name for name, spec in MODELS.items() if spec.dataset != "text" and name != "resnet"]


def check_model(
    name: str,
    *,
    optimizer: str = "laperm",
    precision: str = "fp32",
    channels_last: bool = True,
    batch: int = 2,
    device: str = "cpu",
) -> CaptureChecker:
    """Check the fast step of registry model ``name`` as ``laperm train --mode fast`` builds it (its preset's
    loss scale, L2 and logit scale; the inner Adam fused and capturable): one warm-up step, then the
    captured region, on batches from :class:`~laperm.data.device.DeviceBatches`.  Returns the checker."""
    cfg = _fast_config(name, optimizer, precision, channels_last, device)
    spec, dev = get_spec(name), torch.device(device)
    model, _ = build.build_model(cfg, dev)
    opt = build.build_optimizer(cfg, model, capturable=True)
    inner = getattr(opt, "base_optimizer", opt)
    l2 = spec.l2 if cfg.l2 is None else cfg.l2
    checker = CaptureChecker(model, inner)
    step = DeviceStep(
        model,
        opt,
        l2=l2,
        l2_params=model.l2_parameters() if l2 else [],  # type: ignore[operator]
        loss_scale=cfg.loss_scale,
        logit_scale=cfg.logit_scale,
        precision=precision,
        channels_last=channels_last,
        graph=True,
        warmup_steps=1,
        graph_factory=checker,
    )
    for xb, yb in _batches(name, batch, dev, channels_last, seed=0):
        step(xb, yb)
    return checker


def check_stack(
    name: str,
    *,
    members: int = 2,
    precision: str = "fp32",
    channels_last: bool = True,
    batch: int = 2,
    device: str = "cpu",
) -> CaptureChecker:
    """Check the stacked fast step (:class:`~laperm.engine.stack_step.StackStep`, vectorised) of ``members``
    nets of registry model ``name``, as a stack of ``laperm train --mode fast --seeds`` builds it: one
    warm-up step, then the captured region (the members' forward and backward, their totals, the one
    inner Adam step over the stacked tensors, fused and capturable).  Returns the checker."""
    cfg = _fast_config(name, "laperm", precision, channels_last, device)
    spec, dev = get_spec(name), torch.device(device)
    nets = [build.build_model(dataclasses.replace(cfg, seed=s), dev)[0] for s in range(members)]
    stack = StackedModel(nets, channels_last=channels_last)
    opt = torch.optim.Adam(stack.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=True, capturable=True)
    l2 = spec.l2 if cfg.l2 is None else cfg.l2
    names = {id(p): n for n, p in nets[0].named_parameters()}
    l2_names = tuple(names[id(p)] for p in nets[0].l2_parameters()) if l2 else ()  # type: ignore[operator]
    loss = LossSpec(l2, l2_names, cfg.logit_scale, cfg.loss_scale == "sum", precision, foreach_l2=True)
    checker = CaptureChecker(stack.template, opt)
    totals = (
        torch.zeros(members, dtype=torch.float64, device=dev),
        torch.zeros(members, dtype=torch.int64, device=dev),
    )
    step = StackStep(stack, opt, loss, totals, vectorize=True, graph=True, warmup_steps=1, graph_factory=checker)
    loaders = [_batches(name, batch, dev, channels_last, seed=s) for s in range(members)]
    for pairs in zip(*loaders, strict=True):
        step(stack.stack_inputs([x for x, _ in pairs]), torch.stack([y for _, y in pairs]))
    return checker


def _fast_config(name: str, optimizer: str, precision: str, channels_last: bool, device: str) -> Any:
    fast = dict(optimizer=optimizer, mode="fast", precision=precision, channels_last=channels_last, device=device)
    return resolve_config({"preset": name} if name in PRESETS else {"model": name}, fast)


def _batches(name: str, batch: int, dev: torch.device, channels_last: bool, seed: int) -> Any:
    """Two batches of random images for model ``name`` from :class:`~laperm.data.device.DeviceBatches`."""

    spec = get_spec(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2 * batch, *spec.input_shape), dtype=torch.uint8, generator=g)
    y = torch.randint(0, spec.num_classes, (2 * batch,), generator=g)
    return DeviceBatches(x, y, batch, seed=seed, device=dev, mean=(0.5,), std=(0.25,), channels_last=channels_last)


def main(argv: list[str] | None = None) -> int:
    """``python -m laperm.engine.capture_harness [--device D] [MODEL ...]``: check each model × fp32/bf16 ×
    LaPerm/Adam (default: every image model), one line each; exit 1 if any is unsafe."""
    parser = argparse.ArgumentParser(prog="python -m laperm.engine.capture_harness")
    parser.add_argument("models", nargs="*", default=image_models())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    unsafe = 0
    for name in args.models:
        for precision in ("fp32", "bf16"):
            for optimizer in ("laperm", "adam"):
                checker = check_model(name, optimizer=optimizer, precision=precision, device=args.device)
                found = checker.violations if checker.captures else ["the capture was never reached"]
                unsafe += bool(found)
                print(f"{name} {precision} {optimizer}: {'safe' if not found else 'UNSAFE'}", flush=True)
                for v in found:
                    print(f"  {v}", flush=True)
    return 1 if unsafe else 0


if __name__ == "__main__":
    raise SystemExit(main())
