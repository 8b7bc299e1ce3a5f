"""The paper's experiments (issue 7), each a named, versioned set of runs.

Budgets: ``paper`` is the budget stated in each experiment's description (the
paper's own where the CPU allows, otherwise a reduced one, said so in its
tags); ``quick`` is a smoke-test budget (1-2 epochs on a small subset) that
checks the wiring in a minute, never a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Experiment, Run, register

K_VALUES = (1, 20, 100, 250, 1000)
SPARSITY = (0.0, 0.3, 0.5, 0.7, 0.9)

# Reduced CPU budgets (2 shared cores): said in every table that uses them.
CONV7_CPU = dict(epochs=15, train_subset=20000, eval_every=5)
# k=200 is one sync per epoch of the 10k subset, as the paper's k=1000 is on the full 50k. 800 steps:
# BatchNorm running statistics (Keras momentum 0.99) need several hundred steps before eval mode means
# anything (a first 300-step budget left both methods at chance). Evaluated once, at the end.
CIFAR_CPU = dict(epochs=4, train_subset=10000, val_size=1000, bn_recalibrate=10, k=200, eval_every=4)


def _quick(budget: str, o: dict[str, Any], epochs: int = 1, subset: int = 2000) -> dict[str, Any]:
    """Shrink a run to the smoke-test budget."""
    if budget == "paper":
        return o
    return dict(
        o,
        epochs=min(o.get("epochs", epochs), epochs),
        train_subset=subset,
        val_size=min(o.get("val_size", 5000), 1000),
        eval_every=1,
    )


def _runs(budget: str, seeds: list[int], specs: Sequence[tuple[Any, Any]], hook: str | None = None) -> list[Run]:
    return [Run(_quick(budget, dict(o, seed=s)), dict(t, seed=s), hook) for o, t in specs for s in seeds]


# -- agnostic: single shared value, F1 and F2 at the paper's budget ------------------------------


def _agnostic(budget: str, seeds: list[int]) -> list[Run]:
    ours, paper = "ours: 55k train, 5k validation", "paper: all 60k train, no validation"
    specs = [
        (dict(preset="f1"), dict(model="f1", method="LaPerm", init="shared 0.08, 40% pruned", protocol=ours)),
        (dict(preset="f2"), dict(model="f2", method="LaPerm", init="shared 0.03, ~92.6% pruned", protocol=ours)),
        (
            dict(preset="f1", optimizer="adam", init="he-uniform"),
            dict(model="f1", method="Adam", init="he-uniform dense", protocol=ours),
        ),
        (
            dict(preset="f2", optimizer="adam", init="he-uniform"),
            dict(model="f2", method="Adam", init="he-uniform dense", protocol=ours),
        ),
        # The reference trains on all 60k images and reports the best test accuracy.
        (
            dict(preset="f1", val_size=0),
            dict(model="f1", method="LaPerm", init="shared 0.08, 40% pruned", protocol=paper),
        ),
        (
            dict(preset="f2", val_size=0),
            dict(model="f2", method="LaPerm", init="shared 0.03, ~92.6% pruned", protocol=paper),
        ),
    ]
    return _runs(budget, seeds, specs)


register(
    Experiment(
        "agnostic",
        2,
        "F1 and F2 with a single shared weight value (paper budget: 10 and 25 "
        "epochs, k=250, batch 128, Adam lr 1e-3*0.95^epoch, summed loss, evaluated every 250 steps "
        "like the reference), vs Adam on the same "
        "dense net and vs chance (10%)",
        _agnostic,
        default_seeds=(0, 1, 2),
    )
)


# -- f2-research: a LaPerm setting that gets F2 past the published protocol's stall ---------------

F2_SETTINGS: dict[str, dict[str, Any]] = {
    "published": dict(preset="f2"),
    # sync often, with k*lr of the order of the value gap v=0.03, so gradients are taken near the synced net
    "k1-lr0.02": dict(preset="f2", k=1, lr=0.02),
    "k1-lr0.05": dict(preset="f2", k=1, lr=0.05),
    "k5-lr0.005": dict(preset="f2", k=5, lr=0.005),
    "k10-lr0.003": dict(preset="f2", k=10, lr=0.003),
    "k20-lr0.002": dict(preset="f2", k=20, lr=0.002),
    "k50-lr0.001": dict(preset="f2", k=50),
    # other knobs at the published k and lr
    "tensor-granularity": dict(preset="f2", granularity="tensor"),
    "mean-loss": dict(preset="f2", loss_scale="mean"),
    "sgd-inner": dict(preset="f2", inner="sgd", lr=0.01, loss_scale="mean"),
    # latent sync rule (--sync-rule latent): inner weights kept, gradients taken at the synced net
    "latent-k1": dict(preset="f2", k=1, sync_rule="latent"),
    # one pool of values per layer, so a unit's number of connections can change (see the reading)
    "tensor-k100": dict(preset="f2", granularity="tensor", k=100),
    "tensor-lr0.002": dict(preset="f2", granularity="tensor", lr=0.002),
    "tensor-lr0.005": dict(preset="f2", granularity="tensor", lr=0.005),
    "tensor-k1000": dict(preset="f2", granularity="tensor", k=1000),
    "tensor-lr0.002-exp0.85": dict(preset="f2", granularity="tensor", lr=0.002, lr_schedule="exp:0.85"),
    "tensor-sgd": dict(preset="f2", granularity="tensor", inner="sgd", lr=0.05, loss_scale="mean"),
    # a softmax temperature in the training loss (cross-entropy of T*logits; predictions unchanged):
    # the synced net's logits are ~0.07, so at T=1 its loss is flat and gradients barely rank weights
    "published-T100": dict(preset="f2", logit_scale=100.0),
    "k1-lr0.05-T300": dict(preset="f2", k=1, lr=0.05, logit_scale=300.0),
    "latent-k1-T100": dict(preset="f2", k=1, logit_scale=100.0, sync_rule="latent"),
    "latent-k1-T1000": dict(preset="f2", k=1, logit_scale=1000.0, sync_rule="latent"),
}
F2_CHOSEN = "latent-k1-T1000"  # best of the exploration at seed 0 (see docs/results.md)
# Settings trained with every seed (the rest: the first seed only).
F2_ALL_SEEDS = {F2_CHOSEN, "published", "tensor-granularity", "k1-lr0.05-T300"}


def _f2_research(budget: str, seeds: list[int]) -> list[Run]:
    runs = []
    for name, o in F2_SETTINGS.items():
        use = seeds if name in F2_ALL_SEEDS else seeds[:1]
        runs += _runs(budget, use, [(o, dict(model="f2", setting=name))], hook="inner")
    return runs


register(
    Experiment(
        "f2-research",
        1,
        "F2 (same architecture, init values and sparsity): LaPerm settings "
        "beyond the published protocol; exploration with one seed, the chosen one with three",
        _f2_research,
        default_seeds=(0, 1, 2),
    )
)


# -- k sweep ----------------------------------------------------------------------------------


def _k(budget: str, seeds: list[int]) -> list[Run]:
    specs = [(dict(preset="f2", k=k), dict(model="f2", k=k)) for k in K_VALUES]
    specs += [(dict(model="lenet300", k=k, epochs=12), dict(model="lenet300", k=k)) for k in K_VALUES]
    return _runs(budget, seeds, specs)


register(
    Experiment(
        "k",
        1,
        "sync period k in {1, 20, 100, 250, 1000}: F2 (paper preset otherwise) and "
        "lenet300 (dense he-uniform, 12 epochs, Adam lr 1e-3*0.9^epoch, batch 128)",
        _k,
    )
)


# -- sparse: random pruning, LaPerm (rewiring) vs Adam with a fixed mask -----------------------


def _sparse(budget: str, seeds: list[int]) -> list[Run]:
    specs = []
    for p in SPARSITY:
        init = "he-uniform" if p == 0 else f"pruned:{p}"
        for opt in ("laperm", "adam"):
            specs.append(
                (
                    dict(model="lenet300", optimizer=opt, init=init, epochs=12, k=250),
                    dict(model="lenet300", method=opt, pruned=p),
                )
            )
    for p in (0.0, 0.7, 0.5):  # in order of priority
        init = "he-uniform" if p == 0 else f"pruned:{p}"
        for opt in ("laperm", "adam"):
            specs.append(
                (
                    dict(preset="conv2", optimizer=opt, init=init, **CIFAR_CPU),
                    dict(model="conv2", method=opt, pruned=p, budget="reduced"),
                )
            )
    return _runs(budget, seeds, specs)


register(
    Experiment(
        "sparse",
        2,
        "random pruning p in {0,30,50,70,90}% on lenet300 (12 epochs, k=250) and "
        "p in {0,50,70}% on Conv2 (reduced CPU budget: 4 epochs on 10k JPEG CIFAR-10 images, k=200); "
        "LaPerm rewires, Adam keeps a fixed mask",
        _sparse,
    )
)


# -- dense: LaPerm vs Adam on the same net, init and budget ----------------------------------


def _dense(budget: str, seeds: list[int]) -> list[Run]:
    specs = []
    for opt in ("laperm", "adam"):
        specs.append((dict(model="lenet300", optimizer=opt, epochs=12, k=250), dict(model="lenet300", method=opt)))
        specs.append(
            (dict(preset="conv7", optimizer=opt, **CONV7_CPU), dict(model="conv7", method=opt, budget="reduced"))
        )
        specs.append(
            (dict(preset="conv2", optimizer=opt, **CIFAR_CPU), dict(model="conv2", method=opt, budget="reduced"))
        )
    return _runs(budget, seeds, specs)


register(
    Experiment(
        "dense",
        2,
        "dense random init, LaPerm vs Adam: lenet300 (12 epochs), Conv7 (15 epochs on "
        "20k images), Conv2 (4 epochs on 10k JPEG CIFAR-10 images); the paper's schedule on a GPU is "
        "the `full` experiment",
        _dense,
    )
)


# -- full: the paper's own budget, for a GPU --------------------------------------------------


def _full(budget: str, seeds: list[int]) -> list[Run]:
    # BN nets are evaluated with statistics recomputed for the synced weights (20 batches of 256);
    # the option is set for both methods so the configs differ in the optimizer alone.
    specs = []
    for model, extra in (("conv2", dict(bn_recalibrate=20)), ("conv7", {})):
        for opt in ("laperm", "adam"):
            # (checkpoints every 5 epochs: a Conv2 checkpoint is ~70 MB and the GPU epoch takes seconds)
            specs.append(
                (
                    dict(preset=model, optimizer=opt, checkpoint_every=5, **extra),
                    dict(model=model, method=opt, budget="full"),
                )
            )
    # Adam runs carry the rebuild analysis: the same training gives the dense baseline and the rebuild curve.
    return [
        Run(_quick(budget, dict(o, seed=s)), dict(t, seed=s), "rebuild" if o["optimizer"] == "adam" else None)
        for o, t in specs
        for s in seeds
    ]


register(
    Experiment(
        "full",
        1,
        "the paper's full budget, meant for a GPU: Conv2 on CIFAR-10 (125 epochs, k=1000) "
        "and Conv7 on MNIST (45 epochs, k=1200), LaPerm vs Adam; the Adam runs also rebuild their "
        "net from its initial values",
        _full,
    )
)


# -- rebuild: Adam-trained nets rebuilt from their initial values at the trained ranks --------


def _rebuild(budget: str, seeds: list[int]) -> list[Run]:
    specs = [
        (dict(model="lenet300", optimizer="adam", epochs=12), dict(model="lenet300")),
        (dict(preset="f2", optimizer="adam", init="he-uniform"), dict(model="f2")),
    ]
    return _runs(budget, seeds, specs, hook="rebuild")


register(
    Experiment(
        "rebuild",
        2,
        "train with Adam; each epoch rebuild every permutable layer from its initial "
        "values at the trained ranks, vs a random permutation of them and vs a fresh init's values "
        "(MNIST MLPs here; the Conv7 and CIFAR-10 Conv2 rebuilds ride on the `full` experiment's "
        "Adam runs)",
        _rebuild,
    )
)


# -- dynamics: moved fraction per sync, F1 templates --------------------------------------------


def _dynamics(budget: str, seeds: list[int]) -> list[Run]:
    specs = [
        (dict(preset="f1"), dict(model="f1")),
        (dict(preset="f2"), dict(model="f2")),
        (dict(model="lenet300", epochs=12, k=250), dict(model="lenet300")),
    ]
    return _runs(budget, seeds, specs, hook="dynamics")


register(
    Experiment(
        "dynamics",
        1,
        "per sync, the fraction of weights that moved in each layer; F1's ten templates as they reconnect",
        _dynamics,
    )
)


# -- profiles: computed from finished runs' init.pt and final.pt (no training) -----------------

PROFILE_SOURCES = ("dense", "rebuild", "agnostic")


def compute_profiles(folder, entries) -> None:
    """Write ``profiles/<experiment>__<run>.json`` for every finished source run with weights on disk."""
    import json

    from .. import models, rundir
    from ..analysis.profiles import layer_profiles
    from ..build import resolve_permute_biases
    from ..checkpoint import atomic_write_text, load
    from ..optim import permuted_layouts
    from .base import load_manifest

    root = folder.parent
    for source in PROFILE_SOURCES:
        for name, entry in load_manifest(root / source).get("runs", {}).items():
            run_dir = root / source / name
            target = folder / f"{source}__{name}.json"
            if entry["tags"].get("seed") != 0 or target.is_file() or list(folder.glob(f"*__{name}.json")):
                continue  # (the same run reached through two experiments is profiled once)
            if not (run_dir / "final.pt").is_file() or not (run_dir / "init.pt").is_file():
                continue
            cfg = rundir.read_run_config(run_dir)
            if str(cfg["init"]).startswith("shared"):
                continue  # two values per row: profiles are trivial step functions
            biases = resolve_permute_biases(cfg["model"], cfg.get("permute_biases"))
            layouts = permuted_layouts(models.build(cfg["model"], seed=0), biases, cfg.get("granularity", "row"))
            init, final = load(run_dir / "init.pt")["state"], load(run_dir / "final.pt")["model"]
            label = f"{source}: {cfg['model']} {cfg['optimizer']} ({cfg['init']}, seed {cfg['seed']})"
            data = {"label": label, "run": f"{source}/{name}", "layers": layer_profiles(final, init, layouts)}
            atomic_write_text(target, json.dumps(data) + "\n")
            print(f"profiles: wrote {target}")


register(
    Experiment(
        "profiles",
        1,
        "weight profiles (each unit's sorted weights) of the finished dense, rebuild "
        "and agnostic runs vs their init; needs their final.pt/init.pt on disk",
        lambda budget, seeds: [],
        post=compute_profiles,
    )
)


from . import paper as _paper  # noqa: E402,F401 - registers "paper" (every README row, for GPU windows)
from . import transformers  # noqa: E402,F401 - registers "transformers" (beyond the paper)
