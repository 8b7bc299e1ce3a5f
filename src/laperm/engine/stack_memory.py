"""Will a stack fit? Its memory, estimated from one model, against the memory free where it would train.

A stack of N runs keeps N copies of everything a run keeps, so the estimate is one model's
parameter count times the copies a member holds times the members: no member is built (a
100,001-seed stack is refused in well under a second). Counted per member, on the training device:
the weights, their gradients, the inner optimizer's state (Adam's two moments, SGD's momentum),
and for LaPerm members its sorted θ0, the inner weights set aside while evaluating at synced
weights (or kept as latent weights) and the previous synced weights (the reconnected fraction);
in host memory: the θ0 record and the selected best weights. Not counted: activations, batches,
the data set, the allocator's slack and the framework itself -- hence the limit is only a fraction
of the free memory (:data:`USABLE_FRACTION`).

Free memory: ``torch.cuda.mem_get_info`` on CUDA; on the CPU ``MemAvailable`` of ``/proc/meminfo``,
else ``psutil`` where it is installed, else the check is skipped with a warning.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import build, models
from ..config import ConfigError, TrainConfig
from ..optim import permuted_layouts

__all__ = ["MemberCost", "member_cost", "free_bytes", "check_stack_memory", "USABLE_FRACTION"]

USABLE_FRACTION = 0.8  # of the free memory: what the estimate leaves out (activations, data, slack) needs room
MEMINFO = Path("/proc/meminfo")
NOT_COUNTED = "activations, batches and the data set not counted"


@dataclass(frozen=True)
class MemberCost:
    """One member's memory: bytes on the training device and in host memory, and what was counted."""

    device: int
    host: int
    copies: str  # e.g. "weights, gradients, Adam's 2 moments, ..."


@functools.lru_cache(maxsize=16)
def _counts(model: str, permute_biases: bool, granularity: str) -> tuple[int, int, int, int]:
    """(parameters, buffers, permuted weights, bytes per value) of one ``model``, built once on the CPU."""
    net = models.build(model, seed=0)
    layouts = permuted_layouts(net, permute_biases, granularity)
    named = dict(net.named_parameters())
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers() if b.is_floating_point())
    permuted = sum(named[n].numel() for n in layouts)
    return params, buffers, permuted, next(net.parameters()).element_size()


def _inner_copies(cfg: TrainConfig, optimizer: str) -> tuple[int, str]:
    kind = cfg.inner if optimizer == "laperm" else optimizer
    if kind in ("adam", "adamw"):
        return 2, f"{kind.capitalize()}'s 2 moments"
    if cfg.momentum:
        return 1, "SGD's momentum"
    return 0, ""


def member_cost(cfg: TrainConfig, optimizer: str | None = None) -> MemberCost:
    """The memory one member of a stack of ``cfg`` with ``optimizer`` (default ``cfg.optimizer``) keeps."""
    optimizer = optimizer or cfg.optimizer
    biases = build.resolve_permute_biases(cfg.model, cfg.permute_biases)
    params, buffers, permuted, size = _counts(cfg.model, biases, cfg.granularity)
    inner, inner_name = _inner_copies(cfg, optimizer)
    values = params + buffers + params + inner * params  # weights (and buffers), gradients, inner state
    names = ["weights", "gradients"] + ([inner_name] if inner_name else [])
    if optimizer == "laperm":
        values += 3 * permuted
        names += ["LaPerm's sorted θ0, set-aside (or latent) and previous synced weights"]
    host = 2 * (params + buffers)  # the θ0 record and the best weights, copied to the CPU
    return MemberCost(values * size, host * size, ", ".join(names))


def free_bytes(device: torch.device) -> int | None:
    """The memory free for training on ``device`` (the CPU: host memory); None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _host_free()


def _host_free() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # (kB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # (optional: only where /proc/meminfo is absent)
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_stack_memory(base: TrainConfig, optimizers: Sequence[str], device: torch.device) -> None:
    """Refuse (ConfigError, one line) a stack whose members (one optimizer name each, ``base`` otherwise)
    would not fit in the memory free on ``device``: the estimate, the limit and the largest stack that fits."""
    if not optimizers or models.check_trainable(base.model).dataset == "text":
        return  # (nothing to stack; a language model is refused as unstackable)
    counts = Counter(optimizers)
    costs = {o: member_cost(base, o) for o in counts}
    need = {
        "device": sum(costs[o].device * n for o, n in counts.items()),
        "host": sum(costs[o].host * n for o, n in counts.items()),
    }
    where = {"device": device, "host": torch.device("cpu")}
    if device.type == "cpu":  # one memory: both kinds of copies share it
        need, where = {"device": need["device"] + need["host"]}, {"device": device}
    for kind, bytes_needed in need.items():
        free = free_bytes(where[kind])
        if free is None:
            warnings.warn(
                f"cannot read the free memory of {where[kind]} (no /proc/meminfo, no psutil): the stack's "
                "memory is not checked; pip install psutil to check it",
                stacklevel=2,
            )
            continue
        limit = int(free * USABLE_FRACTION)
        if bytes_needed > limit:
            raise ConfigError(_refusal(base, counts, costs, bytes_needed, limit, free, where[kind], kind))


def _refusal(
    base: TrainConfig,
    counts: Counter[str],
    costs: dict[str, MemberCost],
    need: int,
    limit: int,
    free: int,
    where: torch.device,
    kind: str,
) -> str:
    members = sum(counts.values())
    per_seed = need / max(counts.values())  # one seed of every optimizer in the stack
    seeds = math.floor(limit / per_seed)
    fits = seeds * len(counts)
    largest = (
        f"the largest stack that fits is {fits:,} runs (--seeds 0-{seeds - 1}"
        + (f" with {len(counts)} optimizers)" if len(counts) > 1 else ")")
        if seeds >= 2
        else "not even two runs fit: train them alone"
    )
    copies = "; ".join(f"{o}: {c.copies}" for o, c in costs.items())
    memory = "host memory" if kind == "host" else f"memory of {where}"
    return (
        f"a stack of {members:,} {base.model} runs needs about {_gib(need)} ({copies}; {NOT_COUNTED}) "
        f"but the limit is {_gib(limit)} ({USABLE_FRACTION:.0%} of the {_gib(free)} free {memory}); {largest}"
    )
