"""Typed training configuration, the paper's presets, and config files.

A run is fully described by one :class:`TrainConfig`.  It can come from
defaults, a named preset (docs/algorithm.md §5), a YAML/TOML file, or command-line flags,
in that order of increasing priority.  Every field is validated here, so bad
input fails with one sentence naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from . import optim, reconnect

__all__ = [
    "ConfigError",
    "TrainConfig",
    "PRESETS",
    "InitSpec",
    "parse_init",
    "lr_factor",
    "k_for_epoch",
    "load_config_file",
    "resolve_config",
    "override_config",
    "RESUME_CHANGEABLE",
    "ALWAYS_HASHED",
    "option",
    "flag_name",
    "flag_fields",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


OPTIMIZERS = ("laperm", "adam", "sgd")
INNER = ("adam", "adamw", "sgd")
LOSS_SCALES = ("mean", "sum")
GRANULARITIES = reconnect.GRANULARITIES  # ("row", "tensor"): defined by the sync kernel
SYNC_RULES = optim.SYNC_RULES  # ("overwrite", "latent"): defined by the optimizer
# The training step: the plain loop, the device-resident fast path (docs/gpu.md), or auto: resolved at the
# start of a run (build.resolve_mode: fast on CUDA, eager on CPU) and saved resolved in config.yaml.
MODES = ("auto", "eager", "fast")
PRECISIONS = ("fp32", "bf16")

# Argument groups of `laperm train --help`.
WHAT, OPTIMISATION, RUN = "what to train", "optimisation", "run"


def option(
    default: Any,
    help: str = "",
    *,
    group: str = RUN,
    resume: bool = False,
    named: bool = True,
    flag: str | None = "",
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    hashed_as_default: tuple[Any, ...] = (),
) -> Any:
    """A :class:`TrainConfig` field with what the CLI, resume and run names need to know about it.

    * ``help``, ``group``, ``choices``, ``metavar``: its ``laperm train`` flag;
    * ``flag``: the flag's name ("" derives ``--field-name``; None: config files only);
    * ``resume``: whether a resumed run may change it (where and how to run, lr, epochs);
    * ``named``: whether it changes what is computed, so that it is hashed into the run name
      (only when it differs from its default: adding a field never renames a run);
    * ``hashed_as_default``: other values named like the default (a default that changed keeps the
      names of the runs made with the old one).
    """
    meta = {
        "help": help,
        "group": group,
        "resume": resume,
        "named": named,
        "flag": flag,
        "choices": choices,
        "metavar": metavar,
        "hashed_as_default": hashed_as_default,
    }
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``laperm train --help``).

    To add a field: one ``option(...)`` line here (help, flag, resume rule, whether it is
    named) and its check in :meth:`validate`; the CLI flag, the resume rule, the fuzz test's
    flags and the run name follow from it (docs/architecture.md, "Adding a config field").
    """

    model: str = option("lenet300", "model name (see `laperm models`); default lenet300", group=WHAT)
    dataset: str | None = option(
        None, "mnist, fashion-mnist, idx, cifar10, synthetic, synthetic-cifar, text (default: the model's)", group=WHAT
    )
    optimizer: str = option("laperm", "laperm (default) or a plain baseline", group=OPTIMISATION, choices=OPTIMIZERS)
    inner: str = option("adam", "LaPerm's inner optimizer (default adam)", group=OPTIMISATION, choices=INNER)
    k: int = option(100, "sync period in steps (default 100)", group=OPTIMISATION)
    # {epoch: k from that epoch on}; config files only
    k_schedule: dict[int, int] | None = option(None, "k from given epochs on", group=OPTIMISATION, flag=None)
    epochs: int = option(15, group=OPTIMISATION, resume=True)
    batch_size: int = option(128, group=OPTIMISATION)
    lr: float = option(1e-3, "base learning rate", group=OPTIMISATION, resume=True)
    lr_schedule: str = option("exp:0.9", "constant | exp:G | step:E:G | milestones:E=F,...", group=OPTIMISATION)
    momentum: float = option(0.9, "sgd only", group=OPTIMISATION, flag=None)
    # Keras' default, which the paper's runs used
    adam_eps: float = option(1e-7, "Adam's epsilon", group=OPTIMISATION, flag=None)
    loss_scale: str = option(
        "mean", "sum reproduces the reference's gradient scale", group=OPTIMISATION, choices=LOSS_SCALES
    )
    # Training loss only: cross-entropy of logit_scale * logits (a softmax temperature of 1/logit_scale).
    # Evaluation (accuracy and the reported val/test loss) always uses the plain logits.
    logit_scale: float = option(
        1.0,
        "train on cross-entropy of T*logits (default 1); evaluation uses the plain logits",
        group=OPTIMISATION,
        metavar="T",
    )
    l2: float | None = option(None, "coupled L2 coefficient (default: the paper's for the model)", group=OPTIMISATION)
    init: str = option(
        "he-uniform", "he-uniform | pruned:P | shared:V:KEEP[,KEEP..] (e.g. shared:0.08:0.6)", group=WHAT
    )
    permute_biases: bool | None = option(
        None, "permute biases too (default: as the paper does for the model)", group=OPTIMISATION
    )
    granularity: str = option("row", "unit of permutation", group=OPTIMISATION, choices=GRANULARITIES)
    # overwrite: the paper's rule (a sync overwrites the inner weights); latent: the inner weights are kept
    # apart and the model always sees their synced permutation (a straight-through estimator).
    sync_rule: str = option(
        "overwrite",
        "overwrite (default, the paper's: a sync overwrites the inner weights) or "
        "latent (the inner weights are kept apart and the model always runs on their synced "
        "permutation)",
        group=OPTIMISATION,
        metavar="{overwrite,latent}",
    )
    augment: str | None = option(None, "none, mnist-paper, cifar-paper, cifar-resnet", group=OPTIMISATION)
    val_size: int = option(5000, "validation images held out of the training set (default 5000)")
    train_subset: int | None = option(
        None, "train on a seeded random sample of this many images (text: the first N characters; reduced budgets)"
    )
    seed: int = option(0)
    data_dir: str | None = option(
        None,
        "dataset location (IDX folder; CIFAR-10 tarball, folder or zip; for text a UTF-8 file or folder, "
        "default: the Python reference bundled with Python)",
        group=WHAT,
        resume=True,
        named=False,
    )
    device: str = option("auto", "auto (default), cpu, cuda, cuda:N", resume=True, named=False)
    out: str = option("runs", "parent folder of run folders (default runs)", resume=True, named=False)
    name: str | None = option(None, "run folder name (default: derived from the config)", resume=True, named=False)
    bn_recalibrate: int = option(
        0,
        "recompute BatchNorm statistics on this many batches after each sync used for evaluation",
        group=OPTIMISATION,
        metavar="BATCHES",
    )
    eval_every: int = option(1, resume=True, metavar="EPOCHS")
    checkpoint_every: int = option(1, "checkpoint every N epochs (default 1)", resume=True, metavar="EPOCHS")
    eval_steps: int | None = option(
        None, "also evaluate (at a synced state) every STEPS steps, as the reference does with k", metavar="STEPS"
    )
    # checkpoint_steps only decides how often state is saved, never what is computed.
    checkpoint_steps: int | None = option(
        None,
        "also checkpoint every N steps, so a crash in a long epoch loses little",
        resume=True,
        named=False,
        metavar="STEPS",
    )
    keep_checkpoints: int = option(2, "checkpoints kept", resume=True, flag=None)
    # A deadline belongs to the command that sets it: `laperm train --resume` drops a saved one.
    stop_at: float | None = option(
        None,
        "stop cleanly before this Unix time (a checkpoint is saved; --resume continues), for machines "
        "lent for a limited time; `laperm run --deadline` sets it",
        resume=True,
        named=False,
        metavar="UNIX_TIME",
    )
    threads: int | None = option(None, "torch CPU threads", resume=True, named=False)
    progress: bool = option(True, "no progress bar", resume=True, named=False)
    nproc: int = option(
        1,
        "data-parallel processes on this machine (DDP via torchrun; gloo on CPU, NCCL on GPU); "
        "the global batch stays --batch-size",
        metavar="N",
    )
    check_replicas: bool = option(True, "distributed: skip comparing the ranks' weights after each sync", resume=True)
    # The fast path (docs/gpu.md). mode is named: its data stream (device generators, device augmentation)
    # differs from the host loader's, so it is another run; channels_last only reorders memory (unnamed, like threads).
    mode: str = option(
        "auto",
        "auto (default: fast on CUDA, eager on CPU, decided at the start of a run), eager, or fast: training "
        "data and augmentation held on the device, a step with no host sync (a CUDA graph on CUDA); one process",
        choices=MODES,
        hashed_as_default=("eager",),  # the default before auto existed: run names stay
    )
    precision: str = option("fp32", "fast mode: bf16 autocasts forward and loss (default fp32)", choices=PRECISIONS)
    # (not changeable on resume: the optimizer state saved in one memory format would meet weights in another)
    channels_last: bool = option(False, "fast mode: channels_last memory format (convnets)", named=False)
    preset: str | None = option(
        None, "a paper setup (see `laperm presets`); flags override it", group=WHAT, named=False
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short hash of everything that changes the result (not paths or display).

        A field is hashed when it is ``named`` and either was hashed by the first release
        (:data:`ALWAYS_HASHED`: existing run names) or differs from its default, so adding
        a field (at its default) never renames a run.
        """
        payload = {}
        for f in fields(self):
            value = getattr(self, f.name)
            as_default = value == f.default or value in f.metadata["hashed_as_default"]
            if f.metadata["named"] and (f.name in ALWAYS_HASHED or not as_default):
                payload[f.name] = value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]

    def run_name(self) -> str:
        if self.name:
            return self.name
        base = self.preset or self.model
        return f"{base}-{self.optimizer}-seed{self.seed}-{self.digest()}"

    def validate(self) -> TrainConfig:
        _positive_int(self, "epochs", "batch_size", "eval_every", "checkpoint_every", "keep_checkpoints")
        _positive_int(self, "k")
        if self.checkpoint_steps is not None:
            _positive_int(self, "checkpoint_steps")
        if self.eval_steps is not None:
            _positive_int(self, "eval_steps")
        _positive_int(self, "nproc")
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"batch_size {self.batch_size} must be divisible by nproc {self.nproc} "
                "(the global batch is split evenly across processes)"
            )
        if not isinstance(self.check_replicas, bool):
            raise ConfigError(f"check_replicas must be true or false, got {self.check_replicas!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.inner not in INNER:
            raise ConfigError(f"inner must be one of {', '.join(INNER)}, got {self.inner!r}")
        if self.loss_scale not in LOSS_SCALES:
            raise ConfigError(f"loss_scale must be 'mean' or 'sum', got {self.loss_scale!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.sync_rule not in SYNC_RULES:
            raise ConfigError(
                f"sync_rule must be 'overwrite' (the paper's) or 'latent' (inner weights kept, the "
                f"model always synced), got {self.sync_rule!r}; use --sync-rule overwrite or latent"
            )
        for name in ("lr", "adam_eps"):
            v = getattr(self, name)
            if not _is_number(v) or not _finite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if not _is_number(self.logit_scale) or not _finite(self.logit_scale) or self.logit_scale <= 0:
            raise ConfigError(
                f"logit_scale must be a positive finite number (the training loss uses "
                f"cross-entropy of logit_scale * logits), got {self.logit_scale!r}"
            )
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.l2 is not None and (not _is_number(self.l2) or not 0 <= self.l2 < 1):
            raise ConfigError(f"l2 must be a number in [0, 1) or left unset, got {self.l2!r}")
        for name in ("val_size", "bn_recalibrate"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ConfigError(f"{name} must be a whole number >= 0, got {v!r}")
        if self.train_subset is not None and (not _is_int(self.train_subset) or self.train_subset < 1):
            raise ConfigError(f"train_subset must be a positive whole number, got {self.train_subset!r}")
        if self.threads is not None and (not _is_int(self.threads) or not 1 <= self.threads <= MAX_THREADS):
            raise ConfigError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {self.threads!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}")
        if self.k_schedule is not None:
            if not isinstance(self.k_schedule, dict) or not all(
                _is_int(e) and e >= 0 and _is_int(k) and k >= 1 for e, k in self.k_schedule.items()
            ):
                raise ConfigError("k_schedule must map epochs (>= 0) to k values (>= 1), e.g. {0: 20, 10: 250}")
        for name in ("model", "out", "device", "lr_schedule", "init"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("dataset", "augment", "preset", "data_dir", "name"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"{name} must be a non-empty string or left unset, got {v!r}")
        for name in ("out", "data_dir", "name"):
            if "\0" in (getattr(self, name) or ""):
                raise ConfigError(f"{name} must not contain a NUL character")
        if self.name is not None and ("/" in self.name or "\\" in self.name or self.name in (".", "..")):
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}; set the parent folder with --out")
        if self.permute_biases is not None and not isinstance(self.permute_biases, bool):
            raise ConfigError(f"permute_biases must be true, false or unset, got {self.permute_biases!r}")
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress must be true or false, got {self.progress!r}")
        lr_factor(self.lr_schedule, 0)  # raises ConfigError when malformed
        if _log_max_factor(self.lr_schedule, self.epochs) + math.log(self.lr) > math.log(1e30):
            raise ConfigError(
                f"lr {self.lr:g} with lr_schedule {self.lr_schedule!r} grows past 1e30 within {self.epochs} "
                "epochs; use a decaying schedule (a factor below 1)"
            )
        parse_init(self.init)
        return _check_fast_path(_check_stop_at(self))


MAX_THREADS = 1024
MAX_COUNT = 10**12  # epochs, steps, batch sizes: anything larger is a typo, not a plan


def _check_stop_at(cfg: TrainConfig) -> TrainConfig:
    v = cfg.stop_at
    if v is not None and (not _is_number(v) or not _finite(v) or v <= 0):
        raise ConfigError(f"stop_at must be a Unix time in seconds (e.g. $(date +%s) + 600), got {v!r}")
    return cfg


def _check_fast_path(cfg: TrainConfig) -> TrainConfig:
    """mode, precision, channels_last: the fast path's options (docs/gpu.md); returns ``cfg``."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode must be 'auto', 'eager' or 'fast', got {cfg.mode!r}; use --mode auto, eager or fast")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {cfg.precision!r}; use --precision fp32 or bf16")
    if not isinstance(cfg.channels_last, bool):
        raise ConfigError(f"channels_last must be true or false, got {cfg.channels_last!r}")
    if cfg.mode == "eager" and (cfg.precision != "fp32" or cfg.channels_last):
        raise ConfigError("precision bf16 and channels_last are options of the fast step; add --mode fast")
    if cfg.mode == "fast" and cfg.nproc != 1:
        raise ConfigError(f"mode fast runs in one process, got nproc {cfg.nproc}; use --nproc 1 or --mode eager")
    return cfg


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}")
        if v > MAX_COUNT:
            raise ConfigError(f"{name} = {v} is absurdly large (the limit is {MAX_COUNT:.0e})")


# -- schedules -------------------------------------------------------------------


def lr_factor(schedule: str, epoch: int) -> float:
    """Multiplier of the base learning rate in ``epoch`` (0-based) under ``schedule``.

    * ``constant``
    * ``exp:G``            -- G**epoch (the paper's MNIST runs: exp:0.95)
    * ``step:E:G``         -- G**(epoch // E) (the paper's CIFAR convnets: step:10:0.6)
    * ``milestones:E=F,..`` -- factor F from epoch E on (ResNet: 80=0.1,120=0.01,160=0.001,180=0.0005)
    """
    try:
        kind, _, arg = schedule.partition(":")
        if kind == "constant" and not arg:
            return 1.0
        if kind == "exp":
            g = _positive_finite(arg)
            return g**epoch
        if kind == "step":
            every, g_text = arg.split(":")
            every_i, g_f = int(every), _positive_finite(g_text)
            if every_i < 1:
                raise ValueError
            return g_f ** (epoch // every_i)
        if kind == "milestones":
            factor = 1.0
            for item in arg.split(","):
                e, f = item.split("=")
                if int(e) < 0:
                    raise ValueError
                if epoch >= int(e):
                    factor = _positive_finite(f)
                else:
                    _positive_finite(f)
            return factor
    except (ValueError, OverflowError):
        pass
    raise ConfigError(
        f"lr_schedule {schedule!r} not understood; use constant, exp:0.95, step:10:0.6 or milestones:80=0.1,120=0.01"
    )


def _positive_finite(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise ValueError
    return v


def _log_max_factor(schedule: str, epochs: int) -> float:
    """log of the largest factor ``schedule`` reaches in ``epochs`` epochs (without overflowing)."""
    kind, _, arg = schedule.partition(":")
    last = max(epochs - 1, 0)
    if kind == "exp":
        return max(0.0, last * math.log(float(arg)))
    if kind == "step":
        every, g = arg.split(":")
        return max(0.0, (last // int(every)) * math.log(float(g)))
    if kind == "milestones":
        return max([0.0] + [math.log(float(f)) for e, f in (i.split("=") for i in arg.split(",")) if int(e) <= last])
    return 0.0


def k_for_epoch(cfg: TrainConfig, epoch: int) -> int:
    """The sync period in ``epoch`` (0-based): ``cfg.k`` unless ``k_schedule`` says otherwise."""
    k = cfg.k
    for start, value in sorted((cfg.k_schedule or {}).items()):
        if epoch >= start:
            k = value
    return k


# -- initialisations --------------------------------------------------------------


@dataclass(frozen=True)
class InitSpec:
    kind: str  # he-uniform | pruned | shared
    pruned: float = 0.0
    value: float = 0.0
    keep: tuple[float, ...] = ()

    def describe(self) -> str:
        if self.kind == "pruned":
            return f"he-uniform, {self.pruned:.0%} randomly pruned"
        if self.kind == "shared":
            keep = ", ".join(f"{k:.4g}" for k in self.keep)
            return f"single shared value {self.value:g}, keep ratio {keep}"
        return "he-uniform (dense)"


def parse_init(text: str) -> InitSpec:
    """``he-uniform``, ``pruned:0.4`` or ``shared:0.08:0.6`` / ``shared:0.03:1/15,1/7,1/3``."""
    hint = "use he-uniform, pruned:P (0 <= P < 1) or shared:V:KEEP[,KEEP...] (e.g. shared:0.08:0.6)"
    if not isinstance(text, str):
        raise ConfigError(f"init must be a string; {hint}")
    parts = text.split(":")
    try:
        if parts == ["he-uniform"]:
            return InitSpec("he-uniform")
        if parts[0] == "pruned" and len(parts) == 2:
            p = float(parts[1])
            if not 0 <= p < 1:
                raise ValueError
            return InitSpec("pruned", pruned=p)
        if parts[0] == "shared" and len(parts) in (2, 3):
            v = float(parts[1])
            keep = tuple(_fraction(x) for x in parts[2].split(",")) if len(parts) == 3 else (1.0,)
            if v == 0 or not math.isfinite(v) or not all(0 < k <= 1 for k in keep):
                raise ValueError
            return InitSpec("shared", value=v, keep=keep)
    except (ValueError, ZeroDivisionError):
        pass
    raise ConfigError(f"init {text!r} not understood; {hint}")


def _fraction(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


# -- presets (docs/algorithm.md §5) ---------------------------------------------------------------

_MNIST_PAPER = dict(lr=1e-3, lr_schedule="exp:0.95", adam_eps=1e-7, loss_scale="sum")
_CIFAR_CONV = dict(
    dataset="cifar10",
    batch_size=50,
    epochs=125,
    lr_schedule="step:10:0.6",
    k=1000,
    augment="cifar-paper",
    adam_eps=1e-7,
    loss_scale="sum",
)
_RESNET = dict(
    model="resnet50",
    dataset="cifar10",
    batch_size=50,
    epochs=200,
    k=400,
    lr_schedule="milestones:80=0.1,120=0.01,160=0.001,180=0.0005",
    augment="cifar-resnet",
    adam_eps=1e-7,
    loss_scale="sum",
)

PRESETS: dict[str, dict[str, Any]] = {
    "conv7": dict(model="conv7", batch_size=50, epochs=45, k=1200, augment="mnist-paper", **_MNIST_PAPER),
    "conv2": dict(model="conv2", **_CIFAR_CONV),
    "conv4": dict(model="conv4", **_CIFAR_CONV),
    "conv13": dict(model="conv13", **_CIFAR_CONV),
    "resnet50": dict(_RESNET),
    "resnet50-p30": dict(_RESNET, k=800, init="pruned:0.3"),
    "resnet50-p50": dict(_RESNET, k=800, init="pruned:0.5"),
    "resnet50-p70": dict(_RESNET, k=800, init="pruned:0.7"),
    # The reference notebook evaluates every 250 steps (right after each sync): eval_steps.
    "f1": dict(model="f1", batch_size=128, epochs=10, k=250, eval_steps=250, init="shared:0.08:0.6", **_MNIST_PAPER),
    "f2": dict(
        model="f2", batch_size=128, epochs=25, k=250, eval_steps=250, init="shared:0.03:1/15,1/7,1/3", **_MNIST_PAPER
    ),
    # Beyond the paper: small Transformers (docs/results.md, "Transformers"), sized for a few CPU minutes.
    # k=250: of k in {10, 50, 250} (seed 0) the best validation bits per character with the paper's
    # overwrite rule. Both presets keep the paper's rule; the latent rule at k=1 comes closer to Adam.
    "char-gpt": dict(model="char-gpt", dataset="text", batch_size=32, epochs=10, k=250, lr=2e-3, lr_schedule="exp:0.8"),
    "vit-tiny": dict(model="vit-tiny", batch_size=128, epochs=5, k=100, lr=1e-3, lr_schedule="exp:0.8"),
}
PRESET_NOTES = {
    "conv7": "MNIST Conv7, README 99.72%",
    "conv2": "CIFAR-10 Conv2, README 78.21%",
    "conv4": "CIFAR-10 Conv4, README 89.17%",
    "conv13": "CIFAR-10 Conv13 (VGG-style), README 92.21%",
    "resnet50": "CIFAR-10 ResNet 6n+2 (n=8), dense, README 92.53%",
    "resnet50-p30": "ResNet50, 30% pruned, README 92.32%",
    "resnet50-p50": "ResNet50, 50% pruned, README 92.02%",
    "resnet50-p70": "ResNet50, 70% pruned, README 90.97%",
    "f1": "MNIST F1, single shared value 0.08, 40% pruned, README 85.46%",
    "f2": "MNIST F2, single shared value 0.03, ~92.6% pruned, README 78.14% (not reproducible, docs/algorithm.md §5)",
    "char-gpt": "beyond the paper: character-level GPT on the Python reference text (bits per character); "
    "paper's sync rule; closest to Adam with --sync-rule latent --k 1",
    "vit-tiny": "beyond the paper: small vision Transformer on MNIST (7x7 patches); "
    "paper's sync rule; closest to Adam with --sync-rule latent --k 1",
}


# -- files and merging ----------------------------------------------------------------------

FIELD_NAMES = {f.name for f in fields(TrainConfig)}

# The fields the first release hashed into run names even at their defaults. Frozen: the names
# of the runs under results/ depend on it. Fields added since are hashed only when not at
# their default (TrainConfig.digest).
ALWAYS_HASHED = frozenset(
    {
        "model",
        "dataset",
        "optimizer",
        "inner",
        "k",
        "k_schedule",
        "epochs",
        "batch_size",
        "lr",
        "lr_schedule",
        "momentum",
        "adam_eps",
        "loss_scale",
        "l2",
        "init",
        "permute_biases",
        "granularity",
        "augment",
        "val_size",
        "train_subset",
        "seed",
        "bn_recalibrate",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
    }
)


def flag_name(f: dataclasses.Field[Any]) -> str | None:
    """The ``laperm train`` flag of config field ``f`` (None: config files only)."""
    flag = f.metadata["flag"]
    if flag == "":
        return ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
    return flag


def flag_fields() -> list[dataclasses.Field[Any]]:
    """The config fields that have a ``laperm train`` flag, in declaration order."""
    return [f for f in fields(TrainConfig) if flag_name(f) is not None]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of config fields."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML or TOML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML or TOML file")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {_first_line(e)}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    data = data.get("train", data) if isinstance(data.get("train"), dict) else data
    return data


def _show(key: Any) -> str:
    """A field name as typed, or quoted when it holds odd characters (so messages stay one line)."""
    return key if isinstance(key, str) and key.isidentifier() else repr(key)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def resolve_config(*layers: dict[str, Any] | None) -> TrainConfig:
    """Merge layers of overrides (later wins) onto the defaults, expanding ``preset``."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        unknown = set(layer) - FIELD_NAMES
        if unknown:
            raise ConfigError(
                f"unknown config field(s): {', '.join(sorted(map(_show, unknown)))}; "
                f"valid fields: {', '.join(sorted(FIELD_NAMES))}"
            )
        merged.update({k: v for k, v in layer.items() if v is not None})
    preset = merged.get("preset")
    values: dict[str, Any] = {}
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        # Later layers override the preset, but only for fields they actually set.
    values.update(merged)
    _coerce_k_schedule(values)
    _coerce_floats(values)
    return TrainConfig(**values).validate()


# Fields that may differ from the saved config when a run is resumed (``option(resume=True)``):
# where things are, how they are shown and saved, and the two a user needs to rescue or extend a
# run (a lower lr after a divergence, more epochs). The rest would silently make the
# resumed run a different experiment, so it is refused.
RESUME_CHANGEABLE = frozenset(f.name for f in fields(TrainConfig) if f.metadata["resume"])


def override_config(base: dict[str, Any], *layers: dict[str, Any] | None) -> TrainConfig:
    """``base`` (a saved run's config) with the fields that later layers set; no preset expansion."""
    values = dict(base)
    for layer in layers:
        if not layer:
            continue
        unknown = set(layer) - FIELD_NAMES
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(map(_show, unknown)))}")
        values.update({k: v for k, v in layer.items() if v is not None})
    _coerce_k_schedule(values)
    _coerce_floats(values)
    return TrainConfig(**values).validate()


def _coerce_k_schedule(values: dict[str, Any]) -> None:
    # TOML keys are always strings, so accept "10" as well as 10, but never 2.5 or true.
    ks = values.get("k_schedule")
    if not isinstance(ks, dict):
        return

    def whole(v: Any) -> int:
        if _is_int(v):
            return v
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        raise ValueError

    try:
        values["k_schedule"] = {whole(e): whole(k) for e, k in ks.items()}
    except ValueError:
        raise ConfigError("k_schedule must map epochs to k values, e.g. {0: 20, 10: 250}") from None


def _coerce_floats(values: dict[str, Any]) -> None:
    # YAML reads 1e-3 as a string; accept integers where floats are expected.
    for name in ("lr", "adam_eps", "momentum", "l2", "logit_scale", "stop_at"):
        v = values.get(name)
        if isinstance(v, str):
            try:
                values[name] = float(v)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {v!r}") from None
        elif isinstance(v, int) and not isinstance(v, bool):
            values[name] = float(v) if _finite(v) else math.inf  # validate() then names the field
