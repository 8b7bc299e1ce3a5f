"""The report's table of every README row as it stands (``results/paper``, ``laperm run paper``).

Each row shows where it is: *full* (the schedule finished) or a *prefix* (epoch e of E), LaPerm and
Adam at the last epoch both reached and their gap there, and where the numbers come from (device,
torch, commit) -- each run's own, never another's:

1. a run folded in from elsewhere: its manifest entry's ``provenance`` text, else its ``device``,
   ``torch`` and ``commit`` fields;
2. a run trained by laperm: its folder's ``provenance.jsonl`` (:mod:`laperm.provenance`: one line per
   start or resume, so a run trained in several GPU windows lists each place);
3. else its summary's hardware and torch (the commit "not recorded"), else "not recorded".

(``paper/provenance.jsonl``, one line per GPU window, records the windows; it credits no run.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import provenance
from ..analysis import plots
from .paper import ROWS, PaperRow

__all__ = ["paper_rows", "row_status", "paper_curves"]

NOT_RECORDED = "not recorded"


def _epochs_done(run: dict[str, Any]) -> int:
    if run["summary"] is not None:
        return int(run["summary"]["epochs"])
    recs = [r for r in run["records"] if "test_acc" in r]
    return int(recs[-1]["epoch"]) if recs else 0


def _test_at(run: dict[str, Any], epoch: int) -> float | None:
    """The synced test accuracy at the end of ``epoch`` (the final model's where the run finished there)."""
    s = run["summary"]
    if s is not None and int(s["epochs"]) == epoch:
        return float(s["final_test_acc"])
    return next((float(r["test_acc"]) for r in run["records"] if r.get("epoch") == epoch and "test_acc" in r), None)


def _selected_at(run: dict[str, Any], epoch: int) -> float | None:
    """The test accuracy of the model selected on validation up to ``epoch`` (never on test).

    A run that finished there reports its own selection (it evaluates more often than once an epoch);
    elsewhere the epoch with the highest validation accuracy (the earliest of ties) is taken."""
    s = run["summary"]
    if s is not None and int(s["epochs"]) == epoch and s.get("selected_test_acc") is not None:
        return float(s["selected_test_acc"])
    recs = [r for r in run["records"] if r.get("epoch", 0) <= epoch and "val_acc" in r and "test_acc" in r]
    if not recs:
        return None
    return float(max(recs, key=lambda r: (r["val_acc"], -r["epoch"]))["test_acc"])


def _acc(final: float | None, selected: float | None) -> str:
    if final is None:
        return "–"
    return f"{100 * final:.2f}%" + (f" ({100 * selected:.2f}%)" if selected is not None else "")


def _gap(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> str:
    """LaPerm − Adam in points, synced at the epoch (and, in brackets, between the models selected on validation)."""
    if a[0] is None or b[0] is None:
        return "–"
    text = f"{100 * (a[0] - b[0]):+.2f} points"
    return text + (f" ({100 * (a[1] - b[1]):+.2f})" if a[1] is not None and b[1] is not None else "")


def _standing(run: dict[str, Any], planned: int) -> str:
    done = _epochs_done(run)
    return f"full ({done} epochs)" if run["summary"] is not None else f"prefix (epoch {done} of {planned})"


def _where(run: dict[str, Any]) -> str:
    """Device, torch and commit of this run, as recorded for it (the module's doc); "not recorded" if nothing is."""
    if run.get("provenance"):
        return str(run["provenance"])
    if any(run.get(k) for k in ("device", "torch", "commit")):
        return provenance.describe([{k: run.get(k) for k in ("device", "torch", "commit")}]) or NOT_RECORDED
    own = provenance.describe(provenance.read(run["path"])) if run.get("path") is not None else None
    if own:
        return own
    s = run["summary"] or {}
    if s.get("hardware") or s.get("torch"):
        return provenance.describe([{"hardware": s.get("hardware"), "torch": s.get("torch")}]) or NOT_RECORDED
    return NOT_RECORDED


def _pairs(runs: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(LaPerm run, its Adam run from the same source and seed), most advanced LaPerm run first."""
    laperm = [r for r in runs if r["tags"].get("method") == "laperm"]
    laperm.sort(key=lambda r: (r["summary"] is None, -_epochs_done(r)))
    out = []
    for lap in laperm:
        key = (lap["tags"].get("source"), lap["tags"].get("seed"))
        adam = [
            r
            for r in runs
            if r["tags"].get("method") == "adam" and (r["tags"].get("source"), r["tags"].get("seed")) == key
        ]
        out.append((lap, max(adam, key=_epochs_done) if adam else None))
    return out


def _row_runs(row: PaperRow, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of ``row``: its own, and for a row beyond the paper the Adam runs of its baseline row."""
    own = [r for r in runs if r["tags"].get("row") == row.label]
    if row.baseline is None:
        return own
    return own + [r for r in runs if r["tags"].get("row") == row.baseline and r["tags"].get("method") == "adam"]


def row_status(row: PaperRow, runs: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The table lines of one README row: one per (source, seed) pair of runs, or one saying nothing ran."""
    pairs = _pairs(_row_runs(row, runs))
    if not pairs:
        return [[row.label, row.data, row.paper, "not run yet", "–", "–", "–", "–", "–"]]
    lines = []
    for lap, adam in pairs:
        common = min(_epochs_done(lap), _epochs_done(adam)) if adam is not None else _epochs_done(lap)
        acc_l = (_test_at(lap, common), _selected_at(lap, common))
        acc_a = (_test_at(adam, common), _selected_at(adam, common)) if adam is not None else (None, None)
        status = f"LaPerm {_standing(lap, row.epochs)}; Adam " + (
            _standing(adam, row.epochs) if adam is not None else "not run"
        )
        where = _where(lap)
        lines.append(
            [row.label, row.data, row.paper, status, common, _acc(*acc_l), _acc(*acc_a), _gap(acc_l, acc_a), where]
        )
    return lines


def paper_rows(results: Path, runs: Sequence[dict[str, Any]], table: Callable[..., str]) -> list[str]:
    """The markdown of the section: every README row as it stands."""
    lines = [line for row in ROWS for line in row_status(row, runs)]
    header = [
        "row",
        "data",
        "paper (README)",
        "where it stands",
        "compared at epoch",
        "LaPerm: test (selected on val)",
        "Adam: test (selected on val)",
        "LaPerm − Adam (selected)",
        "device, torch, commit",
    ]
    return [
        "## Every README row as it stands (`laperm run paper`, `results/paper/`)",
        "",
        "Each README row at the paper's schedule, LaPerm and Adam from the same init (Adam keeps a pruned or "
        "shared-value init's mask). *Full*: the schedule finished; *prefix (epoch e of E)*: the run stopped "
        "there (GPU time). Both are compared at the last epoch both reached (synced test accuracy; the final "
        "model where a run finished). A row is claimed full only when its LaPerm run finished. Train them "
        "with `laperm run paper` (one GPU window: `scripts/gpu_window.sh`, docs/gpu.md). F1 and F2 have "
        "finished CPU runs in the table above (`agnostic`), whose Adam starts from a dense init; here "
        "Adam starts from the same shared-value init. Accuracies are the synced model's at that epoch "
        "and, in brackets, the model selected on the validation split up to it (never selected on "
        "test). Rows whose paper column is '–' go beyond the paper: the same preset with another LaPerm "
        "setting, compared with the README row's Adam run.",
        "",
        table(header, lines),
        "",
    ]


def _curve_label(run: dict[str, Any], planned: int) -> str:
    tags = run["tags"]
    row = next((r for r in ROWS if r.label == tags.get("row")), None)
    setting = ", ".join(f"{k}={v}" for k, v in row.variant if k != "checkpoint_every") if row else ""
    name = "Adam" if tags.get("method") != "laperm" else f"LaPerm, {setting or 'paper rule'}"
    where = f"{tags['source']}, " if tags.get("source") else ""
    return f"{name} ({where}{_standing(run, planned)})"


def _curve(run: dict[str, Any], key: str, scale: float) -> tuple[list[int], list[float]]:
    recs = [r for r in run["records"] if key in r and "epoch" in r]
    return [int(r["epoch"]) for r in recs], [scale * float(r[key]) for r in recs]


def paper_curves(runs: Sequence[dict[str, Any]], fig_dir: Path) -> list[str]:
    """Per model with trained epochs in ``results/paper``: test accuracy and test loss per epoch of every
    LaPerm run (each sync rule) and its Adam baseline, ``figures/paper_<model>.png``; the markdown links."""
    lines: list[str] = []
    for model in dict.fromkeys(row.model for row in ROWS):
        rows = [row for row in ROWS if row.model == model]
        mine = [(r, row.epochs) for row in rows for r in runs if r["tags"].get("row") == row.label]
        mine = [(r, planned) for r, planned in mine if len(_curve(r, "test_acc", 1)[0]) >= 2]
        if not mine:
            continue
        acc = {_curve_label(r, e): _curve(r, "test_acc", 100.0) for r, e in mine}
        loss = {_curve_label(r, e): _curve(r, "test_loss", 1.0) for r, e in mine}
        styles = {_curve_label(r, e): "--" if r["tags"].get("source") else "-o" for r, e in mine}
        name = f"paper_{model}.png"
        panels = {"test accuracy (%), synced": acc, "test loss, synced": {k: v for k, v in loss.items() if v[0]}}
        plots.panels(fig_dir / name, panels, title=f"{model}: LaPerm and Adam per epoch", xlabel="epoch", styles=styles)
        lines += [f"![{model}: LaPerm and Adam per epoch](figures/{name})", ""]
    return lines
