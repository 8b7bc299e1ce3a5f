"""``laperm report``: docs/results.md and docs/figures/*.png from stored results, no training.

Reads, for every experiment folder under ``results/``: the manifest
(``experiment.json``: tags, budget, command of each run), and per run
``summary.json``, ``metrics.jsonl`` and the analysis files the hooks wrote.
Runs without a ``summary.json`` are reported as unfinished, with their last
evaluated epoch.  Hand-written readings live in ``results/notes/<name>.md``
and are pasted under the matching section.
"""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import rundir
from ..analysis import plots
from .base import load_manifest
from .report_paper import paper_curves, paper_rows
from .report_transformers import transformers_section

__all__ = ["load_runs", "write_report", "mean_std", "fmt_acc"]

# docs/algorithm.md §5: README top-1 (and what the authors' own code gave on these machines); the experiments
# that measure each row, in the order they are listed.
README_ROWS = [
    ("Conv7", "MNIST", 45, "99.72%", ("full", "dense"), "conv7"),
    ("Conv2", "CIFAR-10", 125, "78.21%", ("full", "dense"), "conv2"),
    ("Conv4", "CIFAR-10", 125, "89.17%", None, None),
    ("Conv13", "CIFAR-10", 125, "92.21%", None, None),
    ("ResNet50 p=0%", "CIFAR-10", 200, "92.53%", None, None),
    ("ResNet50 p=30/50/70%", "CIFAR-10", 200, "92.32 / 92.02 / 90.97%", None, None),
    ("F1 {0, 0.08}, p=40%", "MNIST", 10, "85.46% (authors' code here: 83.75%)", ("agnostic",), "f1"),
    ("F2 {0, 0.03}, p≈92%", "MNIST", 25, "78.14% (authors' code here: 52.0%, 43.9%)", ("agnostic",), "f2"),
]


# -- loading ------------------------------------------------------------------------------

_read_jsonl = rundir.read_jsonl


def load_runs(folder: str | Path) -> list[dict[str, Any]]:
    """Every run of one experiment folder, with its tags, command, summary, metrics and extras."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    runs = []
    for name, entry in manifest.get("runs", {}).items():
        d = folder / name
        run = dict(entry, path=d, records=_read_jsonl(d / "metrics.jsonl"), rebuild=_read_jsonl(d / "rebuild.jsonl"))
        run["summary"] = rundir.read_json(d / rundir.SUMMARY)
        dyn = d / "dynamics.json"
        run["dynamics"] = json.loads(dyn.read_text())["syncs"] if dyn.is_file() else None
        prof = d / "profiles.json"
        run["profiles"] = json.loads(prof.read_text()) if prof.is_file() else None
        runs.append(run)
    return runs


def select(runs: Sequence[dict[str, Any]], **tags: Any) -> list[dict[str, Any]]:
    return [r for r in runs if all(r["tags"].get(k) == v for k, v in tags.items())]


# -- numbers ------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_acc(values: Sequence[float | None]) -> str:
    """``83.12%`` for one value, ``83.12 ± 0.40%`` (mean ± sample std) for several, ``–`` for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    m, s = mean_std(vals)
    return f"{100 * m:.2f}%" if len(vals) == 1 else f"{100 * m:.2f} ± {100 * s:.2f}%"


def headline(run: dict[str, Any]) -> dict[str, Any]:
    """Selected / final / best-test accuracies of a run, or of its last evaluated epoch if unfinished."""
    s = run["summary"]
    if s is not None:
        # (summaries written before the final model counted towards best-test: take it in here)
        best = max(s["best_test_acc"], s["final_test_acc"])
        return {
            "selected": s.get("selected_test_acc"),
            "final": s["final_test_acc"],
            "best": best,
            "epochs": s["epochs"],
            "done": True,
            "time": s.get("train_time_s"),
        }
    recs = [r for r in run["records"] if "test_acc" in r]
    part = run["path"] / "partial.json"
    if part.is_file():
        p = json.loads(part.read_text())
        if not recs or p["step"] > recs[-1].get("step", 0):
            # an unfinished run's newest checkpoint may sit mid-epoch: show fractional epochs
            spe = run["records"][0]["step"] / run["records"][0]["epoch"] if run["records"] else None
            epoch = round(p["step"] / spe, 2) if spe else p["epoch"]
            recs = recs + [{"epoch": epoch, "step": p["step"], "test_acc": p["test_acc"]}]
    if not recs:
        return {"selected": None, "final": None, "best": None, "epochs": 0, "done": False, "time": None}
    best_val = max(recs, key=lambda r: r.get("val_acc", -1))
    return {
        "selected": best_val.get("test_acc") if "val_acc" in best_val else None,
        "final": recs[-1]["test_acc"],
        "best": max(r["test_acc"] for r in recs),
        "epochs": recs[-1]["epoch"],
        "done": False,
        "time": sum(r.get("epoch_time_s", 0) for r in run["records"]),
    }


def group_row(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    hs = [headline(r) for r in runs]
    done = all(h["done"] for h in hs)
    times = [h["time"] for h in hs if h["time"]]
    return {
        "selected": fmt_acc([h["selected"] for h in hs]),
        "final": fmt_acc([h["final"] for h in hs]),
        "best": fmt_acc([h["best"] for h in hs]),
        "seeds": len(runs),
        "epochs": "/".join(sorted({str(h["epochs"]) for h in hs}))
        + ("" if done else " (unfinished: last evaluated epoch)"),
        "time": f"{statistics.fmean(times) / 60:.1f} min/run" if times else "–",
        "command": runs[0]["command"]
        + (f" --seed S (S = {', '.join(str(r['tags'].get('seed')) for r in runs)})" if len(runs) > 1 else ""),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _budget_text(run: dict[str, Any]) -> str:
    cmd = run["command"]
    parts = []
    for flag in ("--epochs", "--train-subset", "--k", "--eval-every"):
        if flag in cmd.split():
            i = cmd.split().index(flag)
            parts.append(f"{flag[2:]} {cmd.split()[i + 1]}")
    return ", ".join(parts) or "preset"


# -- sections -------------------------------------------------------------------------------


class Report:
    def __init__(self, results: Path, docs: Path) -> None:
        self.results, self.docs = results, docs
        self.fig_dir = docs / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.runs = (
            {p.name: load_runs(p) for p in sorted(results.iterdir()) if (p / "experiment.json").is_file()}
            if results.is_dir()
            else {}
        )

    def add(self, *text: str) -> None:
        self.lines.extend(text)

    def figure(self, name: str, title: str) -> None:
        self.add(f"![{title}](figures/{name})", "")

    def notes(self, name: str) -> None:
        path = self.results / "notes" / f"{name}.md"
        if path.is_file():
            self.add(path.read_text().strip(), "")

    def commands(self, runs: Sequence[dict[str, Any]]) -> None:
        if runs:
            self.add("<details><summary>commands</summary>", "", "```")
            self.add(*sorted({r["command"] for r in runs}))
            self.add("```", "</details>", "")


PREREGISTERED_SEEDS = (0, 1, 2)  # the experiments' default seeds: the headline means use these


def _seed_groups(runs: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[("", runs)]``, or, when seeds beyond the pre-registered three were added later,
    the pre-registered seeds first and then all of them (so added seeds can't pick the mean)."""
    first = [r for r in runs if r["tags"].get("seed") in PREREGISTERED_SEEDS]
    if len({r["tags"].get("seed") for r in runs}) <= len(PREREGISTERED_SEEDS) or not first:
        return [("", list(runs))]
    seeds = sorted(r["tags"].get("seed") for r in runs)
    return [
        (f"seeds {PREREGISTERED_SEEDS[0]}–{PREREGISTERED_SEEDS[-1]}", first),
        (f"all seeds {seeds[0]}–{seeds[-1]}", list(runs)),
    ]


def gpu_hardware(folder: Path) -> dict[str, Any] | None:
    """What the GPU machine printed into ``folder/hardware.txt`` (nvidia-smi's CSV, then a torch line):
    ``{"name", "torch", "lines"}``, or None where there is no such file."""
    path = folder / "hardware.txt"
    lines = [x.strip() for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if len(lines) < 2:
        return None
    torch_version = next((x.split()[1] for x in lines if x.startswith("torch ")), None)
    return {"name": lines[1].split(",")[0].strip(), "torch": torch_version, "lines": lines[1:]}


def _budget_label(runs: Sequence[dict[str, Any]], h: dict[str, Any]) -> str:
    tags = runs[0]["tags"]
    if tags.get("budget") == "full":
        printed = gpu_hardware(runs[0]["path"].parent)
        hw = (runs[0]["summary"] or {}).get("hardware") or (printed["name"] if printed else "GPU")
        return (
            "paper schedule, GPU"
            if h["done"]
            else f"paper schedule, STOPPED after epoch {h['epochs']} of {_planned_epochs(runs[0])} (GPU time); {hw}"
        )
    return "paper budget" if "budget" not in tags else "REDUCED: " + _budget_text(runs[0])


def _planned_epochs(run: dict[str, Any]) -> Any:
    if not (run["path"] / rundir.CONFIG).is_file():
        return "?"
    return rundir.read_run_config(run["path"]).get("epochs", "?")


def _at_epoch(run: dict[str, Any], epoch: Any) -> dict[str, Any] | None:
    """Test accuracies of a run up to ``epoch``: at that epoch, and of the validation-selected epoch so far."""
    recs = [r for r in run["records"] if "test_acc" in r and r["epoch"] <= epoch]
    if not recs or recs[-1]["epoch"] != epoch:
        return None
    sel = max(recs, key=lambda r: r.get("val_acc", -1))
    return {
        "at": recs[-1]["test_acc"],
        "selected": sel["test_acc"] if "val_acc" in sel else None,
        "best": max(r["test_acc"] for r in recs),
    }


def _readme_row_runs(rep: Report, label: str, data: str, paper: str, exps: Any, model: str | None) -> list[list[str]]:
    """The table rows of one README row: one per protocol and seed group of its LaPerm runs ([]: none)."""
    rows = []
    for exp in exps or ():
        everything = select(rep.runs.get(exp, []), model=model)
        runs = [r for r in everything if r["tags"].get("method", "").lower() == "laperm"]
        adam = [
            r
            for r in everything
            if r["tags"].get("method", "").lower() == "adam"
            and not str(r["tags"].get("protocol", "")).startswith("paper")
        ]
        for protocol in dict.fromkeys(r["tags"].get("protocol") for r in runs):
            for seeds_label, sel in _seed_groups([r for r in runs if r["tags"].get("protocol") == protocol]):
                g = group_row(sel)
                h = headline(sel[0])
                adam_col = group_row(adam)["final"] if adam else "–"
                if adam and not h["done"]:  # compare at the epoch the LaPerm run reached
                    same = _at_epoch(adam[0], h["epochs"])
                    adam_col = f"{100 * same['at']:.2f}% (epoch {h['epochs']})" if same else "–"
                # one bracket: "[a] [b]" would read as a reference link in the docs site's markdown
                notes = "; ".join(x for x in (protocol, seeds_label) if x)
                name = label + (f" [{notes}]" if notes else "")
                rows.append(
                    [
                        name,
                        data,
                        paper,
                        g["selected"],
                        g["final"],
                        g["best"],
                        adam_col,
                        f"{g['epochs']}; {_budget_label(sel, h)}",
                        g["seeds"],
                        g["time"],
                    ]
                )
    return rows


def _readme_table(rep: Report) -> None:
    rows = []
    for label, data, epochs, paper, exps, model in README_ROWS:
        found = _readme_row_runs(rep, label, data, paper, exps, model)
        rows += found or [[label, data, paper, "not run here", "–", "–", "–", f"{epochs} (paper)", "–", "–"]]
    from .suite import F2_CHOSEN

    chosen = select(rep.runs.get("f2-research", []), setting=F2_CHOSEN)
    if chosen:
        g = group_row(chosen)
        rows.append(
            [
                f"F2, beyond the paper: `{F2_CHOSEN}` sync (see below)",
                "MNIST",
                "–",
                g["selected"],
                g["final"],
                g["best"],
                "–",
                f"{g['epochs']}; paper budget",
                g["seeds"],
                g["time"],
            ]
        )
    rep.add(
        "## The paper's README rows (docs/algorithm.md §5)",
        "",
        "Ours: LaPerm, mean ± sample std over seeds. *Selected*: test accuracy of the model chosen on a "
        "validation split held out of the training set (our rule). *Final*: the synced model at the end. "
        "*Best-test*: the best test accuracy over the run, the paper's own (optimistic) protocol, labelled.",
        "",
        _table(
            [
                "run",
                "data",
                "paper (README)",
                "ours: selected",
                "ours: final",
                "ours: best-test",
                "Adam, same net and budget: final",
                "epochs; budget",
                "seeds",
                "time (train)",
            ],
            rows,
        ),
        "",
        "The Adam column uses the same net, budget and data; for F1/F2 it starts from a dense he-uniform init "
        "(there is no Adam run on a two-valued init). Unfinished runs show their last evaluated epoch or their "
        "newest checkpoint (synced, fractional epoch); where a LaPerm run stopped early, the Adam column gives "
        "Adam's test accuracy at the same epoch. Where seeds were added after the pre-registered 0–2, both "
        "means are shown.",
        "",
    )


def _paper(rep: Report) -> None:
    rep.add(*paper_rows(rep.results, rep.runs.get("paper", []), _table))
    rep.add(*paper_curves(rep.runs.get("paper", []), rep.fig_dir))
    rep.notes("paper")


def _agnostic(rep: Report) -> None:
    runs = rep.runs.get("agnostic")
    if not runs:
        return
    rep.add("## Single shared value (F1, F2)", "")
    rows: list[list[str]] = []
    groups: list[Any] = []
    vals: dict[str, list[float]] = {"LaPerm (shared value)": [], "Adam (dense he-uniform)": []}
    errs: dict[str, list[float]] = {k: [] for k in vals}
    for model in ("f1", "f2"):
        groups.append(model.upper())
        for method, key in (("LaPerm", "LaPerm (shared value)"), ("Adam", "Adam (dense he-uniform)")):
            sel = select(runs, model=model, method=method)
            if not sel:
                vals[key].append(0)
                errs[key].append(0)
                continue
            for protocol in dict.fromkeys(r["tags"].get("protocol") for r in sel):
                for seeds_label, part in _seed_groups([r for r in sel if r["tags"].get("protocol") == protocol]):
                    g = group_row(part)
                    rows.append(
                        [
                            model.upper(),
                            method,
                            part[0]["tags"].get("init"),
                            "; ".join(x for x in (protocol, seeds_label) if x) or "–",
                            g["selected"],
                            g["final"],
                            g["best"],
                            g["seeds"],
                            g["time"],
                        ]
                    )
            sel = [r for r in sel if not str(r["tags"].get("protocol", "")).startswith("paper")] or sel
            m, s = mean_std([headline(r)["best"] for r in sel])
            vals[key].append(100 * m)
            errs[key].append(100 * s)
    rep.add(
        _table(["model", "method", "init", "data protocol", "selected", "final", "best-test", "seeds", "time"], rows),
        "",
    )
    plots.bars(
        rep.fig_dir / "agnostic.png",
        groups,
        vals,
        errs,
        title="F1/F2: best-test accuracy, mean ± std (55k/5k protocol)",
        ylabel="test accuracy (%)",
        hline=(10, "chance"),
    )
    rep.figure("agnostic.png", "agnostic")
    rep.notes("agnostic")
    rep.commands(runs)


def _f2_research(rep: Report) -> None:
    runs = rep.runs.get("f2-research")
    if not runs:
        return
    rep.add(
        "## F2 beyond the published protocol",
        "",
        "Same F2 architecture, init values (0 / 0.03) and per-layer sparsity; only k, learning rate, inner "
        "optimizer, loss (scale, temperature) or sync rule and granularity change. *Inner* is the best test "
        "accuracy of the unsynced inner weights over the epoch ends (each some steps after a sync; not shown "
        "for the latent rule, whose model weights are synced at every step and whose latent weights only "
        "matter through their ranks), *min class recall* the lowest per-class recall of the final synced "
        "net.",
        "",
    )
    rows, series = [], {}
    for setting in dict.fromkeys(r["tags"]["setting"] for r in runs):
        sel = select(runs, setting=setting)
        g = group_row(sel)
        latent = "--sync-rule latent" in sel[0]["command"]
        inner = (
            []
            if latent
            else [
                max((x["inner_test_acc"] for x in r["records"] if x.get("inner_test_acc") is not None), default=None)
                for r in sel
            ]
        )
        recall = [
            min(r["records"][-1]["class_recall"]) for r in sel if r["records"] and r["records"][-1].get("class_recall")
        ]
        cmd = sel[0]["command"].replace("laperm train ", "")
        cmd = f"`{cmd}`"

        rows.append([setting, g["selected"], g["final"], g["best"], fmt_acc(inner), fmt_acc(recall), g["seeds"], cmd])
        r0 = sel[0]
        if setting in ("published",) or len(sel) > 1:
            xs, ys = _test_curve(r0)
            series[f"{setting}: synced"] = (xs, ys)
            if not latent and any(x.get("inner_test_acc") is not None for x in r0["records"]):
                series[f"{setting}: inner"] = (
                    xs,
                    [100 * (x.get("inner_test_acc") or 0) for x in r0["records"] if "test_acc" in x],
                )
    rep.add(
        _table(
            [
                "setting",
                "selected",
                "final",
                "best-test",
                "inner (unsynced), best",
                "min class recall",
                "seeds",
                "flags",
            ],
            rows,
        ),
        "",
    )
    if series:
        plots.lines(
            rep.fig_dir / "f2_research.png",
            series,
            title="F2: synced vs inner test accuracy (seed 0)",
            xlabel="epoch",
            ylabel="test accuracy (%)",
            hline=(70, "70% goal"),
        )
        rep.figure("f2_research.png", "f2 research")
    _f2_screening(rep)
    rep.notes("f2-research")


def _f2_screening(rep: Report) -> None:
    """The single-seed screening runs behind the chosen setting (``f2-research/screening/``), collapsed."""
    path = rep.results / "f2-research" / "screening" / "screening.jsonl"
    runs = _read_jsonl(path)
    if not runs:
        return
    rows = [
        [
            r["name"],
            r["rule"],
            ", ".join(f"{k}={v}" for k, v in r["over"].items() if k != "device"),
            fmt_acc([r["selected"]]),
            fmt_acc([r["final"]]),
            fmt_acc([r["best_test"]]),
            fmt_acc([r["inner_best"]]),
            fmt_acc([min(r["recall"])]) if r.get("recall") else "–",
        ]
        for r in sorted(runs, key=lambda r: r["name"])
    ]
    rep.add(
        f"<details><summary>{len(runs)} screening runs (F2 preset + overrides; seed 0 unless the name ends "
        "in -s1/-s2; see results/f2-research/screening/README.md)</summary>",
        "",
        _table(
            ["run", "sync rule", "overrides", "selected", "final", "best-test", "inner, best", "min class recall"], rows
        ),
        "",
        "</details>",
        "",
    )


def _k(rep: Report) -> None:
    runs = rep.runs.get("k")
    if not runs:
        return
    rep.add("## Sync period k", "")
    series, rows = {}, []
    for model in ("f2", "lenet300"):
        sel = sorted(select(runs, model=model), key=lambda r: r["tags"]["k"])
        pts = [(r["tags"]["k"], headline(r)) for r in sel if headline(r)["final"] is not None]
        if pts:
            series[f"{model}: final"] = ([k for k, _ in pts], [100 * h["final"] for _, h in pts])
        for r in sel:
            h = headline(r)
            moved = [x.get("reconnected") for x in r["records"] if x.get("reconnected") is not None]
            rows.append(
                [
                    model,
                    r["tags"]["k"],
                    fmt_acc([h["selected"]]),
                    fmt_acc([h["final"]]),
                    fmt_acc([h["best"]]),
                    f"{100 * sum(moved) / len(moved):.2f}%" if moved else "–",
                    h["epochs"],
                ]
            )
    rep.add(_table(["model", "k", "selected", "final", "best-test", "mean reconnected / epoch", "epochs"], rows), "")
    if series:
        plots.lines(
            rep.fig_dir / "k_sweep.png",
            series,
            title="final synced test accuracy vs k",
            xlabel="k (steps)",
            ylabel="test accuracy (%)",
            logx=True,
        )
        rep.figure("k_sweep.png", "k sweep")
    rep.notes("k")
    rep.commands(runs)


def _sparse(rep: Report) -> None:
    runs = rep.runs.get("sparse")
    if not runs:
        return
    rep.add("## Sparse random init: LaPerm rewires, Adam keeps the mask", "")
    rows = []
    for model in ("lenet300", "conv2"):
        series = {}
        for method in ("laperm", "adam"):
            sel = select(runs, model=model, method=method)
            xs, ys = [], []
            for p in sorted({r["tags"]["pruned"] for r in sel}):
                group = select(sel, pruned=p)  # one row per sparsity: mean ± std over its seeds
                g = group_row(group)
                finals = [h["final"] for h in map(headline, group) if h["final"] is not None]
                if finals:
                    xs.append(100 * p)
                    ys.append(100 * mean_std(finals)[0])
                rows.append(
                    [
                        model,
                        method,
                        f"{100 * p:.0f}%",
                        g["selected"],
                        g["final"],
                        g["best"],
                        g["seeds"],
                        g["epochs"],
                        _budget_text(group[0]),
                    ]
                )
            if xs:
                series[method] = (xs, ys)
        if series:
            plots.lines(
                rep.fig_dir / f"sparse_{model}.png",
                series,
                title=f"{model}: final test accuracy vs sparsity",
                xlabel="pruned (%)",
                ylabel="test accuracy (%)",
            )
            rep.figure(f"sparse_{model}.png", f"sparse {model}")
    rep.add(
        _table(["model", "method", "pruned", "selected", "final", "best-test", "seeds", "epochs", "budget"], rows), ""
    )
    rep.notes("sparse")
    rep.commands(runs)


def _test_curve(run: dict[str, Any]) -> tuple[list[Any], list[float]]:
    """(epochs, test accuracy in %) of a run's evaluated epochs."""
    recs = [x for x in run["records"] if "test_acc" in x]
    return [x["epoch"] for x in recs], [100 * x["test_acc"] for x in recs]


def _model_figures(rep: Report, runs: Sequence[dict[str, Any]], series: dict[str, Any], prefix: str, what: str) -> None:
    """One figure per model, ``figures/<prefix>_<model>.png``, of the ``"<model> <method>"`` series."""
    for model in dict.fromkeys(r["tags"]["model"] for r in runs):
        part = {k: v for k, v in series.items() if k.startswith(model + " ")}
        if part:
            plots.lines(
                rep.fig_dir / f"{prefix}_{model}.png",
                part,
                title=f"{model}: {what}",
                xlabel="epoch",
                ylabel="test accuracy (%)",
            )
            rep.figure(f"{prefix}_{model}.png", f"{prefix} {model}")


def _dense(rep: Report) -> None:
    runs = rep.runs.get("dense")
    if not runs:
        return
    rep.add("## Dense random init: LaPerm vs Adam (same net, init and budget)", "")
    rows, series = [], {}
    for model in dict.fromkeys(r["tags"]["model"] for r in runs):
        for method in ("laperm", "adam"):
            sel = select(runs, model=model, method=method)
            if not sel:
                continue
            g = group_row(sel)
            rows.append(
                [model, method, g["selected"], g["final"], g["best"], g["epochs"], _budget_text(sel[0]), g["time"]]
            )
            series[f"{model} {method}"] = _test_curve(sel[0])
    rep.add(_table(["model", "method", "selected", "final", "best-test", "epochs", "budget", "time"], rows), "")
    _model_figures(rep, runs, series, "dense", "test accuracy (synced)")
    rep.notes("dense")
    rep.commands(runs)


def _full(rep: Report) -> None:
    runs = rep.runs.get("full")
    if not runs:
        return
    rep.add(
        "## The paper's schedule on a GPU: Conv2 (CIFAR-10) and Conv7 (MNIST)",
        "",
        "LaPerm and Adam from the same init, same data order and schedule. Runs stopped early by the GPU time "
        "limit are compared at the last epoch *both* reached: *at epoch* is the test accuracy there, "
        "*selected* the test accuracy of the validation-best epoch up to it, *best-test* the best test accuracy "
        "up to it (the paper's protocol, optimistic).",
        "",
    )
    rows, series = [], {}
    for model in dict.fromkeys(r["tags"]["model"] for r in runs):
        sel = {m: select(runs, model=model, method=m) for m in ("laperm", "adam")}
        if not all(sel.values()):
            continue
        common = min(headline(v[0])["epochs"] for v in sel.values())
        gap: dict[str, Any] = {}
        for method, part in sel.items():
            r = part[0]
            h, same = headline(r), _at_epoch(r, common)
            series[f"{model} {method}"] = _test_curve(r)
            ips = [x["images_per_s"] for x in r["records"] if x.get("images_per_s")]
            gap[method] = same
            rows.append(
                [
                    model,
                    method,
                    f"{h['epochs']} of {_planned_epochs(r)}" + ("" if h["done"] else " (stopped)"),
                    common,
                    *(fmt_acc([same[k]]) if same else "–" for k in ("at", "selected", "best")),
                    f"{statistics.median(ips):,.0f}" if ips else "–",
                ]
            )
        if all(gap.values()):
            rows.append(
                [
                    model,
                    "LaPerm − Adam",
                    "",
                    common,
                    *(
                        f"{100 * (gap['laperm'][k] - gap['adam'][k]):+.2f} points"
                        if gap["adam"][k] is not None and gap["laperm"][k] is not None
                        else "–"
                        for k in ("at", "selected", "best")
                    ),
                    "",
                ]
            )
    rep.add(
        _table(
            [
                "model",
                "method",
                "epochs run",
                "compared at epoch",
                "test at epoch",
                "selected",
                "best-test",
                "images/s (median epoch)",
            ],
            rows,
        ),
        "",
    )
    hw = gpu_hardware(rep.results / "full")
    if hw is not None:
        rep.add("Hardware (as the GPU machine printed it): `" + " · ".join(hw["lines"]) + "`.", "")
    _model_figures(rep, runs, series, "full", "test accuracy (synced), paper schedule")
    rep.notes("full")
    rep.commands(runs)


def _rebuild(rep: Report) -> None:
    runs = [dict(r, where="") for r in rep.runs.get("rebuild", [])]
    runs += [dict(r, where="full") for r in rep.runs.get("full", []) if r["rebuild"]]
    if not runs:
        return
    rep.add(
        "## Rebuild: Adam-trained nets rebuilt from their initial values at the trained ranks",
        "",
        "*kept*: rebuilt accuracy / trained accuracy. Controls: the same initial values randomly permuted in "
        "each row (*random perm*), and a fresh init's values placed at the trained ranks (*fresh values*). "
        "Nets with BatchNorm also show the rebuilt net after recomputing BN statistics on 20 training "
        "batches (*rebuilt + BN*).",
        "",
    )
    rows = []
    for r in runs:
        if not r["rebuild"]:
            continue
        model = r["tags"]["model"]
        fig = f"rebuild_{r['where']}_{model}.png" if r["where"] else f"rebuild_{model}.png"
        budget = "paper schedule, GPU" if r["where"] else _budget_text(r)
        keys = [k for k in ("trained", "rebuilt", "rebuilt_bn", "rebuilt_fresh", "random_perm") if k in r["rebuild"][0]]
        series = {k: ([x["epoch"] for x in r["rebuild"]], [100 * x[k] for x in r["rebuild"]]) for k in keys}
        plots.lines(
            rep.fig_dir / fig,
            series,
            title=f"{model} ({budget}): trained vs rebuilt (test)",
            xlabel="epoch",
            ylabel="test accuracy (%)",
            hline=(10, "chance"),
        )
        rep.figure(fig, f"rebuild {model} {r['where']}")
        model = f"{model} ({budget})" if r["where"] else model
        for x in r["rebuild"]:
            best_rebuilt = max(x["rebuilt"], x.get("rebuilt_bn", 0))
            rows.append(
                [
                    model,
                    x["epoch"],
                    f"{100 * x['trained']:.2f}%",
                    f"{100 * x['rebuilt']:.2f}%",
                    f"{100 * x['rebuilt_bn']:.2f}%" if "rebuilt_bn" in x else "–",
                    f"{100 * best_rebuilt / max(x['trained'], 1e-9):.1f}%",
                    f"{100 * x['rebuilt_fresh']:.2f}%",
                    f"{100 * x['random_perm']:.2f}%",
                ]
            )
    rep.add(
        _table(["model", "epoch", "trained", "rebuilt", "rebuilt + BN", "kept", "fresh values", "random perm"], rows),
        "",
    )
    rep.notes("rebuild")
    rep.commands(runs)


def _profiles(rep: Report) -> None:
    prof_dir = rep.results / "profiles"
    files = sorted(prof_dir.glob("*__*.json")) if prof_dir.is_dir() else []
    if not files:
        return
    rep.add(
        "## Weight profiles",
        "",
        "*spread*: share of the variance of the sorted weights not explained by the layer's mean profile "
        "(0: all units of the layer have the same profile). *drift*: ‖S_trained − S_init‖ / ‖S_init‖ of the "
        "sorted rows (0 for LaPerm by construction).",
        "",
    )
    rows = []
    for f in files:
        d = json.loads(f.read_text())
        for layer, v in d["layers"].items():
            rows.append(
                [
                    d["label"],
                    layer,
                    v["units"],
                    f"{v['spread_init']:.4f}",
                    f"{v['spread_trained']:.4f}",
                    f"{v['drift']:.3f}",
                ]
            )
        plots.profiles_figure(rep.fig_dir / f"profiles_{f.stem}.png", d["layers"], title=d["label"])
        rep.figure(f"profiles_{f.stem}.png", d["label"])
    rep.add(_table(["run", "layer", "units", "spread (init)", "spread (trained)", "drift from init"], rows), "")
    rep.notes("profiles")


def _dynamics(rep: Report) -> None:
    runs = rep.runs.get("dynamics")
    if not runs:
        return
    rep.add("## Reconnection dynamics", "")
    panels = {r["tags"]["model"]: r["dynamics"] for r in runs if r["dynamics"]}
    if panels:
        plots.dynamics_figure(rep.fig_dir / "dynamics.png", panels)
        rep.figure("dynamics.png", "dynamics")
        rows = []
        for model, syncs in panels.items():
            first = [s for s in syncs if s["moved_total"] is not None][:3]
            rows.append(
                [
                    model,
                    len(syncs),
                    ", ".join(f"{100 * s['moved_total']:.2f}%" for s in first),
                    ", ".join(f"{100 * s['moved_total']:.3f}%" for s in syncs[-3:]),
                ]
            )
        rep.add(_table(["model", "syncs", "moved at first 3 syncs", "moved at last 3 syncs"], rows), "")
    for r in runs:
        snap = r["path"] / "snapshots.npz"
        if snap.is_file():
            data = np.load(snap)
            names = [n for n in data.files if n != "steps" and data[n].shape[-1] == 784]  # 28x28 templates only
            if names:
                plots.templates_grid(rep.fig_dir / "f1_templates.png", data["steps"], data[names[0]])
                plots.templates_gif(rep.fig_dir / "f1_templates.gif", data["steps"], data[names[0]])
                rep.figure("f1_templates.png", "F1 templates")
                rep.add("Animation: [figures/f1_templates.gif](figures/f1_templates.gif)", "")
    rep.notes("dynamics")
    rep.commands(runs)


SECTIONS: list[Callable[[Report], None]] = [
    _readme_table,
    _paper,
    _agnostic,
    _f2_research,
    _full,
    _dense,
    _k,
    _sparse,
    _rebuild,
    _profiles,
    _dynamics,
    transformers_section,
]


def _gpu_name(rep: Report) -> str:
    hw = gpu_hardware(rep.results / "full")
    if hw is None:
        return "a GPU (not run yet)"
    return f"one {hw['name']} GPU" + (f" (torch {hw['torch']})" if hw["torch"] else "")


def write_report(results: str | Path = "results", docs: str | Path = "docs") -> Path:
    """Write ``docs/results.md`` and its figures from ``results``; returns the path of the markdown file."""
    rep = Report(Path(results), Path(docs))
    torch_versions = {r["summary"]["torch"] for runs in rep.runs.values() for r in runs if r["summary"]}
    rep.add(
        "# Results",
        "",
        "Generated by `laperm report` from the metrics committed under `results/` (no number here was typed "
        "by hand). Every run's exact command is listed in its section and in `results/<experiment>/"
        "experiment.json`; re-run a section with `laperm run <experiment>` (finished runs are skipped).",
        "",
        f"Hardware: a shared 2-core x86-64 CPU ({platform.machine()}), one torch thread per run, except "
        f"the `full` experiment, which ran on {_gpu_name(rep)}, and the rows of `results/paper`, whose device "
        "is given per row; torch "
        f"{', '.join(sorted(torch_versions)) or '?'}. Data: the bundled "
        "MNIST (x/255, no augmentation unless the preset says so), and for CIFAR-10 the JPEG CIFAR-10 copy "
        "(quality 75, not bit-exact), normalised per channel with its own mean and std. Validation: 5,000 "
        "training images held out (1,000 for the reduced CIFAR runs) unless a table says otherwise.",
        "",
    )
    rep.notes("summary")
    for section in SECTIONS:
        section(rep)
    path = rep.docs / "results.md"
    path.write_text("\n".join(rep.lines).rstrip() + "\n")
    return path
