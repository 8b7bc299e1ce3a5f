"""Figures for the results report, from plain data (lists and dicts), never from models.

Every function writes one file and returns its path; matplotlib runs headless.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["lines", "bars", "profiles_figure", "dynamics_figure", "templates_grid", "templates_gif", "plot_curves"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close ``fig`` (figures are never kept open)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return Path(path)


def lines(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    hline: tuple[float, str] | None = None,
    styles: Mapping[str, str] | None = None,
) -> Path:
    """One line per ``series[label] = (x, y)``; optional horizontal reference line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), (styles or {}).get(label, "-o"), label=label, markersize=3)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", label=hline[1])
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def panels(
    path: str | Path,
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    *,
    title: str = "",
    xlabel: str = "",
    styles: Mapping[str, str] | None = None,
) -> Path:
    """Side-by-side axes, one per ``panels[ylabel]``, each with a line per ``series[label] = (x, y)``;
    one legend (the same labels in every panel)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for label, (x, y) in series.items():
            ax.plot(list(x), list(y), (styles or {}).get(label, "-o"), label=label, markersize=2.5)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def bars(
    path: str | Path,
    groups: Sequence[str],
    values: Mapping[str, Sequence[float]],
    errors: Mapping[str, Sequence[float]] | None = None,
    *,
    title: str = "",
    ylabel: str = "",
    hline: tuple[float, str] | None = None,
) -> Path:
    """Grouped bars: ``values[series][i]`` for ``groups[i]``, optional error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    n = max(len(values), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, vals) in enumerate(values.items()):
        err = (errors or {}).get(label)
        ax.bar(x + (i - (n - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", label=hline[1])
    ax.set_xticks(x, groups)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def profiles_figure(path: str | Path, layers: Mapping[str, Mapping[str, Any]], title: str = "") -> Path:
    """One panel per layer: sample sorted-weight profiles, initial (grey) and trained (colour)."""
    plt = _plt()
    names = list(layers)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = layers[name]
        for prof in d["profiles_init"]:
            ax.plot(np.linspace(0, 1, len(prof)), prof, color="grey", alpha=0.5, linewidth=1)
        for prof in d["profiles_trained"]:
            ax.plot(np.linspace(0, 1, len(prof)), prof, alpha=0.8, linewidth=1)
        ax.set_title(f"{name}\nspread {d['spread_trained']:.3f} (init {d['spread_init']:.3f})", fontsize=8)
        ax.set_xlabel("rank / fan-in", fontsize=8)
    axes[0][0].set_ylabel("weight")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def dynamics_figure(path: str | Path, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """Fraction of weights moved at each sync, per layer, one panel per run (log scale)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (label, syncs) in zip(axes[0], runs.items()):
        layers = list(syncs[0]["moved"]) if syncs else []
        steps = [s["step"] for s in syncs]
        for layer in layers:
            # zeros cannot go on a log axis: plot them at a floor and say so in the label
            ys = [max(s["moved"][layer], 1e-6) for s in syncs]
            ax.plot(steps, ys, label=layer, linewidth=1)
        ax.set_yscale("log")
        ax.set(title=label, xlabel="step", ylabel="fraction moved at this sync (floor 1e-6)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _template_image(w: np.ndarray) -> np.ndarray:
    """Ten 784-weight rows -> one 2x5 mosaic of 28x28 images."""
    tiles = w.reshape(-1, 28, 28)
    rows = [np.concatenate(list(tiles[r * 5 : (r + 1) * 5]), axis=1) for r in range(2)]
    return np.concatenate(rows, axis=0)


def templates_grid(path: str | Path, steps: Sequence[int], snaps: np.ndarray, picks: int = 6) -> Path:
    """F1's ten templates (rows of 784) at ``picks`` moments of training, one mosaic each."""
    plt = _plt()
    idx = np.unique(np.linspace(0, len(steps) - 1, min(picks, len(steps))).round().astype(int))
    fig, axes = plt.subplots(len(idx), 1, figsize=(6, 2.6 * len(idx)), squeeze=False)
    vmax = float(np.abs(snaps).max()) or 1.0
    for ax, i in zip(axes[:, 0], idx):
        ax.imshow(_template_image(snaps[i].astype(np.float32)), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"step {steps[i]} (digits 0-4 top, 5-9 bottom)", fontsize=8)
        ax.axis("off")
    return _save(fig, path, dpi=100)


def templates_gif(path: str | Path, steps: Sequence[int], snaps: np.ndarray, scale: int = 3) -> Path:
    """Animated GIF of F1's ten templates, one frame per recorded sync."""
    from PIL import Image

    vmax = float(np.abs(snaps).max()) or 1.0
    frames = []
    for s in snaps:
        img = np.clip(_template_image(s.astype(np.float32)) / vmax, 0, 1)
        frame = Image.fromarray((img * 255).astype(np.uint8), mode="L")
        frames.append(frame.resize((frame.width * scale, frame.height * scale), Image.Resampling.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    return Path(path)


def plot_curves(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """A run's learning curves (loss and accuracy per epoch, from metrics.jsonl records), as a PNG."""
    plt = _plt()
    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [r["train_loss"] for r in records], label="train (inner weights)")
    if records and "val_loss" in records[0]:
        ax1.plot(epochs, [r["val_loss"] for r in records], label="validation (synced)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key, label in (
        ("train_acc", "train (inner weights)"),
        ("val_acc", "validation (synced)"),
        ("test_acc", "test (synced)"),
    ):
        if records and key in records[0]:
            ax2.plot(epochs, [100 * r[key] for r in records], label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.suptitle(title)
    _save(fig, path, dpi=100)
