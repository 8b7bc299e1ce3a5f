"""Numbers for a run that did not finish: evaluate its newest checkpoint in the synced state.

Long CPU runs may still be going (or stopped) when a report is due.  This
loads the newest good checkpoint, syncs a copy of its weights (for LaPerm:
θ0's values at the inner weights' ranks, exactly what a sync does) and writes
``partial.json`` (epoch, step, test accuracy) next to it; the report shows it,
labelled as an unfinished run's last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import build, checkpoint, models, rundir
from ..analysis.rebuild import rebuild_state
from ..checkpoint import atomic_write_text
from ..config import TrainConfig
from ..engine import evaluate

__all__ = ["evaluate_unfinished"]


def evaluate_unfinished(run_dir: str | Path, threads: int | None = None) -> dict[str, Any] | None:
    """Write and return ``partial.json`` for an unfinished run; ``None`` if finished or no checkpoint yet."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        return None
    found = checkpoint.latest_good(run_dir / "checkpoints", warn=lambda *_: None)
    if found is None:
        return None
    if threads:
        torch.set_num_threads(threads)
    saved = found[1]
    cfg = TrainConfig(**rundir.read_run_config(run_dir))
    spec = models.get_spec(cfg.model)
    ds = build.load_data(cfg, spec)
    model, _ = build.build_model(cfg, torch.device("cpu"), **build.model_options(ds))
    state = saved["model"]
    if cfg.optimizer == "laperm":
        layouts = build.model_layouts(cfg, model)  # granularity included
        state = rebuild_state(state, checkpoint.load(run_dir / "init.pt")["state"], layouts)
    model.load_state_dict(state)
    acc = evaluate(model, build.build_test_loader(cfg, ds, torch.device("cpu")))[1]
    out = {
        "epoch": saved["run"]["epoch"],
        "step": saved["run"]["step"],
        "test_acc": acc,
        "synced": cfg.optimizer == "laperm",
        "bn_recalibrated": False,
        "note": "unfinished run: its newest checkpoint, synced and evaluated on the test set",
    }
    atomic_write_text(run_dir / "partial.json", json.dumps(out) + "\n")
    return out
