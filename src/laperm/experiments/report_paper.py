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
from .paper import PAPER_ROWS, PaperRow

__all__ = ["paper_rows", "row_status"]

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


def row_status(row: PaperRow, runs: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The table lines of one README row: one per (source, seed) pair of runs, or one saying nothing ran."""
    pairs = _pairs([r for r in runs if r["tags"].get("row") == row.label])
    if not pairs:
        return [[row.label, row.data, row.paper, "not run yet", "–", "–", "–", "–", "–"]]
    lines = []
    for lap, adam in pairs:
        common = min(_epochs_done(lap), _epochs_done(adam)) if adam is not None else _epochs_done(lap)
        acc_l, acc_a = _test_at(lap, common), (_test_at(adam, common) if adam is not None else None)
        gap = f"{100 * (acc_l - acc_a):+.2f} points" if acc_l is not None and acc_a is not None else "–"
        status = f"LaPerm {_standing(lap, row.epochs)}; Adam " + (
            _standing(adam, row.epochs) if adam is not None else "not run"
        )
        lines.append(
            [
                row.label,
                row.data,
                row.paper,
                status,
                common,
                f"{100 * acc_l:.2f}%" if acc_l is not None else "–",
                f"{100 * acc_a:.2f}%" if acc_a is not None else "–",
                gap,
                _where(lap),
            ]
        )
    return lines


def paper_rows(results: Path, runs: Sequence[dict[str, Any]], table: Callable[..., str]) -> list[str]:
    """The markdown of the section: every README row as it stands."""
    lines = [line for row in PAPER_ROWS for line in row_status(row, runs)]
    header = [
        "row",
        "data",
        "paper (README)",
        "where it stands",
        "compared at epoch",
        "LaPerm: test",
        "Adam: test",
        "LaPerm − Adam",
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
        "Adam starts from the same shared-value init.",
        "",
        table(header, lines),
        "",
    ]
