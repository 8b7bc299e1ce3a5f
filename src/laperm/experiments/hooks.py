"""Analysis hooks that ride along a training run and write small files into its folder.

* ``rebuild``: at evaluated epochs (synced state; see :func:`rebuild_epoch`), the test accuracy of
  the net rebuilt from its θ0 values at the trained ranks, of the same ranks
  with a fresh init's values, and of θ0 randomly permuted within rows
  (``rebuild.jsonl``).  Nets with BatchNorm also get the rebuilt accuracy after
  recomputing BN statistics, since a rebuild changes every activation scale.
* ``inner``: at every evaluated epoch, the test accuracy of the *inner*
  (unsynced) weights -- with ``sync_rule="latent"``, the latent weights -- and
  the per-class recall of the synced net, written into the epoch's metrics
  record (``inner_test_acc``, ``class_recall``).
* ``dynamics``: per scheduled sync, the fraction of weights moved per layer
  (``dynamics.json``), plus snapshots of small layers (``snapshots.npz``) for
  F1's template animation.
* ``synccost``: where a sync costs. At every epoch end, before the engine syncs for
  evaluation, the validation loss and accuracy of the inner (unsynced) weights, of the synced
  weights, and of the inner weights with only the tensors of one role synced (the same
  projection in every block: ``fc1``, ``attn.qkv``, ...; ``synccost.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import build, rundir
from ..analysis.dynamics import SyncRecorder
from ..analysis.rebuild import random_permutation_state, rebuild_state
from ..checkpoint import atomic_write_text, load
from ..config import TrainConfig
from ..data.text import EvalWindows, TextCorpus, bits_per_char
from ..engine import Callbacks, batchnorm_modules, evaluate, recalibrate_bn
from ..models import get_spec
from ..models.transformer import weight_role

__all__ = ["make", "Probe", "RebuildProbe", "DynamicsProbe", "InnerProbe", "SyncCostProbe"]


class Probe(Callbacks):
    """No-op hook: engine callbacks (:class:`laperm.train.Callbacks`) plus ``finish`` after the run."""

    def finish(self, summary: dict[str, Any]) -> None:
        return None


def make(name: str | None, cfg: TrainConfig, run_dir: Path) -> Probe:
    if name is None:
        return Probe()
    if name == "rebuild":
        return RebuildProbe(cfg, run_dir)
    if name == "dynamics":
        return DynamicsProbe(run_dir)
    if name == "inner":
        return InnerProbe(cfg)
    if name == "synccost":
        return SyncCostProbe(cfg, run_dir)
    raise ValueError(f"unknown analysis hook {name!r}")


class RebuildProbe(Probe):
    """Rebuild accuracies per epoch, appended to ``rebuild.jsonl``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, probe_size: int | None = None) -> None:
        self.cfg, self.run_dir, self.probe_size = cfg, run_dir, probe_size
        self._ready = False

    def _setup(self, model: torch.nn.Module) -> None:
        from ..data import BatchLoader
        from ..data.loader import derive_seed

        cfg = self.cfg
        device = next(model.parameters()).device
        spec = get_spec(cfg.model)
        self.layouts = build.model_layouts(cfg, model)
        self.init = load(self.run_dir / "init.pt")["state"]
        fresh_cfg = TrainConfig(**{**cfg.to_dict(), "seed": cfg.seed + 1000})
        ds = build.load_data(cfg, spec)
        self.text = isinstance(ds, TextCorpus)
        fresh, _ = build.build_model(fresh_cfg, torch.device("cpu"), **build.model_options(ds))
        self.fresh = fresh.state_dict()
        self.has_bn = bool(batchnorm_modules(model))
        self._ready = True
        self.test: build.Batches
        if isinstance(ds, TextCorpus):  # a language model: the fixed test windows
            self.test = EvalWindows(ds.test, spec.input_shape[-1], device=device)
            return
        idx = None if self.probe_size is None else torch.arange(min(self.probe_size, len(ds.test_y)))
        common: dict[str, Any] = dict(mean=ds.mean, std=ds.std, device=device)
        self.test = BatchLoader(ds.test_x, ds.test_y, 1000, shuffle=False, indices=idx, **common)
        self.calib = BatchLoader(ds.train_x, ds.train_y, 256, shuffle=True, seed=derive_seed(cfg.seed, 7), **common)

    def on_epoch(self, record: dict[str, Any], model: torch.nn.Module, opt: Any) -> None:
        if not rebuild_epoch(record["epoch"], self.cfg.epochs):
            return
        if not self._ready:
            self._setup(model)
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(record["epoch"])
        variants = {
            "rebuilt": rebuild_state(trained, self.init, self.layouts),
            "rebuilt_fresh": rebuild_state(trained, self.fresh, self.layouts),
            "random_perm": random_permutation_state(trained, self.init, self.layouts, g),
        }
        out = {"epoch": record["epoch"]}
        self._measure(model, "trained", out)
        try:
            for name, state in variants.items():
                model.load_state_dict(state)
                self._measure(model, name, out)
                if self.has_bn and name == "rebuilt":
                    recalibrate_bn(model, self.calib, 20)
                    out["rebuilt_bn"] = evaluate(model, self.test)[1]
        finally:
            model.load_state_dict(trained)  # the training trajectory must not change
        with open(self.run_dir / "rebuild.jsonl", "a") as f:
            f.write(json.dumps(out) + "\n")

    def _measure(self, model: torch.nn.Module, name: str, out: dict[str, Any]) -> None:
        """Test accuracy into ``out[name]``; for a language model also bits per character (``name_bpc``)."""
        loss, out[name] = evaluate(model, self.test)
        if self.text:
            out[f"{name}_bpc"] = bits_per_char(loss)


def rebuild_epoch(epoch: int, epochs: int) -> bool:
    """Whether the rebuild is measured after ``epoch``: every epoch of short runs; in runs over
    20 epochs epochs 1, 2, 5, every 10th and the last (each rebuild costs four test passes)."""
    return epochs <= 20 or epoch in (1, 2, 5, epochs) or epoch % 10 == 0


class DynamicsProbe(Probe):
    """Per-sync moved fractions; snapshots of layers with at most 10 units (F1's templates)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.recorder: SyncRecorder | None = None

    def on_optimizer(self, opt: Any, model: torch.nn.Module) -> None:
        if hasattr(opt, "permuted_parameters"):
            small = tuple(n for n, p in opt.permuted_parameters() if p.dim() == 2 and p.shape[0] <= 10)
            self.recorder = SyncRecorder(snapshot=small).attach(opt)

    def finish(self, summary: dict[str, Any]) -> None:
        rec = self.recorder
        if rec is None:
            return
        atomic_write_text(self.run_dir / "dynamics.json", json.dumps({"syncs": rec.records}) + "\n")
        if rec.snapshots:
            steps = np.array([s for s, _ in rec.snapshots])
            arrays = {
                name: np.stack([snap[name].numpy() for _, snap in rec.snapshots]).astype(np.float16)
                for name in rec.snapshots[0][1]
            }
            np.savez_compressed(self.run_dir / "snapshots.npz", steps=steps, **arrays)  # type: ignore[arg-type]


class InnerProbe(Probe):
    """Adds the inner (unsynced) test accuracy and the synced per-class recall to each metrics record."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.inner_acc: float | None = None
        self.test: Any = None
        self.classes = 0

    def _loader(self, model: torch.nn.Module) -> Any:
        if self.test is None:
            from ..data import BatchLoader

            ds = build.load_data(self.cfg, get_spec(self.cfg.model))
            if isinstance(ds, TextCorpus):
                raise ValueError("the inner probe measures image classifiers (per-class recall), not text models")
            self.classes = ds.num_classes
            self.test = BatchLoader(
                ds.test_x,
                ds.test_y,
                1000,
                shuffle=False,
                mean=ds.mean,
                std=ds.std,
                device=next(model.parameters()).device,
            )
        return self.test

    def before_evaluation(self, record: dict[str, Any], model: torch.nn.Module, opt: Any) -> None:
        # The inner weights, just before the engine syncs for evaluation (for a latent group its
        # latent weights, put in place for this). Only epoch records (they carry the epoch's training
        # loss) keep the value, so the step evaluations (eval_steps) are not measured.
        if "train_loss" in record and hasattr(opt, "inner_weights"):
            with opt.inner_weights():
                self.inner_acc = evaluate(model, self._loader(model))[1]

    @torch.no_grad()
    def on_epoch(self, record: dict[str, Any], model: torch.nn.Module, opt: Any) -> None:
        record["inner_test_acc"] = self.inner_acc
        was = model.training
        model.eval()
        loader = self._loader(model)
        n = self.classes  # the dataset's classes (the model's outputs: load_data checks they agree)
        hits = torch.zeros(n, dtype=torch.long)
        counts = torch.zeros(n, dtype=torch.long)
        for xb, yb in loader:
            pred = model(xb).argmax(1).cpu()
            y = yb.cpu()
            counts += torch.bincount(y, minlength=n)[:n]
            hits += torch.bincount(y[pred == y], minlength=n)[:n]
        model.train(was)
        record["class_recall"] = [round(float(h) / max(int(c), 1), 4) for h, c in zip(hits, counts, strict=True)]


class SyncCostProbe(Probe):
    """What one sync costs, by role of the weights, at every epoch end (``synccost.jsonl``).

    Each record: the epoch, the steps since the last sync, and for ``inner`` (no tensor synced),
    ``synced`` (all) and each role alone (``only <role>``, :func:`weight_role`: the same tensor of
    every block) the validation loss and accuracy (for a language model also bits per character).
    A role whose sync alone costs about what syncing everything costs is where the overwrite loses
    the inner optimizer's progress. ``weights[role]`` says how far the inner weights have moved
    from the values a sync puts back: ``scale`` = rms(inner) / rms(synced) (the synced rows hold
    the initial values, so this is the growth of the weights' magnitude) and ``change`` =
    rms(inner - synced) / rms(synced). The weights are restored afterwards, so the training
    trajectory is unchanged.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.val: Any = None
        self.text = False  # a language model (set with the loader): bits per character too

    def _loader(self, model: torch.nn.Module) -> Any:
        if self.val is None:
            ds = build.load_data(self.cfg, get_spec(self.cfg.model))
            self.text = isinstance(ds, TextCorpus)
            self.val = build.build_loaders(self.cfg, ds, next(model.parameters()).device).val
            if self.val is None:
                raise ValueError("the synccost probe measures on the validation split: give val_size > 0")
        return self.val

    def _measure(self, model: torch.nn.Module) -> dict[str, float]:
        loss, acc = evaluate(model, self._loader(model))
        out = {"loss": loss, "acc": acc}
        if self.text:
            out["bpc"] = bits_per_char(loss)
        return out

    @torch.no_grad()
    def before_evaluation(self, record: dict[str, Any], model: torch.nn.Module, opt: Any) -> None:
        if "train_loss" not in record or not hasattr(opt, "synced_weights"):
            return  # (epoch ends of LaPerm runs only)
        params = opt.permuted_parameters()
        as_left = {n: p.detach().clone() for n, p in params}
        with opt.synced_weights():
            synced = {n: p.detach().clone() for n, p in params}
        with opt.inner_weights():  # (the latent weights of latent groups)
            inner = {n: p.detach().clone() for n, p in params}
        since = opt.param_groups[0]["k"] - opt.steps_to_next_sync()
        out: dict[str, Any] = {"epoch": record["epoch"], "steps_since_sync": since, "weights": {}}
        try:
            _load(params, inner)
            out["inner"] = self._measure(model)
            for role in dict.fromkeys(weight_role(n) for n in synced):  # (in model order)
                picked = [(n, p) for n, p in params if weight_role(n) == role]
                out["weights"][role] = _movement([inner[n] for n, _ in picked], [synced[n] for n, _ in picked])
                _load(picked, synced)
                out[f"only {role}"] = self._measure(model)
                _load(picked, inner)
            _load(params, synced)
            out["synced"] = self._measure(model)
        finally:
            _load(params, as_left)
        with open(self.run_dir / rundir.SYNCCOST, "a") as f:
            f.write(json.dumps(out) + "\n")


def _movement(inner: list[torch.Tensor], synced: list[torch.Tensor]) -> dict[str, float]:
    """rms(inner) / rms(synced) and rms(inner - synced) / rms(synced), over all the tensors given."""
    a, b = torch.cat([t.flatten() for t in inner]).double(), torch.cat([t.flatten() for t in synced]).double()
    rms = b.square().mean().sqrt()
    return {"scale": float(a.square().mean().sqrt() / rms), "change": float((a - b).square().mean().sqrt() / rms)}


def _load(params: list[tuple[str, torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    for n, p in params:
        p.copy_(values[n])
