"""Capture safety on CPU (issue 21): the region DeviceStep captures holds nothing a CUDA graph cannot hold.

Every image model ``--mode fast`` trains, in fp32 and bf16, with LaPerm and Adam, runs its warm-up
and its captured region (forward, loss, backward, fused capturable Adam) under
:class:`laperm.fast.capture_check.CaptureChecker`; the checker itself is shown to catch planted
host reads, data-dependent shapes, host copies, CPU generators and a layout first seen at capture.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laperm.engine.capture_harness import check_model, image_models
from laperm.fast.capture_check import CaptureChecker, CaptureSafetyError
from laperm.fast.step import DeviceStep

HEAVY = {"conv13", "resnet50"}  # ~10-30 s a cell on a shared 2-core machine
DEFAULT = {("conv7", "fp32", "laperm"), ("conv7", "bf16", "adam")}  # the model that failed on the H200


def _cells() -> list:
    cells = []
    for name in image_models():
        for precision in ("fp32", "bf16"):
            for optimizer in ("laperm", "adam"):
                slow = (name, precision, optimizer) not in DEFAULT or name in HEAVY
                marks = [pytest.mark.slow] if slow else []
                cells.append(
                    pytest.param(name, precision, optimizer, marks=marks, id=f"{name}-{precision}-{optimizer}")
                )
    return cells


def test_every_fast_image_model_is_covered():
    names = image_models()
    assert {"conv7", "conv2", "resnet50", "vit-tiny"} <= set(names) and "char-gpt" not in names


@pytest.mark.parametrize(("name", "precision", "optimizer"), _cells())
def test_model_step_is_capture_safe(name, precision, optimizer):
    batch = 2
    checker = check_model(name, optimizer=optimizer, precision=precision, channels_last=True, batch=batch)
    checker.assert_safe(f"{name} {precision} {optimizer}")


@pytest.mark.slow
def test_conv7_without_channels_last_is_capture_safe():
    check_model("conv7", channels_last=False).assert_safe("conv7 fp32 laperm, contiguous")


# -- the checker catches what it must -------------------------------------------------------------------------


class _Planted(nn.Module):
    """A small net whose ``trap`` submodule does one forbidden thing in its forward."""

    def __init__(self, trap: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.trap = trap
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trap(self.conv(x)).flatten(1))


class _Item(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean().item() > 0 else x  # a Python branch on a device value


class _Nonzero(nn.Module):
    def forward(self, x):
        return x + torch.nonzero(x > 0).shape[0] * 0.0


class _ToHost(nn.Module):
    def forward(self, x):
        scale = x.detach().abs().amax().to("cpu")
        return x / (1 + scale.to(x.device))


class _CpuGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        return x * (torch.rand(x.shape, generator=self.g) > 0.5)


def _check(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], **options) -> CaptureChecker:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
    checker = CaptureChecker(model, opt)
    step = DeviceStep(model, opt, graph=True, warmup_steps=1, graph_factory=checker, **options)
    for x, y in batches:
        step(x, y)
    return checker


def _batches(n: int = 2, channels_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(2, 3, 8, 8, generator=g)
        out.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x, torch.tensor([1, 7])))
    return out


@pytest.mark.parametrize(
    ("trap", "op", "words"),
    [
        (_Item, "Tensor.item", "host"),
        (_Item, "aten._local_scalar_dense", "Python"),
        (_Nonzero, "aten.nonzero", "output size depends on the data"),
        (_ToHost, "Tensor.to", "device-to-host"),
        (_CpuGenerator, "aten.rand", "a CPU generator"),
    ],
)
def test_the_checker_names_the_op_and_the_module(trap, op, words):
    checker = _check(_Planted(trap()), _batches())
    hits = [v for v in checker.violations if v.op.startswith(op)]
    assert hits, [str(v) for v in checker.violations]
    assert hits[0].module == f"trap ({trap.__name__})" and words in hits[0].reason
    assert "test_capture_safety.py" in hits[0].where  # the line that asked for it
    with pytest.raises(CaptureSafetyError, match="trap"):
        checker.assert_safe()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_clean_net_passes_with_every_loss_option(precision):
    # the loss path the presets use: coupled L2 (_foreach_norm), logit scale, summed loss, autocast
    model = _Planted(nn.Dropout(0.2))
    options = dict(l2=1e-4, l2_params=[model.conv.weight, model.fc.weight], logit_scale=3.0, loss_scale="sum")
    checker = _check(model, _batches(3), precision=precision, channels_last=True, **options)
    checker.assert_safe()
    assert checker.captures == 1  # the warm-up ran too, unjudged


def test_a_convolution_layout_first_seen_in_the_capture_is_flagged():
    # Warm-up on contiguous batches, capture on a channels_last one: cuDNN would meet a new
    # configuration inside the capture (what a 1-channel channels_last buffer did to Conv7).
    batches = _batches(1) + _batches(1, channels_last=True)
    checker = _check(_Planted(nn.ReLU()), batches)
    convs = [v for v in checker.violations if "convolution" in v.op]
    assert convs and convs[0].module == "conv (Conv2d)" and "warm-up never ran" in convs[0].reason


def test_backward_ops_are_attributed_to_their_forward_module():
    class _HostInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float(grad.abs().sum())  # a host read during backward

    class _Trap(nn.Module):
        def forward(self, x):
            return _HostInBackward.apply(x)

    checker = _check(_Planted(_Trap()), _batches())
    sync = [v for v in checker.violations if v.op.startswith("aten._local_scalar_dense")]
    assert sync and sync[0].module.startswith("backward of trap (_Trap)")


def test_an_unreached_capture_is_an_error():
    model = _Planted(nn.ReLU())
    checker = _check(model, _batches(1))  # only the warm-up ran
    with pytest.raises(CaptureSafetyError, match="nothing was checked"):
        checker.assert_safe()


def test_the_command_line_checks_named_models(capsys):
    from laperm.engine.capture_harness import main

    assert main(["f1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"f1 {p} {o}: safe" for p in ("fp32", "bf16") for o in ("laperm", "adam")]
