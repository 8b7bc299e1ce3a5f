"""What a run reports: the epoch record and line, the optimizer's description, summary.json."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch

from .. import checkpoint, rundir, verify
from ..analysis.plots import plot_curves
from ..config import TrainConfig
from ..optim import LaPerm
from .errors import InvariantError
from .state import TrainingState

__all__ = ["epoch_record", "epoch_line", "describe_optimizer", "hardware", "build_summary", "write_outputs"]


def epoch_record(st: TrainingState, lr: float) -> dict[str, Any]:
    """The training half of an epoch's metrics.jsonl line (evaluation adds the rest)."""
    return {
        "epoch": st.epoch,
        "step": st.step,
        "lr": lr,
        "train_loss": st.loss_sum / max(st.seen, 1),
        "train_acc": st.correct / max(st.seen, 1),
        "epoch_time_s": round(st.epoch_time, 3),
        "images_per_s": round(st.seen / max(st.epoch_time, 1e-9), 1),
    }


def epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']:>3}/{epochs}", f"loss {r['train_loss']:.4f}", f"train {r['train_acc']:.2%}"]
    if "val_acc" in r:
        parts.append(f"val {r['val_acc']:.2%}")
    parts.append(f"test {r['test_acc']:.2%}")
    if "val_bpc" in r:
        parts.append(f"val {r['val_bpc']:.3f} bits/char")
    if "reconnected" in r:
        parts.append(f"reconnected {r['reconnected']:.1%}")
    # a language model's throughput is in predicted characters
    parts.append(f"{r['images_per_s']:,.0f} {'chars' if 'test_bpc' in r else 'img'}/s")
    return " | ".join(parts)


def describe_optimizer(cfg: TrainConfig, opt: torch.optim.Optimizer) -> str:
    if isinstance(opt, LaPerm):
        ks = f"k={cfg.k}" + (f" (schedule {cfg.k_schedule})" if cfg.k_schedule else "")
        if cfg.sync_rule != "overwrite":
            ks += f", {cfg.sync_rule} sync rule"
        permuted = sum(p.numel() for _, p in opt.permuted_parameters())
        return f"LaPerm({cfg.inner}, {ks}, lr {cfg.lr:g} {cfg.lr_schedule}), {permuted:,} weights permuted"
    return f"{cfg.optimizer} (lr {cfg.lr:g} {cfg.lr_schedule})"


def hardware(device: torch.device) -> str:
    """What the run's numbers were measured on, for reports: the GPU's name, or the CPU (its model where the
    system names it: CPUs of other kinds round differently, so a run moved between machines records each)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = cpu_model()
    cpu = f"{platform.machine()} CPU" + (f" ({model})" if model else "")
    return f"{cpu}, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} cores"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else None."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def build_summary(run: Any, final_test: float, final_val: float | None) -> dict[str, Any]:
    """summary.json's content for the :class:`~laperm.engine.trainer.Trainer` ``run``."""
    cfg, st = run.cfg, run.state
    evaluated = [r for r in [*run.metrics.records, *st.step_evals] if "test_acc" in r]
    summary = {
        "run": cfg.run_name(),
        "run_dir": str(run.run_dir),
        "model": cfg.model,
        "dataset": run.ds.name,
        "optimizer": cfg.optimizer,
        "init": cfg.init,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "steps": st.step,
        "final_test_acc": final_test,
        "final_val_acc": final_val,
        "selected_epoch": st.best.get("epoch"),
        "selected_val_acc": st.best.get("val_acc"),
        "selected_test_acc": st.best.get("test_acc"),
        # the final model is evaluated too
        "best_test_acc": max([final_test, *(r["test_acc"] for r in evaluated)]),
        "evaluations": len(evaluated),
        "train_time_s": round(st.elapsed, 1),
        "device": str(run.device),
        "hardware": hardware(run.device),
        "torch": torch.__version__,
        "verified": None,
    }
    if st.changes:
        summary["changed_on_resume"] = st.changes
    if run.d.enabled:
        summary["nproc"] = run.d.world
        summary["replica_checks"] = run.replicas.checks if run.replicas is not None else 0
    return summary


def write_outputs(run: Any, summary: dict[str, Any]) -> None:
    """Verify the run folder (LaPerm runs), write summary.json and curves.png."""
    if run.laperm:
        result = verify.verify_run(run.run_dir)
        if not result.ok:
            raise InvariantError(result.message())
        summary["verified"] = result.message()
    checkpoint.atomic_write_text(run.run_dir / rundir.SUMMARY, json.dumps(summary, indent=2) + "\n")
    try:
        plot_curves(run.metrics.records, run.run_dir / rundir.CURVES, run.cfg.run_name())
    except Exception as e:  # a plot must never cost the run
        run.log(f"warning: could not draw curves.png ({e})")
