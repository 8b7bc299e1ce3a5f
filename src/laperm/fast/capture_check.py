"""Capture safety of the fast step, checked on any device (CPU in CI): what would break a CUDA graph.

:class:`CaptureChecker` is a :data:`~laperm.fast.graph.GraphFactory`: given to
:class:`~laperm.fast.step.DeviceStep` as ``graph_factory``, it runs the step's warm-up and then the
very region the step captures (forward, loss, backward, inner optimizer step -- with the step's
autocast and memory layout) eagerly, under a ``TorchDispatchMode`` and a ``TorchFunctionMode``, and
records every operation that a CUDA graph cannot hold:

* **host synchronisation** -- ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``int()``,
  ``float()``), ``aten.equal``, and at the Python level ``Tensor.item``/``tolist``/``numpy``/``cpu``
  and ``.to("cpu")``: they read device values into Python (a branch on them would be frozen in the
  graph, and the read itself is illegal while capturing);
* **data-dependent shapes** -- ``nonzero``, ``masked_select``, ``unique*``, ``bincount``, ``histc``,
  ``repeat_interleave`` with tensor repeats, boolean-mask indexing (``x[mask]``, ``x[mask] = v``):
  the output size must be read back to the host;
* **copies between host and device** -- ``copy_``/``_to_copy`` between a CPU tensor and the device
  (seen on a CUDA run), ``.cpu()`` and ``.to("cpu")`` (seen at the Python level on any run), and
  ``torch.tensor(...)`` made from Python data inside the region;
* **random numbers the graph does not know** -- a random op given an explicit ``generator=`` (a
  CPU generator, or any generator not registered with the graph), or one producing on another
  device than the run's; the device's default generator (dropout) is registered by
  ``torch.cuda.graph`` and allowed;
* **kernel selection inside the capture** -- a convolution (forward or backward) whose shapes,
  strides or dtype the warm-up never ran: with ``cudnn.benchmark`` cuDNN would autotune it during
  the capture, which synchronises and invalidates the capture.

Each finding names the op, the module that ran it (forward: the ``nn.Module`` whose forward was
running; backward: the module whose forward made the autograd node; otherwise "loss and metrics" or
"inner step"), and the innermost source line outside torch.

What a CPU run cannot see (the limits): CPU tensors are the device there, so an op on a CPU tensor
inside a CUDA capture (computed once at capture, never replayed) and a default-generator random op
producing on the CPU show up only on a CUDA run; ``.to("cpu")`` of a CPU tensor is flagged only
through the Python-level call; kernels that synchronise internally on CUDA only (e.g. cuDNN
autotuning itself, pageable copies) are found only through the rules above.  The checker runs the
region once per step for real (on CUDA too: it does not record a graph).

The harness that builds registry models and stacks the way ``laperm train --mode fast`` does and
runs this checker over them, with its command line, is :mod:`laperm.engine.capture_harness`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Violation", "CaptureChecker", "CaptureSafetyError"]

aten = torch.ops.aten

SYNC_OPS = {aten._local_scalar_dense.default: "reads a device value into Python (.item(), bool(), int(), float())"}
SYNC_OPS[aten.equal.default] = "torch.equal returns a Python bool: a host sync"
DATA_DEPENDENT = {
    "nonzero",
    "nonzero_numpy",
    "argwhere",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",
    "histc",
}
MASK_INDEX = {"index", "index_put", "index_put_", "_index_put_impl_"}
CONVOLUTIONS = {"convolution", "convolution_backward", "cudnn_convolution", "_convolution"}
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__"}
_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS = str(Path(__file__).resolve())


class CaptureSafetyError(AssertionError):
    """The captured region holds operations a CUDA graph cannot hold (each one listed)."""


@dataclass(frozen=True)
class Violation:
    """One operation that a CUDA graph cannot capture, where it happened, and why."""

    op: str
    module: str
    reason: str
    where: str = ""

    def __str__(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.op} in {self.module}{at}: {self.reason}"


class _Where:
    """Which module (or phase) is running: forward hooks, autograd nodes, the optimizer's step hooks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.names = {id(m): (n or "model", type(m).__name__) for n, m in model.named_modules()}
        self.optimizer = optimizer
        self.stack: list[str] = []
        self.node_module: dict[Any, str] = {}
        self.in_step = False
        self._handles: list[Any] = []

    def __enter__(self) -> _Where:
        hooks = torch.nn.modules.module
        self._handles = [
            hooks.register_module_forward_pre_hook(self._enter_module),
            hooks.register_module_forward_hook(self._leave_module),
        ]
        if self.optimizer is not None:
            self._handles += [
                self.optimizer.register_step_pre_hook(lambda *a: self._set_step(True)),
                self.optimizer.register_step_post_hook(lambda *a: self._set_step(False)),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self.stack.clear()
        self.node_module.clear()

    def _set_step(self, on: bool) -> None:
        self.in_step = on

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        name, kind = self.names.get(id(module), (type(module).__name__, type(module).__name__))
        self.stack.append(f"{name} ({kind})")

    def _leave_module(self, module: nn.Module, args: Any, out: Any) -> None:
        self.remember_nodes(out)  # (nodes made without a torch function call, e.g. autograd.Function.apply)
        if self.stack:
            self.stack.pop()

    def remember_nodes(self, out: Any) -> None:
        """Attribute the autograd nodes a forward call just made to the module running it."""
        if not self.stack:
            return
        todo: list[Any] = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        while todo:
            node = todo.pop()
            if node is None or node in self.node_module:
                continue
            self.node_module[node] = self.stack[-1]
            todo.extend(n for n, _ in node.next_functions)

    def current(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"backward of {self.node_module.get(node, 'the loss')} ({node.name()})"
        if self.stack:
            return self.stack[-1]
        if self.in_step and self.optimizer is not None:
            return f"inner step ({type(self.optimizer).__name__})"
        return "loss and metrics (DeviceStep)"


def _source_line() -> str:
    """The innermost frame outside torch and this checker: the line that asked for the op."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != _THIS:
            parts = Path(frame.filename).parts
            short = "/".join(parts[parts.index("laperm") :] if "laperm" in parts else parts[-2:])
            return f"{short}:{frame.lineno} in {frame.name}"
    return ""


class _Findings:
    def __init__(self, where: _Where) -> None:
        self.where = where
        self.found: dict[tuple[str, str, str], Violation] = {}
        self.checking = False  # False during warm-up (only convolution signatures are recorded)
        self.conv_seen: set[tuple[Any, ...]] = set()

    def flag(self, op: str, reason: str) -> None:
        if self.checking:
            module = self.where.current()
            key = (op, module, reason)
            if key not in self.found:
                self.found[key] = Violation(op, module, reason, _source_line())


class _DispatchRules(TorchDispatchMode):
    """The aten-level rules (see the module docstring)."""

    def __init__(self, findings: _Findings, device: torch.device, generators: tuple[torch.Generator, ...]) -> None:
        super().__init__()
        self.findings, self.device, self.generators = findings, device, generators

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        reason = self._reason(func, args, kwargs)
        if reason:
            self.findings.flag(str(func), reason)
        out = func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded in func.tags:
            self._check_random_output(func, out)
        return out

    def _reason(self, func: Any, args: Any, kwargs: dict[str, Any]) -> str | None:
        name = func._schema.name.split("::")[-1]
        if func in SYNC_OPS:
            return SYNC_OPS[func]
        if name in DATA_DEPENDENT:
            return "its output size depends on the data: the size is read back to the host"
        if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave with tensor repeats and no output_size reads the size back to the host"
        if name in MASK_INDEX and _has_mask_index(args):
            return "boolean-mask indexing needs nonzero(): a data-dependent size read back to the host"
        if name in CONVOLUTIONS:
            return self._convolution(func, args, kwargs)
        if name in ("_to_copy", "copy_", "lift_fresh", "lift_fresh_copy"):
            return self._copy(name, args, kwargs)
        generator = kwargs.get("generator")
        if generator is not None and not any(generator is g for g in self.generators):
            kind = "a CPU generator" if generator.device.type == "cpu" else f"a {generator.device} generator"
            return f"draws from {kind} the graph does not know (only the device's default generator is registered)"
        return None

    def _convolution(self, func: Any, args: Any, kwargs: dict[str, Any]) -> str | None:
        signature = (str(func), *(_signature(a) for a in tree_flatten((args, kwargs))[0]))
        if not self.findings.checking:
            self.findings.conv_seen.add(signature)
            return None
        if signature in self.findings.conv_seen:
            return None
        return (
            "a convolution configuration (shapes, strides, dtype) the warm-up never ran: cuDNN would "
            "select (with cudnn.benchmark: autotune) its kernel inside the capture"
        )

    def _copy(self, name: str, args: Any, kwargs: dict[str, Any]) -> str | None:
        if name.startswith("lift_fresh"):
            return "a tensor made from Python data inside the region (a host-to-device copy, frozen at capture)"
        src = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device")
        if target is None or not isinstance(src, torch.Tensor):
            return None
        target = torch.device(target)
        if target.type == "cpu" and src.device.type != "cpu":
            return "a copy to the host (device-to-host: waits for the device)"
        if src.device.type == "cpu" and target.type != "cpu" and src.dim() > 0:
            return "a host-to-device copy of a CPU tensor (its value is frozen at capture)"
        return None

    def _check_random_output(self, func: Any, out: Any) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != self.device.type:
                self.findings.flag(str(func), f"a random op producing on {t.device}, not on the run's {self.device}")
                return


def _has_mask_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _signature(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.stride(), a.dtype, a.device.type)
    return a


class _FunctionRules(TorchFunctionMode):
    """Python-level rules: reads into Python and explicit host targets (seen on any device)."""

    def __init__(self, findings: _Findings) -> None:
        super().__init__()
        self.findings = findings

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.findings.flag(f"Tensor.{name}", "reads the tensor into host memory (a host sync)")
        elif name == "to" and args and isinstance(args[0], torch.Tensor) and _targets_cpu(args[1:], kwargs):
            self.findings.flag("Tensor.to", "a copy to the host (device-to-host: waits for the device)")
        out = func(*args, **kwargs)
        self.findings.where.remember_nodes(out)
        return out


def _targets_cpu(args: Any, kwargs: dict[str, Any]) -> bool:
    try:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
    except (TypeError, RuntimeError):
        return False
    return device is not None and device.type == "cpu"


class _CheckedGraph:
    """The :class:`~laperm.fast.graph.StepGraph` of a :class:`CaptureChecker`: runs, never records."""

    def __init__(self, checker: CaptureChecker) -> None:
        self.checker = checker

    def warmup(self, fn: Callable[[], None]) -> None:
        self.checker._run(fn, checking=False)

    def capture(self, fn: Callable[[], None]) -> None:
        self.checker._run(fn, checking=True)
        self.checker.captures += 1

    def replay(self) -> None:
        """(The capture has just computed the step: nothing to replay.)"""

    def check_health(self) -> None:
        """(Nothing was recorded: the device is as the step left it.)"""


class CaptureChecker:
    """A graph factory for :class:`~laperm.fast.step.DeviceStep` that checks instead of capturing.

    ``model``: names the modules; ``optimizer``: the inner optimizer (its step is labelled);
    ``generators``: generators registered with the graph (explicit ``generator=`` uses allowed).
    After the step has run its warm-up and its capture, :attr:`violations` lists the findings;
    :meth:`assert_safe` raises :class:`CaptureSafetyError` listing them all.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        generators: tuple[torch.Generator, ...] = (),
    ) -> None:
        self.model, self.optimizer, self.generators = model, optimizer, generators
        self.captures = 0
        self._findings = _Findings(_Where(model, optimizer))

    def __call__(self, device: torch.device) -> _CheckedGraph:
        self.device = device
        return _CheckedGraph(self)

    @property
    def violations(self) -> list[Violation]:
        return list(self._findings.found.values())

    def _run(self, fn: Callable[[], None], checking: bool) -> None:
        findings = self._findings
        findings.checking = checking
        try:
            with findings.where, _FunctionRules(findings), _DispatchRules(findings, self.device, self.generators):
                fn()
        finally:
            findings.checking = False

    def assert_safe(self, what: str = "the step") -> None:
        if self.captures == 0:
            raise CaptureSafetyError(f"{what}: nothing was checked (the step never reached its capture)")
        if self.violations:
            lines = "\n  ".join(str(v) for v in self.violations)
            raise CaptureSafetyError(f"{what} cannot be captured in a CUDA graph:\n  {lines}")
