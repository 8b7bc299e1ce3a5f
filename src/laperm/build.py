"""Everything a run is built from, made from one :class:`TrainConfig`: device, data, loaders,
model (with its configured init), optimizer and the set of permuted tensors.

One module, used by the engine, ``export`` (to rebuild θ0 from a seed) and the
experiments, so that "what does this config train" has one answer.  The seeds
of every random stream are derived here (``derive_seed(cfg.seed, n)``); their
numbers are part of the run format -- changing one changes every result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import init as winit
from . import models
from .config import ConfigError, TrainConfig, k_for_epoch, parse_init
from .data import BatchLoader, Dataset, load_dataset, make_augment, random_subset, train_val_split
from .data import text as textdata
from .data.device import DeviceBatches
from .data.loader import derive_seed
from .optim import LaPerm, laperm_param_groups, permuted_layouts
from .overview import Description, describe
from .reconnect import RowLayout

__all__ = [
    "resolve_device",
    "resolve_permute_biases",
    "model_layouts",
    "describe_model",
    "load_data",
    "model_options",
    "build_model",
    "build_optimizer",
    "Loaders",
    "build_loaders",
    "build_test_loader",
    "build_augment",
    "EVAL_BATCH",
    "CALIB_BATCH",
]

EVAL_BATCH = 1000  # evaluation batch (only speed depends on it)
CALIB_BATCH = 256  # BatchNorm recalibration batch


class Seeds:
    """The ``derive_seed(cfg.seed, n)`` stream numbers (fixed: they are part of every result)."""

    MODEL, INIT, SPLIT, TRAIN_ORDER, CALIB_ORDER, GLOBAL_RNG, PROBE_CALIB, SUBSET = 1, 2, 3, 4, 5, 6, 7, 8


def resolve_mode(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with ``mode: auto`` decided (other modes as they are): ``fast`` on a CUDA device; ``eager``
    on CPU, for several processes and for text models, which the fast path does not train."""
    if cfg.mode != "auto":
        return cfg
    try:
        text = (cfg.dataset or models.get_spec(cfg.model).dataset) == "text"
    except models.UnknownModelError:
        text = False  # (the unknown name is reported where the model is built)
    fast = device.type == "cuda" and cfg.nproc == 1 and not text
    return dataclasses.replace(cfg, mode="fast" if fast else "eager").validate()


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device that exists here, else a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {name!r} not understood; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_permute_biases(model: str, override: bool | None) -> bool:
    """Whether biases are permuted: ``override`` if set, else the paper's setting for ``model``."""
    return models.get_spec(model).permute_biases if override is None else override


def model_layouts(cfg: TrainConfig, model: nn.Module) -> dict[str, RowLayout]:
    """``{name: RowLayout}`` of the tensors the run of ``cfg`` permutes in ``model`` (the optimizer's rule)."""
    return permuted_layouts(model, resolve_permute_biases(cfg.model, cfg.permute_biases), cfg.granularity)


def describe_model(cfg: TrainConfig, model: nn.Module) -> Description:
    """:func:`laperm.overview.describe` of the run of ``cfg`` on ``model`` (at θ0), not printed."""
    biases = resolve_permute_biases(cfg.model, cfg.permute_biases)
    return describe(model, permute_biases=biases, granularity=cfg.granularity, show=False)


def load_data(cfg: TrainConfig, spec: models.ModelSpec) -> Dataset | textdata.TextCorpus:
    """The run's dataset, checked against the model's input shape and number of classes
    (a text model's: a character corpus long enough for its context)."""
    models.check_trainable(spec.name)  # (a model that needs options the config cannot give fails here, not later)
    name = cfg.dataset or spec.dataset
    if (name in textdata.TEXT_DATASETS) != (spec.dataset in textdata.TEXT_DATASETS):
        raise ConfigError(
            f"model {spec.name} is for {spec.dataset} data, not {name}; pick a matching "
            "--model or --dataset (char-gpt for --dataset text)"
        )
    if name in textdata.TEXT_DATASETS:
        corpus = textdata.load_text_corpus(cfg.data_dir)
        textdata.check_length(corpus, spec.input_shape[-1])
        return corpus
    ds = load_dataset(name, cfg.data_dir)
    if tuple(ds.input_shape) != tuple(spec.input_shape):
        raise ConfigError(
            f"model {spec.name} expects {spec.dataset} images of shape "
            f"{'x'.join(map(str, spec.input_shape))}, but dataset {name} has "
            f"{'x'.join(map(str, ds.input_shape))}; pick a matching --model or --dataset"
        )
    if ds.num_classes != spec.num_classes:
        raise ConfigError(f"model {spec.name} has {spec.num_classes} outputs but {name} has {ds.num_classes} classes")
    return ds


def model_options(ds: Dataset | textdata.TextCorpus) -> dict[str, Any]:
    """What the model class needs to know of the data: a text model's ``vocab_size`` (images: nothing)."""
    return {"vocab_size": len(ds.vocab)} if isinstance(ds, textdata.TextCorpus) else {}


def build_model(
    cfg: TrainConfig, device: torch.device, **model_options: Any
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The Keras-initialised model with the configured init applied; returns (model, masks).

    ``model_options`` go to the model class (a text model's ``vocab_size``: :func:`model_options`)."""
    model = models.build(cfg.model, seed=derive_seed(cfg.seed, Seeds.MODEL), **model_options)
    spec = parse_init(cfg.init)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, Seeds.INIT))
    masks: dict[str, torch.Tensor] = {}
    if spec.kind == "pruned" and spec.pruned > 0:
        masks = winit.random_prune_(model, spec.pruned, generator=g).masks
    elif spec.kind == "shared":
        keep = spec.keep[0] if len(spec.keep) == 1 else list(spec.keep)
        try:
            masks = winit.shared_value_(model, spec.value, keep, generator=g).masks
        except ValueError as e:
            raise ConfigError(f"init {cfg.init!r}: {e}") from None
    return model.to(device), {k: v.to(device) for k, v in masks.items()}


def build_optimizer(cfg: TrainConfig, model: nn.Module, *, capturable: bool = False) -> torch.optim.Optimizer:
    """LaPerm over the configured inner optimizer, or the plain baseline optimizer.

    ``capturable``: Adam fused and capturable on any device (the capture-safety check on CPU runs the
    inner step that a CUDA graph would capture)."""
    groups = laperm_param_groups(model, permute_biases=resolve_permute_biases(cfg.model, cfg.permute_biases))
    kind = cfg.inner if cfg.optimizer == "laperm" else cfg.optimizer
    inner: torch.optim.Optimizer
    # The fast path's CUDA graph captures the inner step: Adam fused and capturable there.
    graphable = capturable or (cfg.mode == "fast" and next(model.parameters()).device.type == "cuda")
    adam: dict[str, Any] = {"fused": True, "capturable": True} if graphable else {}
    if kind == "adam":
        inner = torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.adam_eps, **adam)
    elif kind == "adamw":
        inner = torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.adam_eps, **adam)
    else:
        inner = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer != "laperm":
        return inner
    return LaPerm(inner, k=k_for_epoch(cfg, 0), granularity=cfg.granularity, sync_rule=cfg.sync_rule)


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # an evaluation loader: (x, y) batches


@dataclass
class Loaders:
    """The run's four loaders: training, BN recalibration, validation (None: no split), test.

    Image runs use :class:`BatchLoader` (training: :class:`DeviceBatches` in ``--mode fast``,
    engine.fast); text runs windows of characters (:class:`~laperm.data.text.WindowLoader`, the
    same interface, and evaluation windows)."""

    train: BatchLoader | DeviceBatches | textdata.WindowLoader
    calib: BatchLoader | textdata.WindowLoader
    val: Batches | None
    test: Batches
    train_size: int
    val_size: int
    sizes: str  # the split sizes, for the run's first log line


def build_augment(cfg: TrainConfig) -> Any:
    """The training augmentation ``cfg.augment`` names (None: none), or a ConfigError."""
    try:
        return make_augment(cfg.augment)
    except ValueError as e:
        raise ConfigError(f"augment: {e}") from None


def build_loaders(
    cfg: TrainConfig, ds: Dataset | textdata.TextCorpus, device: torch.device, shard: tuple[int, int] = (0, 1)
) -> Loaders:
    """Validation split carved from the training set, optional subset, and the loaders (rank ``shard``).

    A text corpus: :func:`build_text_loaders`."""
    if isinstance(ds, textdata.TextCorpus):
        return build_text_loaders(cfg, ds, device, shard)
    augment = build_augment(cfg)
    train_idx, val_idx = train_val_split(len(ds.train_y), cfg.val_size, derive_seed(cfg.seed, Seeds.SPLIT))
    if cfg.train_subset:
        train_idx = random_subset(train_idx, cfg.train_subset, derive_seed(cfg.seed, Seeds.SUBSET))
    common: dict[str, Any] = dict(mean=ds.mean, std=ds.std, device=device)
    train_x, train_y, test_x, test_y = ds.train_x, ds.train_y, ds.test_x, ds.test_y
    if device.type == "cuda":
        # Keep the uint8 images on the GPU (CIFAR-10: 180 MB): batches are gathered there,
        # not copied from the host at every step.
        train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    return Loaders(
        train=BatchLoader(
            train_x,
            train_y,
            cfg.batch_size,
            shuffle=True,
            seed=derive_seed(cfg.seed, Seeds.TRAIN_ORDER),
            augment=augment,
            indices=train_idx,
            shard=shard,
            **common,
        ),
        calib=BatchLoader(
            train_x,
            train_y,
            CALIB_BATCH,
            shuffle=True,
            seed=derive_seed(cfg.seed, Seeds.CALIB_ORDER),
            indices=train_idx,
            **common,
        ),
        val=(
            BatchLoader(train_x, train_y, EVAL_BATCH, shuffle=False, indices=val_idx, shard=shard, **common)
            if len(val_idx)
            else None
        ),
        test=BatchLoader(test_x, test_y, EVAL_BATCH, shuffle=False, shard=shard, **common),
        train_size=len(train_idx),
        val_size=len(val_idx),
        sizes=f"{len(train_idx):,} train / {len(val_idx):,} val / {len(ds.test_y):,} test",
    )


def build_test_loader(cfg: TrainConfig, ds: Dataset | textdata.TextCorpus, device: torch.device) -> Batches:
    """The whole test set, unsharded, for evaluations outside a run (the run's own test loader's batches)."""
    if isinstance(ds, textdata.TextCorpus):
        return textdata.EvalWindows(ds.test, models.get_spec(cfg.model).input_shape[-1], device=device)
    return BatchLoader(ds.test_x, ds.test_y, EVAL_BATCH, shuffle=False, mean=ds.mean, std=ds.std, device=device)


def build_text_loaders(
    cfg: TrainConfig, ds: textdata.TextCorpus, device: torch.device, shard: tuple[int, int] = (0, 1)
) -> Loaders:
    """Window loaders of a character corpus (contiguous 90/5/5 splits); ``train_subset`` keeps a
    prefix of that many training characters."""
    context = models.get_spec(cfg.model).input_shape[-1]
    train, calib, val, test = textdata.text_loaders(
        ds, context, cfg.batch_size, cfg.seed, device=device, shard=shard, train_chars=cfg.train_subset
    )
    return Loaders(
        train=train,
        calib=calib,
        val=val,
        test=test,
        train_size=len(train.ids),
        val_size=len(ds.val),
        sizes=f"{len(train.ids):,} train / {len(ds.val):,} val / {len(ds.test):,} test characters, "
        f"{len(ds.vocab)} symbols",
    )
