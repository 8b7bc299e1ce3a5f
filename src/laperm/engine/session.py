"""``train(cfg)``: check everything that can be checked, claim the run folder, run a :class:`Trainer`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import build, distributed, models, provenance, rundir
from ..config import ConfigError, TrainConfig
from ..data import Dataset
from ..data.text import TextCorpus
from .callbacks import Callbacks, EpochCallback
from .checkpointing import find_resume_checkpoint, resume_config
from .summary import hardware
from .text import record_vocab
from .trainer import Trainer

__all__ = ["train"]


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict[str, Any], nn.Module, torch.optim.Optimizer], None] | None = None,
    callbacks: Callbacks | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing the run folder; returns the summary dict.

    ``callbacks`` (see :class:`Callbacks`) let analyses ride along; ``on_epoch`` is a
    shorthand for a ``Callbacks`` with only that method.

    With ``resume``, the run folder ``cfg.out / cfg.run_name()`` continues from
    its newest good checkpoint; ``cfg`` must equal the saved config except for
    :data:`~laperm.config.RESUME_CHANGEABLE` fields (a lower ``lr``, more
    ``epochs``, where and how to run).  Everything that can be checked without
    writing (config, device, model, data) is checked before the run folder is
    created, so bad input leaves no half-made folder behind.
    """
    cfg.validate()
    device = build.resolve_device(cfg.device)
    cfg = build.resolve_mode(cfg, device)  # mode auto: decided here, before the run is named
    d, device = distributed.setup(device)
    finished = False
    try:  # from here on every exit tears down the process group setup() made, and only that one
        if d.enabled and cfg.nproc != d.world:
            cfg = dataclasses.replace(cfg, nproc=d.world).validate()  # e.g. launched by torchrun directly
        if on_epoch is not None:
            if callbacks is not None:
                raise TypeError("pass on_epoch or callbacks, not both")
            callbacks = EpochCallback(on_epoch)
        summary = _checked_run(cfg, d, device, resume, overwrite, log, callbacks or Callbacks())
        finished = True
        return summary
    finally:
        distributed.teardown(d, finished)


def _quiet(message: str) -> None:
    """The log of ranks other than 0 (rank 0 speaks for the job)."""


def _checked_run(
    cfg: TrainConfig,
    d: distributed.Dist,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], None],
    callbacks: Callbacks,
) -> dict[str, Any]:
    """Validate what needs no writing, then take the run folder (and its lock) and train."""
    if not d.is_main:
        log = _quiet
    run_dir = Path(cfg.out) / cfg.run_name()
    if d.is_main:  # (other ranks might see the folder rank 0 has just made)
        rundir.check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        if (run_dir / "stack.json").exists():  # (engine.stacked.STACK_FILE; its optimizer state is the stack's)
            raise ConfigError(
                f"{run_dir} is a member of a stacked run; resume the whole stack: laperm train --resume {run_dir}"
            )
        cfg = resume_config(cfg, rundir.read_run_config(run_dir), run_dir)
    spec = models.get_spec(cfg.model)
    ds = build.load_data(cfg, spec)
    if isinstance(ds, Dataset) and cfg.val_size >= len(ds.train_y):
        raise ConfigError(
            f"val_size {cfg.val_size} leaves no training data ({len(ds.train_y)} images); lower --val-size"
        )
    build.build_augment(cfg)  # a bad --augment fails here, before the folder exists
    if d.is_main:
        run_dir = rundir.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    d.barrier()  # the folder exists (and damaged files are set aside) before other ranks look
    with rundir.locked(run_dir) if d.is_main else contextlib.nullcontext():
        with rundir.write_errors_explained(run_dir):
            return _run(cfg, run_dir, resume, device, spec, ds, log, callbacks, d)


def _run(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    device: torch.device,
    spec: models.ModelSpec,
    ds: Dataset | TextCorpus,
    log: Callable[[str], None],
    callbacks: Callbacks,
    d: distributed.Dist,
) -> dict[str, Any]:
    """Find the checkpoint to resume (or write the config), build the loaders and fit."""
    resumed: tuple[Path | None, dict[str, Any] | None] = (None, None)
    if resume:
        resumed = find_resume_checkpoint(run_dir, d.is_main, log, d.barrier)
        if d.is_main:
            if cfg.to_dict() != rundir.read_run_config(run_dir):
                rundir.write_config(run_dir, cfg.to_dict())  # it now describes the rest of the run
            d.barrier()
    elif d.is_main:
        rundir.write_config(run_dir, cfg.to_dict())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaders = build.build_loaders(cfg, ds, device, shard=(d.rank, d.world))
    if isinstance(ds, TextCorpus):
        record_vocab(run_dir, ds.vocab, resume, write=d.is_main)
    trainer = Trainer(cfg, run_dir, device, spec, ds, loaders, log, callbacks, d, resumed)
    if d.is_main:  # where this stretch of the run trains (the report credits each run with its own)
        provenance.record(run_dir, step=trainer.state.step, device=device, hardware=hardware(device))
    return trainer.fit()
