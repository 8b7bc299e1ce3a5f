"""Keras-style initialisation, random pruning and shared-value init for any ``nn.Module``.

The paper's networks were built in Keras, whose defaults differ from PyTorch's, so these helpers
reproduce Keras semantics (docs/algorithm.md §3). Nothing here knows models by name: layers are chosen by type.

Randomness: every function takes ``generator`` (a CPU ``torch.Generator``, or ``None`` for torch's
global CPU generator). Values and masks are always drawn on the CPU and then copied to the
parameter's device, so a seed gives the same numbers on CPU and CUDA.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "PRUNABLE_TYPES",
    "NORM_TYPES",
    "HeUniformResult",
    "KerasInitResult",
    "PruneResult",
    "keras_fan_in",
    "he_uniform_",
    "keras_init_",
    "prunable_layers",
    "prunable_parameters",
    "random_prune_",
    "shared_value_",
]

# Layers whose weight is a kernel (he-uniform init, prunable, permuted by LaPerm).
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
# Normalisation layers reset to the Keras BatchNormalization defaults (gamma 1, beta 0).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)


@dataclass(frozen=True)
class HeUniformResult:
    """What :func:`he_uniform_` did: the fan-in used and the bound of U(-bound, bound)."""

    fan_in: int
    bound: float
    numel: int


@dataclass(frozen=True)
class KerasInitResult:
    """Counts of tensors :func:`keras_init_` initialised."""

    weights: int  # Linear/Conv kernels (he-uniform)
    biases: int  # biases of those layers (he-uniform or zeros)
    norms: int  # BatchNorm layers reset to weight 1, bias 0, fresh running stats
    embeddings: int = 0  # nn.Embedding tables (he-uniform, fan-in = embedding width)
    layer_norms: int = 0  # LayerNorm layers reset to weight 1, bias 0 (the Keras defaults)


@dataclass(frozen=True)
class PruneResult:
    """Masks and counts from :func:`random_prune_` / :func:`shared_value_`.

    ``masks[name]`` is a bool tensor (on the parameter's device), True where the entry was kept;
    ``name`` is the parameter's name in ``model.named_parameters()``.
    """

    masks: dict[str, Tensor]
    kept: dict[str, int]
    total: dict[str, int]

    @property
    def num_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def num_total(self) -> int:
        return sum(self.total.values())

    @property
    def sparsity(self) -> float:
        """Overall fraction of the masked entries that were set to zero."""
        return 1.0 - self.num_kept / self.num_total if self.num_total else 0.0

    def keep_ratio(self, name: str) -> float:
        """Fraction of entries kept in parameter ``name``."""
        return self.kept[name] / self.total[name]


# --------------------------------------------------------------------------- helpers


def _check_generator(generator: torch.Generator | None) -> None:
    # Drawing on the CPU is what makes results identical across devices.
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator, got one on {generator.device}; "
            "values are drawn on the CPU and copied to the parameter's device"
        )


def _draw_dtype(tensor: Tensor) -> torch.dtype:
    # Half/bfloat16 parameters get float32 draws, rounded on copy.
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32


def _keep_mask(shape: torch.Size, keep: float, generator: torch.Generator | None) -> Tensor:
    """Bool CPU tensor, each entry True independently with probability ``keep``."""
    return torch.rand(shape, generator=generator) < keep


def _check_not_lazy(name: str, param: Tensor) -> None:
    if nn.parameter.is_lazy(param):
        raise ValueError(f"parameter {name!r} is uninitialised (lazy module): run a forward pass first")


def _as_real(x: object, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(x).__name__}")
    return float(x)


# --------------------------------------------------------------------------- he-uniform


def keras_fan_in(tensor: Tensor, transposed: bool = False) -> int:
    """Keras fan-in of a PyTorch parameter.

    - 1-D (bias): its length (the rule Keras applies when a bias uses a kernel initialiser).
    - Linear ``(out, in)`` and ConvNd ``(out, in/groups, *k)``: ``tensor[0].numel()``,
      i.e. ``in_features`` or ``in_channels/groups * prod(k)``.
    - ConvTransposeNd ``(in, out/groups, *k)`` with ``transposed=True``: ``out/groups * prod(k)``
      (``tensor.shape[1] * prod(k)``). This is what Keras computes from its transposed kernel
      layout ``(*k, out, in)`` and what PyTorch's own fan computation gives.
    """
    if tensor.dim() == 0:
        raise ValueError("cannot compute a fan-in for a 0-d tensor")
    if tensor.dim() == 1:
        fan_in = tensor.numel()
    elif transposed:
        fan_in = tensor.shape[1] * math.prod(tensor.shape[2:])
    else:
        fan_in = math.prod(tensor.shape[1:])
    if fan_in <= 0:
        raise ValueError(f"fan-in of a tensor of shape {tuple(tensor.shape)} is zero")
    return fan_in


@torch.no_grad()
def he_uniform_(
    tensor: Tensor,
    fan_in: int | None = None,
    generator: torch.Generator | None = None,
    *,
    transposed: bool = False,
) -> HeUniformResult:
    """Fill ``tensor`` in place from U(-sqrt(6/fan_in), +sqrt(6/fan_in)) (Keras ``he_uniform``).

    ``fan_in`` defaults to :func:`keras_fan_in` (``transposed`` selects the ConvTranspose rule);
    pass it explicitly for any other layout.
    """
    _check_generator(generator)
    if fan_in is None:
        fan_in = keras_fan_in(tensor, transposed=transposed)
    elif fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    bound = math.sqrt(6.0 / fan_in)
    values = torch.empty(tensor.shape, dtype=_draw_dtype(tensor))
    values.uniform_(-bound, bound, generator=generator)
    tensor.copy_(values)
    return HeUniformResult(fan_in=fan_in, bound=bound, numel=tensor.numel())


@torch.no_grad()
def keras_init_(
    model: nn.Module,
    bias: str = "he_uniform",
    generator: torch.Generator | None = None,
) -> KerasInitResult:
    """Initialise ``model`` in place the way the paper's Keras models were.

    Every Linear/Conv*/ConvTranspose* kernel gets he-uniform; their biases get he-uniform with
    fan-in = bias length (``bias="he_uniform"``, as ``bias_initializer='he_uniform'``) or zeros
    (``bias="zeros"``, the Keras default). BatchNorm layers get weight 1, bias 0 and fresh running
    statistics. Modules are visited in ``model.modules()`` order, so a seed fixes the result.

    Embedding tables (``nn.Embedding``) get he-uniform with fan-in = embedding width: the
    Keras bound of a ``Linear(width, num_embeddings)`` output layer that may share (tie) the
    table, and one scale for token and position tables. LayerNorm layers get weight 1, bias 0.
    """
    if bias not in ("he_uniform", "zeros"):
        raise ValueError(f"bias must be 'he_uniform' or 'zeros', got {bias!r}")
    _check_generator(generator)
    n_weights = n_biases = n_norms = n_emb = n_ln = 0
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            _check_not_lazy(name, module.weight)
            # ConvTranspose kernels keep output channels on dim 1 (see keras_fan_in).
            transposed = bool(getattr(module, "transposed", False))
            he_uniform_(module.weight, generator=generator, transposed=transposed)
            n_weights += 1
            if module.bias is not None:
                if bias == "zeros":
                    module.bias.zero_()
                else:
                    he_uniform_(module.bias, generator=generator)
                n_biases += 1
        elif isinstance(module, NORM_TYPES):
            module.reset_running_stats()
            if module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()
            n_norms += 1
        elif isinstance(module, nn.Embedding):
            he_uniform_(module.weight, generator=generator)  # (num_embeddings, width): fan-in = width
            n_emb += 1
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
            n_ln += 1
    return KerasInitResult(weights=n_weights, biases=n_biases, norms=n_norms, embeddings=n_emb, layer_norms=n_ln)


# --------------------------------------------------------------------------- pruning


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module_name, module)`` of every Linear/Conv*/ConvTranspose* layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def prunable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(parameter_name, weight)`` of every Linear/Conv*/ConvTranspose* layer, in module order.

    Names match ``model.named_parameters()``; a weight shared by several layers appears once.
    """
    out, seen = [], set()
    for name, module in prunable_layers(model):
        weight = module.weight
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        out.append((f"{name}.weight" if name else "weight", weight))
    return out


def _apply_mask(param: Tensor, mask_cpu: Tensor) -> Tensor:
    mask = mask_cpu.to(param.device)
    param.masked_fill_(~mask, 0.0)  # masked_fill (not multiply) so the zeros are exact
    return mask


@torch.no_grad()
def random_prune_(
    model: nn.Module,
    pruned: float,
    first_layer_min_keep: float = 0.8,
    generator: torch.Generator | None = None,
    include_biases: bool = False,
) -> PruneResult:
    """Set a random fraction ``pruned`` of every kernel to zero, in place (docs/algorithm.md §3).

    Each entry of each Linear/Conv kernel is kept independently with probability ``1 - pruned``;
    the first prunable layer (module order) keeps with probability
    ``max(1 - pruned, first_layer_min_keep)``. Biases are untouched unless ``include_biases``, in
    which case each layer's bias is pruned with that layer's keep probability. (The reference's
    ``random_prune(prune_rate)`` takes the fraction *kept*; this takes the fraction pruned.)
    """
    p = _as_real(pruned, "pruned")
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"pruned must satisfy 0 <= pruned < 1, got {pruned}")
    first_keep = _as_real(first_layer_min_keep, "first_layer_min_keep")
    if not 0.0 <= first_keep <= 1.0:
        raise ValueError(f"first_layer_min_keep must be in [0, 1], got {first_layer_min_keep}")
    _check_generator(generator)
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("model has no Linear/Conv layers to prune")

    masks, kept, total, seen = {}, {}, {}, set()
    for i, (name, module) in enumerate(layers):
        keep = max(1.0 - p, first_keep) if i == 0 else 1.0 - p
        targets = [("weight", module.weight)]
        if include_biases and module.bias is not None:
            targets.append(("bias", module.bias))
        for attr, param in targets:
            if id(param) in seen:
                continue
            seen.add(id(param))
            _check_not_lazy(name, param)
            pname = f"{name}.{attr}" if name else attr
            masks[pname] = _apply_mask(param, _keep_mask(param.shape, keep, generator))
            kept[pname] = int(masks[pname].sum())
            total[pname] = param.numel()
    return PruneResult(masks=masks, kept=kept, total=total)


def _resolve_keep(
    keep: float | Sequence[float] | Mapping[str, float],
    names: list[str],
) -> list[float]:
    """One keep probability per prunable parameter, validated."""
    if isinstance(keep, Mapping):
        # Keys may be parameter names ("fc1.weight") or module names ("fc1").
        lookup = {}
        for key, value in keep.items():
            pname = key if key in names else f"{key}.weight" if f"{key}.weight" in names else None
            if pname is None:
                raise ValueError(f"unknown layer {key!r} in keep; prunable parameters: {names}")
            lookup[pname] = value
        missing = [n for n in names if n not in lookup]
        if missing:
            raise ValueError(f"keep has no entry for {missing}")
        ratios = [lookup[n] for n in names]
    elif isinstance(keep, Sequence) and not isinstance(keep, (str, bytes)):
        if len(keep) != len(names):
            raise ValueError(f"keep has {len(keep)} entries but the model has {len(names)} prunable layers: {names}")
        ratios = list(keep)
    else:
        ratios = [keep] * len(names)
    out = []
    for name, r in zip(names, ratios):
        r = _as_real(r, f"keep for {name}")
        if not 0.0 < r <= 1.0:
            raise ValueError(f"keep for {name} must satisfy 0 < keep <= 1, got {r}")
        out.append(r)
    return out


@torch.no_grad()
def shared_value_(
    model: nn.Module,
    value: float,
    keep: float | Sequence[float] | Mapping[str, float],
    generator: torch.Generator | None = None,
) -> PruneResult:
    """Single shared weight init (docs/algorithm.md §3 "agnostic"), in place.

    Every kernel entry of the prunable layers becomes ``value`` with probability ``keep`` and 0
    otherwise. ``keep`` is one ratio for all layers, a sequence ordered like
    :func:`prunable_parameters`, or a mapping from parameter or module name to ratio (e.g.
    ``[1/15, 1/7, 1/3]`` for F2). Biases are untouched (the paper's F1/F2 have none).
    """
    v = _as_real(value, "value")
    if not math.isfinite(v) or v == 0.0:
        raise ValueError(f"value must be finite and non-zero, got {value}")
    _check_generator(generator)
    params = prunable_parameters(model)
    if not params:
        raise ValueError("model has no Linear/Conv layers")
    ratios = _resolve_keep(keep, [n for n, _ in params])

    masks, kept, total = {}, {}, {}
    for (name, param), ratio in zip(params, ratios):
        _check_not_lazy(name, param)
        param.fill_(v)
        masks[name] = _apply_mask(param, _keep_mask(param.shape, ratio, generator))
        kept[name] = int(masks[name].sum())
        total[name] = param.numel()
    return PruneResult(masks=masks, kept=kept, total=total)
