"""The "Transformers (beyond the paper)" section of ``laperm report``, from ``results/transformers``.

Self-contained (its own small table helper) so that :mod:`laperm.experiments.report` only lists
it among its sections; nothing is written when the experiment has no runs, so the report of the
other experiments is unchanged.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from typing import Any

from ..analysis import plots

__all__ = ["transformers_section", "fmt_mean"]

NAME = "transformers"


def fmt_mean(values: Sequence[float | None], scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """``m`` for one value, ``m ± s`` (mean ± sample std) for several, ``–`` for none."""
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}{unit}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}{unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _pick(runs: Sequence[dict[str, Any]], **tags: Any) -> list[dict[str, Any]]:
    return [r for r in runs if r["summary"] is not None and all(r["tags"].get(k) == v for k, v in tags.items())]


def _summary(runs: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    return [r["summary"].get(key) for r in runs]


def _main_table(rep: Any, runs: Sequence[dict[str, Any]]) -> None:
    rows = []
    for method in ("laperm", "adam"):
        gpt = _pick(runs, part="main", model="char-gpt", method=method)
        vit = _pick(runs, part="main", model="vit-tiny", method=method)
        rows.append(
            [
                method,
                fmt_mean(_summary(gpt, "final_val_bpc")),
                fmt_mean(_summary(gpt, "final_test_bpc")),
                fmt_mean(_summary(gpt, "final_test_acc"), 100, 2, "%"),
                len(gpt),
                fmt_mean(_summary(vit, "final_test_acc"), 100, 2, "%"),
                len(vit),
            ]
        )

    def mean(model: str, method: str, key: str) -> float | None:
        vals = [v for v in _summary(_pick(runs, part="main", model=model, method=method), key) if v is not None]
        return statistics.fmean(vals) if vals else None

    gl, ga = mean("char-gpt", "laperm", "final_val_bpc"), mean("char-gpt", "adam", "final_val_bpc")
    vl, va = mean("vit-tiny", "laperm", "final_test_acc"), mean("vit-tiny", "adam", "final_test_acc")
    ratio = gl / ga if gl is not None and ga else None
    gap = 100 * (va - vl) if va is not None and vl is not None else None
    rep.add(
        "Final synced models (mean ± std over seeds). char-gpt: bits per character on the validation and "
        "test blocks (fixed non-overlapping 128-character windows) and next-character test accuracy; "
        "vit-tiny: MNIST test accuracy.",
        "",
    )
    rep.add(
        *_table(
            [
                "method",
                "char-gpt val bits/char",
                "test bits/char",
                "next-char acc",
                "seeds",
                "vit-tiny MNIST test acc",
                "seeds",
            ],
            rows,
        )
    )
    rep.add(
        f"LaPerm / Adam validation bits per character: {ratio:.3f} (goal ≤ 1.05)." if ratio else "",
        f"vit-tiny: Adam − LaPerm test accuracy {gap:.2f} points (goal ≤ 1)." if gap is not None else "",
        "",
    )


def _curves(rep: Any, runs: Sequence[dict[str, Any]]) -> None:
    for model, key, ylabel in (
        ("char-gpt", "val_bpc", "validation bits per character"),
        ("vit-tiny", "test_acc", "test accuracy (%)"),
    ):
        series = {}
        for r in _pick(runs, part="main", model=model):
            recs = [x for x in r["records"] if key in x]
            scale = 100 if key.endswith("acc") else 1
            series[f"{r['tags']['method']} seed {r['tags']['seed']}"] = (
                [x["epoch"] for x in recs],
                [scale * x[key] for x in recs],
            )
        if series:
            fig = f"transformers_{model}.png"
            plots.lines(
                rep.fig_dir / fig, series, title=f"{model}: LaPerm vs Adam (synced)", xlabel="epoch", ylabel=ylabel
            )
            rep.figure(fig, f"{model} curves")


def _settings_table(rep: Any, runs: Sequence[dict[str, Any]]) -> None:
    rows = []
    main = _pick(runs, part="main", model="char-gpt", method="laperm", seed=0)
    for r in main + _pick(runs, part="k") + _pick(runs, part="sparse") + _pick(runs, part="lever"):
        t = r["tags"]
        what = {
            "main": "preset (k=250, lr 2e-3)",
            "k": f"k={t.get('k')}",
            "sparse": "50% of Linear kernels pruned",
            "lever": t.get("setting"),
        }[t["part"]]
        s = r["summary"]
        rows.append(
            [
                what,
                t["method"],
                f"{s['final_val_bpc']:.3f}",
                f"{100 * s['final_test_acc']:.2f}%",
                f"{s['train_time_s'] / 60:.1f} min",
            ]
        )
    if rows:
        rep.add("char-gpt settings, seed 0 (k sweep, sparse init, levers):", "")
        rep.add(*_table(["setting", "method", "val bits/char", "next-char test acc", "training time"], rows))


def _rebuild_cell(x: dict[str, Any], key: str) -> str:
    bpc = f" ({x[key + '_bpc']:.3f} bits/char)" if key + "_bpc" in x else ""
    return f"{100 * x[key]:.2f}%{bpc}"


def _rebuild_table(rep: Any, runs: Sequence[dict[str, Any]]) -> None:
    rows = []
    for r in _pick(runs, part="main", method="adam", seed=0):
        for x in r["rebuild"][-1:]:  # the trained net at the end
            rows.append(
                [r["tags"]["model"], x["epoch"]]
                + [_rebuild_cell(x, k) for k in ("trained", "rebuilt", "rebuilt_fresh", "random_perm")]
            )
    if rows:
        rep.add(
            "Rebuild (Adam, seed 0, last epoch): every permuted tensor, embeddings included, rebuilt from its "
            "initial values at the trained ranks; controls: a fresh init's values at those ranks, and the "
            "initial values randomly permuted within each row. Test accuracy (and bits per character).",
            "",
        )
        rep.add(*_table(["model", "epoch", "trained", "rebuilt", "fresh values", "random perm"], rows))


def _profiles_table(rep: Any) -> None:
    rows = []
    for f in sorted((rep.results / NAME).glob("profiles__*.json")):
        d = json.loads(f.read_text())
        for kind, v in d["by_type"].items():
            rows.append(
                [
                    d["label"],
                    kind,
                    v["tensors"],
                    f"{v['spread_init']:.4f}",
                    f"{v['spread_trained']:.4f}",
                    f"{v['drift']:.3f}",
                ]
            )
    if rows:
        rep.add("Weight profiles per layer type (unit-weighted means; spread and drift as in *Weight profiles*):", "")
        rep.add(*_table(["run", "layer type", "tensors", "spread (init)", "spread (trained)", "drift"], rows))


def transformers_section(rep: Any) -> None:
    """Append the section to ``rep`` (a :class:`laperm.experiments.report.Report`) if there are runs."""
    runs = rep.runs.get(NAME)
    if not runs:
        return
    rep.add(
        "## Transformers (beyond the paper)",
        "",
        "`char-gpt` (4 pre-LN layers, width 128, context 128, tied embedding, 823k parameters) on the Python "
        "Language Reference text shipped with Python, and `vit-tiny` (7x7 patches, 4 layers, width 64, "
        "205k parameters) on MNIST; LaPerm permutes every embedding row and every Linear/Conv output unit, "
        "LayerNorm and biases are free. Budget: the `char-gpt` and `vit-tiny` presets on 2 shared CPU cores.",
        "",
    )
    _main_table(rep, runs)
    _curves(rep, runs)
    _settings_table(rep, runs)
    _rebuild_table(rep, runs)
    _profiles_table(rep)
    rep.notes(NAME)
    rep.commands(runs)
