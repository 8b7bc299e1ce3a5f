"""Beyond the paper: do Transformers train by reconnection? (``laperm run transformers``)

Runs (budget ``paper`` = the presets' CPU budget; one run at a time on 2 cores):

* LaPerm vs Adam, seeds 0 1 2: ``char-gpt`` on the default text corpus (10 epochs of 102 steps,
  batch 32 x 128 characters) and ``vit-tiny`` on MNIST (5 epochs). The Adam runs carry the
  rebuild analysis (their net rebuilt from its initial values at the trained ranks, vs a random
  permutation of those values), so they are at once the baseline and the rebuild experiment.
* The best LaPerm setting found (``BEST``: the latent sync rule at k=1, found on char-gpt seed 0's
  validation loss), seeds 0 1 2, on both models: the preset's overwrite rule lags Adam.
* char-gpt, seed 0: a k sweep (1, 10, 50, 1000 besides the preset's 250), a sparse init (50% of every
  Linear kernel pruned; embeddings dense), LaPerm vs Adam with a fixed mask, and a lower learning
  rate (one of the levers explored for F2).
* Why the preset lags (seed 0, both models): the preset's LaPerm run again, under its own name,
  with the ``synccost`` hook: at each epoch end the validation loss of the inner weights, of the
  synced weights and of the inner weights with the tensors of one role (``weight_role``: tok,
  pos, attn.qkv, attn.proj, fc1, fc2, ...) synced (``synccost.jsonl``).
* After training: weight profiles per layer type (embeddings, attention, MLP, head) of the
  seed-0 LaPerm and Adam runs (``profiles__<run>.json``).

Total: 17 char-gpt and 10 vit-tiny runs, one at a time. On idle 2 cores a char-gpt epoch took
17 s (2 threads: about 3.5 minutes a run with its evaluations) and vit-tiny is of the same order,
so about 1.5 hours in all; on the 2 cores shared by several jobs during development (load
average 4-9) one char-gpt run took 10-20 minutes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.transformer import LAYER_TYPES, layer_type
from .base import Experiment, Run, register

SEEDS = (0, 1, 2)
K_SWEEP = (1, 10, 50, 250, 1000)
PRESET_K = 250  # the char-gpt preset's k: its k-sweep point is the main run
# The best LaPerm setting found, run over all seeds on both models: with the overwrite rule every
# sync throws away what the inner optimizer gained since the last one and the synced model lags;
# the latent rule keeps the inner weights and runs the model on their synced permutation.
BEST: tuple[str, dict[str, Any]] = ("latent-k1", dict(sync_rule="latent", k=1))
# Other levers for LaPerm on char-gpt (seed 0), named as in the report.
LEVERS: dict[str, dict[str, Any]] = {"lr1e-3": dict(lr=1e-3)}
# quick: a smoke test of the wiring (a few steps), never a result
_QUICK = {"char-gpt": dict(epochs=1, train_subset=20_000), "vit-tiny": dict(epochs=1, train_subset=1000, val_size=500)}


def _run(budget: str, preset: str, seed: int, tags: dict[str, Any], hook: str | None = None, **overrides: Any) -> Run:
    o = dict(preset=preset, seed=seed, **overrides)
    if budget == "quick":
        o.update(_QUICK[preset])
    return Run(o, dict(model=preset, seed=seed, **tags), hook)


def _transformers(budget: str, seeds: list[int]) -> list[Run]:
    runs = []
    for preset in ("char-gpt", "vit-tiny"):
        for s in seeds:
            runs.append(_run(budget, preset, s, dict(part="main", method="laperm")))
            runs.append(_run(budget, preset, s, dict(part="main", method="adam"), hook="rebuild", optimizer="adam"))
            best, overrides = BEST
            runs.append(_run(budget, preset, s, dict(part="best", method="laperm", setting=best), **overrides))
        name = f"{preset}-laperm-seed{seeds[0]}-synccost"  # (the main run's config: a folder of its own)
        runs.append(_run(budget, preset, seeds[0], dict(part="why", method="laperm"), hook="synccost", name=name))
    first = seeds[0]
    for k in K_SWEEP:
        if k != PRESET_K:  # (the preset's k: the main run)
            runs.append(_run(budget, "char-gpt", first, dict(part="k", method="laperm", k=k), k=k))
    for method in ("laperm", "adam"):
        runs.append(
            _run(
                budget,
                "char-gpt",
                first,
                dict(part="sparse", method=method, pruned=0.5),
                optimizer=method,
                init="pruned:0.5",
            )
        )
    for name, o in LEVERS.items():
        runs.append(_run(budget, "char-gpt", first, dict(part="lever", method="laperm", setting=name), **o))
    return runs


def profiles_by_type(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean spread (init, trained) and drift of the layers of each type, weighted by units."""
    out: dict[str, dict[str, float]] = {}
    for kind in [k for k, _ in LAYER_TYPES] + ["other"]:
        part = [v for n, v in layers.items() if layer_type(n) == kind]
        units = sum(v["units"] for v in part)
        if units:
            out[kind] = {
                key: sum(v[key] * v["units"] for v in part) / units
                for key in ("spread_init", "spread_trained", "drift")
            }
            out[kind]["tensors"] = len(part)
    return out


def compute_profiles(folder: Path, entries: list[dict[str, Any]]) -> None:
    """``profiles__<run>.json`` for the finished seed-0 main runs (their final.pt vs init.pt)."""
    from .. import build, models, rundir
    from ..analysis.profiles import layer_profiles
    from ..checkpoint import atomic_write_text, load
    from ..config import TrainConfig
    from ..data.text import read_vocab

    for entry in entries:
        run_dir, tags = folder / entry["folder"], entry["tags"]
        target = folder / f"profiles__{entry['folder']}.json"
        if (
            tags.get("part") != "main"
            or tags.get("seed") != 0
            or target.is_file()
            or not (run_dir / "final.pt").is_file()
        ):
            continue
        cfg = TrainConfig(**rundir.read_run_config(run_dir))
        vocab = run_dir / rundir.VOCAB
        options: dict[str, Any] = {"vocab_size": len(read_vocab(vocab))} if vocab.is_file() else {}
        layouts = build.model_layouts(cfg, models.build(cfg.model, seed=0, **options))  # the optimizer's rule
        init, final = load(run_dir / "init.pt")["state"], load(run_dir / "final.pt")["model"]
        layers = layer_profiles(final, init, layouts)
        data = {
            "label": f"{cfg.model} {cfg.optimizer} (seed {cfg.seed})",
            "run": entry["folder"],
            "by_type": profiles_by_type(layers),
            "layers": layers,
        }
        atomic_write_text(target, json.dumps(data) + "\n")
        print(f"profiles: wrote {target}")


register(
    Experiment(
        "transformers",
        1,
        "beyond the paper: char-gpt (Python reference text, bits per character) "
        "and vit-tiny (MNIST), LaPerm (the presets, and the latent sync rule at k=1) vs Adam over 3 seeds "
        "(the Adam runs also rebuild their net from its initial values); char-gpt k sweep, 50% sparse init "
        "and a learning-rate lever; the cost of a sync by weight role; weight profiles per layer type. "
        "CPU budget: the presets, 27 runs (about 1.5 hours on 2 idle cores)",
        _transformers,
        default_seeds=SEEDS,
        post=compute_profiles,
    )
)
