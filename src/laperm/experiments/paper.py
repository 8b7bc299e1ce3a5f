"""``laperm run paper``: every README row of the paper at its own schedule, LaPerm and its Adam baseline.

One experiment for the whole table (issue 23), meant for GPU windows: ``laperm run paper
--deadline S --parallel N`` advances it and stops every run cleanly, and running it again
continues (``scripts/gpu_window.sh`` does one window). Each row trains LaPerm at the preset and
Adam from the same init (for the pruned and shared-value rows, Adam keeps the init's mask fixed).
On CUDA the runs take the fast path (``--mode fast``, channels_last for the convnets), and a row's
runs that differ only in seed and optimizer train as one stack (``laperm run --stack``, on by
default on CUDA; the experiment layer groups them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import PRESETS
from .base import Experiment, Run, register

__all__ = ["PaperRow", "PAPER_ROWS", "BEYOND_ROWS", "ROWS", "paper_runs"]

METHODS = ("laperm", "adam")


@dataclass(frozen=True)
class PaperRow:
    """One README row: its label, preset, data and what the paper reports."""

    label: str
    preset: str
    data: str
    paper: str  # the README's top-1 ("–" for a row beyond the paper)
    bn: bool = False  # BatchNorm: evaluated with statistics recomputed for the synced weights
    # A row beyond the paper: LaPerm with these settings on top of the preset, compared with the Adam
    # run of the README row labelled ``baseline`` (the same init and seed: Adam is not trained twice).
    variant: tuple[tuple[str, Any], ...] = ()
    baseline: str | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        return ("laperm",) if self.baseline else METHODS

    @property
    def epochs(self) -> int:
        return int(PRESETS[self.preset]["epochs"])

    @property
    def model(self) -> str:
        return str(PRESETS[self.preset]["model"])

    @property
    def train_images(self) -> int:
        """Images per epoch: the training set less the 5,000 held out for validation."""
        return (60000 if self.data == "MNIST" else 50000) - 5000

    @property
    def init(self) -> str:
        return str(PRESETS[self.preset].get("init", "he-uniform"))


PAPER_ROWS = (
    PaperRow("F1 {0, 0.08}, p=40%", "f1", "MNIST", "85.46%"),
    PaperRow("F2 {0, 0.03}, p≈92%", "f2", "MNIST", "78.14%"),
    PaperRow("Conv7", "conv7", "MNIST", "99.72%"),
    PaperRow("Conv2", "conv2", "CIFAR-10", "78.21%", bn=True),
    PaperRow("Conv4", "conv4", "CIFAR-10", "89.17%", bn=True),
    PaperRow("Conv13", "conv13", "CIFAR-10", "92.21%", bn=True),
    PaperRow("ResNet50 p=0%", "resnet50", "CIFAR-10", "92.53%", bn=True),
    PaperRow("ResNet50 p=30%", "resnet50-p30", "CIFAR-10", "92.32%", bn=True),
    PaperRow("ResNet50 p=50%", "resnet50-p50", "CIFAR-10", "92.02%", bn=True),
    PaperRow("ResNet50 p=70%", "resnet50-p70", "CIFAR-10", "90.97%", bn=True),
)
# Beyond the paper: the sync rule that keeps the model a permutation at every step (k=1, latent
# weights; docs/algorithm.md) on a convnet row, beside the paper rule and the same Adam run.
# (A checkpoint every epoch: this row was first trained on a 2-core CPU, minutes per epoch; the
# setting is part of the run's name, which its results keep.)
BEYOND_ROWS = (
    PaperRow(
        "Conv7, latent rule k=1",
        "conv7",
        "MNIST",
        "–",
        variant=(("sync_rule", "latent"), ("k", 1), ("checkpoint_every", 1)),
        baseline="Conv7",
    ),
)
ROWS = PAPER_ROWS + BEYOND_ROWS


def _overrides(row: PaperRow, optimizer: str) -> dict[str, Any]:
    o: dict[str, Any] = dict(preset=row.preset, optimizer=optimizer)
    if row.data == "CIFAR-10" or row.preset == "conv7":
        o["checkpoint_every"] = 5  # GPU epochs take seconds; a deadline saves its own checkpoint anyway
    if row.bn:
        o["bn_recalibrate"] = 20
    return {**o, **dict(row.variant)}


def _quick(row: PaperRow, o: dict[str, Any]) -> dict[str, Any]:
    """The smoke-test budget: F1/F2 3 epochs of 10,000 images (seconds on a CPU), the rest 1 epoch of 2,000."""
    if row.model in ("f1", "f2"):
        return dict(o, epochs=3, train_subset=10000)
    return dict(o, epochs=1, train_subset=2000, val_size=1000, eval_every=1)


def paper_runs(budget: str, seeds: list[int]) -> list[Run]:
    runs = []
    for row in ROWS:
        on_cuda: dict[str, Any] = {"mode": "fast"}
        if row.model not in ("f1", "f2"):
            on_cuda["channels_last"] = True
        for seed in seeds:
            for method in row.methods:
                o = dict(_overrides(row, method), seed=seed)
                tags = dict(row=row.label, model=row.model, method=method, init=row.init, seed=seed)
                runs.append(Run(o if budget == "paper" else _quick(row, o), tags, on_cuda=on_cuda))
    return runs


register(
    Experiment(
        "paper",
        1,
        "every README row at the paper's schedule (F1, F2, Conv7, Conv2, Conv4, Conv13, ResNet50 at "
        "p=0/30/50/70%), LaPerm and Adam from the same init (a fixed mask for pruned and shared-value "
        "inits), and beyond the paper Conv7 with the latent sync rule at k=1; fast path on CUDA; meant "
        "for GPU windows: --deadline, then run again to continue",
        paper_runs,
    )
)
