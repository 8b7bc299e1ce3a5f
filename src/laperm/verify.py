"""``laperm verify``: saved weights checked, row by row, to be permutations of their initial values.

Works on a run folder (final.pt and best.pt against init.pt) and on a compact
file written by ``laperm export`` (decoded against θ0 rebuilt from its recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, reconnect, rundir
from .export.fileformat import decode_compact, is_compact_file, read_compact
from .optim import LaPerm
from .reconnect import RowLayout
from .rundir import RunDirError

__all__ = ["VerifyReport", "layout_records", "layouts_of_record", "verify_weights", "verify_run", "verify_compact"]

LAYOUT_FIELDS = ("name", "granularity", "transposed", "groups")  # one init.pt "permuted" record


@dataclass
class VerifyReport:
    ok: bool
    checked: list[str]
    tensors: int
    weights: int
    failures: list[str]
    free: list[dict[str, str]] = field(default_factory=list)  # init.pt's: {"name", "reason"} of what was not permuted

    def message(self) -> str:
        if self.ok:
            text = (
                f"verified: {self.weights:,} permuted weights in {self.tensors} tensors of "
                f"{', '.join(self.checked)} are row-wise permutations of their initial values"
            )
        else:
            text = "NOT a permutation of the initial weights: " + "; ".join(self.failures)
        return text + self.free_lines()

    def free_lines(self) -> str:
        """What the run left free (trained by the inner optimizer), counted by reason; untrainable ones by name."""
        by_reason: dict[str, list[str]] = {}
        for r in self.free:
            by_reason.setdefault(r["reason"], []).append(r["name"])
        lines = [
            f"\n  free: {', '.join(names)} ({why})" if "untrainable" in why else f"\n  free: {len(names)} x {why}"
            for why, names in by_reason.items()
        ]
        return "".join(lines)


def layout_records(optimizer: LaPerm) -> list[dict[str, Any]]:
    """JSON-able description of what a LaPerm optimizer permutes (init.pt's ``permuted``)."""
    out = []
    for _, p in optimizer.permuted_parameters():
        layout = optimizer.layout_of(p)
        out.append({"name": optimizer.name_of(p), **layout.record()})
    return out


def layouts_of_record(init: dict[str, Any]) -> dict[str, RowLayout]:
    """``{name: RowLayout}`` from init.pt's ``permuted`` records (the inverse of :func:`layout_records`)."""
    return {r["name"]: RowLayout.from_record(r) for r in init["permuted"]}


def verify_weights(init: dict[str, Any], weights: dict[str, torch.Tensor]) -> tuple[int, int, list[str]]:
    """Check ``weights`` against ``init`` (as stored in init.pt); returns (tensors, weights, failures)."""
    failures, n, total = [], 0, 0
    for name, layout in layouts_of_record(init).items():
        if name not in weights or name not in init["state"]:
            failures.append(f"{name} is missing")
            continue
        if not isinstance(weights[name], torch.Tensor):
            failures.append(f"{name} is not a tensor")
            continue
        if not reconnect.is_row_permutation(weights[name].cpu(), init["state"][name].cpu(), layout):
            failures.append(f"{name} is not a row-wise permutation of its initial values")
        n, total = n + 1, total + weights[name].numel()
    return n, total, failures


def _load_init(run_dir: Path) -> dict[str, Any]:
    init = checkpoint.load(run_dir / rundir.INIT)
    if not (
        isinstance(init, dict)
        and isinstance(init.get("state"), dict)
        and isinstance(init.get("permuted", []), list)
        and all(isinstance(r, dict) and set(LAYOUT_FIELDS) <= r.keys() for r in init.get("permuted", []))
        and isinstance(init.get("free", []), list)
        and all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("reason"), str)
            for r in init.get("free", [])
        )
    ):
        raise RunDirError(f"{run_dir / rundir.INIT} is not a laperm init record (damaged or from another tool)")
    if not init.get("permuted"):
        raise RunDirError(f"{run_dir} was trained without LaPerm ({init.get('optimizer')}); nothing to verify")
    return init


def verify_run(run_dir: str | Path) -> VerifyReport:
    """Check final.pt (and best.pt) of a finished run against its init.pt (or a `laperm export` file)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and is_compact_file(run_dir):  # a compact checkpoint written by `laperm export`
        return verify_compact(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a folder; pass a laperm run folder")
    if not (run_dir / rundir.INIT).is_file():
        raise RunDirError(f"{run_dir} is not a laperm run folder (no init.pt)")
    init = _load_init(run_dir)
    checked, failures, tensors, weights = [], [], 0, 0
    for name in (rundir.FINAL, rundir.BEST):
        if (run_dir / name).is_file():
            saved = checkpoint.load(run_dir / name)
            state = saved.get("model") if isinstance(saved, dict) else None
            if not isinstance(state, dict):
                raise RunDirError(f"{run_dir / name} holds no model weights (damaged or from another tool)")
            tensors, weights, fails = verify_weights(init, state)
            failures += [f"{name}: {f}" for f in fails]
            checked.append(name)
    if not checked:
        raise RunDirError(f"{run_dir} has no final.pt or best.pt yet; finish or --resume the run first")
    return VerifyReport(not failures, checked, tensors, weights, failures, list(init.get("free", [])))


def verify_compact(path: str | Path) -> VerifyReport:
    """``laperm verify`` on a compact file: decode it and check every permuted tensor against θ0."""
    path = Path(path)
    dec = decode_compact(read_compact(path), where=str(path))  # raises on any damage
    failures, weights = [], 0
    for name, layout in dec.layouts.items():
        if not reconnect.is_row_permutation(dec.state_dict[name], dec.theta0[name], layout):
            failures.append(f"{path.name}: {name} is not a row-wise permutation of its initial values")
        weights += dec.state_dict[name].numel()
    return VerifyReport(not failures, [path.name], len(dec.layouts), weights, failures)
