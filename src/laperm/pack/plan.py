"""``laperm pack`` / ``laperm unpack``: run folders into a few files within size limits, and back.

A pack folder holds ``plan.json`` (what is where, checksums), ``plan.md`` (the same for people)
and ``data-000.bin``, ``data-001.bin``, ... -- one byte stream cut into parts of at most
``--max-file-mib``. The stream is a package of the non-run files found beside the runs
(experiment.json, logs; files over 1 MiB skipped), then one package per packed run
(:mod:`laperm.pack.runs`).

Within ``--max-total-mib`` (all files of the pack folder together), what goes first:
the results of finished runs (config, metrics, summary), then the resumable state of each
unfinished run in order (whole, or the run *waits*: nothing of it is packed, and the plan
says so), then the weights of finished runs while they fit.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, rundir
from .errors import PackError
from .names import check_name
from .runs import RunInfo, encode_files, encode_run, inspect_run
from .unpack import FORMAT, PLAN_JSON, VERSION, unpack

__all__ = ["pack_runs", "unpack", "PLAN_JSON", "PLAN_MD"]

MIB = 1 << 20
EXTRA_MAX_BYTES = 1 * MIB  # non-run files larger than this are not carried
PLAN_MD, PART = "plan.md", "data-{:03d}.bin"
DEVICE_TOOL_FILES = 8  # the device tool brings back at most this many files


def plan_reserve(runs: list[RunInfo]) -> int:
    """Bytes kept for plan.json and plan.md within --max-total-mib (they list every run and its files)."""
    names = sum(len(r.files) + len(r.weights) + len(r.left) for r in runs)
    return 32 * 1024 + 2 * 1024 * len(runs) + 2 * 256 * names


# -- finding runs -----------------------------------------------------------------------------


def _is_run(folder: Path) -> bool:
    if not (folder / rundir.MARKER).is_file():
        return False
    try:
        rundir.read_run_config(folder)
    except rundir.RunDirError:
        return False
    return True


def _scan(root: Path, skip: Path) -> tuple[list[Path], list[Path]]:
    """Run folders under ``root`` (at any depth) and the other files beside them."""
    runs: list[Path] = []
    files: list[Path] = []

    def visit(folder: Path) -> None:
        if folder == skip:
            return
        if _is_run(folder):
            runs.append(folder)
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):  # (unpack's staging)
                visit(child)
            elif child.is_file() and child.name != rundir.LOCK and not child.name.endswith(checkpoint.TMP_SUFFIX):
                files.append(child)

    visit(root)
    return runs, files


def _fair_name(name: str) -> bool:
    try:
        check_name(name, "file")
    except PackError:
        return False
    return True


def discover(paths: list[str | Path], out: Path) -> tuple[list[RunInfo], list[tuple[Path, str]], list[dict[str, Any]]]:
    """``(runs, extra files with their recorded paths, skipped extra files)`` under ``paths``."""
    runs: list[RunInfo] = []
    extras: list[tuple[Path, str]] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise PackError(f"{path} does not exist; pass run folders or folders holding them")
        if not path.is_dir():
            raise PackError(f"{path} is not a folder; pass run folders or folders holding them")
        root = path.resolve()
        found, files = _scan(root, out.resolve())
        for folder in found:
            recorded = check_name(folder.relative_to(root.parent).as_posix(), "the run folder")
            if recorded in seen and seen[recorded] != folder:
                raise PackError(f"{folder} and {seen[recorded]} would both unpack to {recorded}; pack them separately")
            if recorded not in seen:
                seen[recorded] = folder
                runs.append(inspect_run(folder, recorded))
        for file in files:
            recorded, size = file.relative_to(root.parent).as_posix(), file.stat().st_size
            if size > EXTRA_MAX_BYTES:
                skipped.append({"path": recorded, "nbytes": size, "reason": "over 1 MiB outside a run folder"})
            elif not _fair_name(recorded):
                skipped.append({"path": recorded, "nbytes": size, "reason": "a name unpack refuses"})
            elif all(recorded != r for _, r in extras):
                extras.append((file, recorded))
    if not runs:
        raise PackError(
            f"no run folders (folders with a config.yaml) in {', '.join(map(str, paths))}; "
            "pass a run folder or a results folder holding runs"
        )
    return runs, extras, skipped


# -- choosing what fits -----------------------------------------------------------------------


def _choose(
    runs: list[RunInfo], budget: int | None, log: Callable[[str], None]
) -> list[tuple[RunInfo, bytes | None, dict[str, Any]]]:
    """Per run: the package to write (None: it waits) and its plan record."""
    full: dict[str, tuple[bytes, dict[str, int]]] = {}
    small: dict[str, bytes] = {}
    for info in runs:
        log(f"encoding {info.path}")
        if info.finished:
            small[info.path] = encode_run(info, weights=False)[0]
        if not info.finished or info.weights:
            full[info.path] = encode_run(info, weights=True)
    chosen: dict[str, bool] = {}  # path -> with weights
    reasons: dict[str, str] = {}
    room = budget if budget is not None else None

    def take(path: str, size: int, weights: bool) -> bool:
        nonlocal room
        if room is not None and size > room:
            return False
        room = None if room is None else room - size
        chosen[path] = weights
        return True

    for info in runs:  # finished runs' results first: they are small and they are the product
        if info.finished and not take(info.path, len(small[info.path]), False):
            reasons[info.path] = "its results did not fit --max-total-mib"
    for info in runs:  # then the state of unfinished runs, each whole
        if info.finished:
            continue
        size = len(full[info.path][0])
        if budget is not None and size > budget:
            reasons[info.path] = (
                f"too large: its packed state is {size / MIB:.1f} MiB, more than all of --max-total-mib "
                f"({budget / MIB:.1f} MiB for data); raise --max-total-mib or keep training it where it is"
            )
        elif not take(info.path, size, True):
            left = (room or 0) / MIB
            reasons[info.path] = f"did not fit --max-total-mib (needs {size / MIB:.2f} MiB, {left:.2f} MiB left)"
    for info in runs:  # then finished runs' weights, while they fit
        if info.finished and info.path in chosen and info.path in full:
            extra = len(full[info.path][0]) - len(small[info.path])
            if take(info.path, extra, True):
                pass
            else:
                reasons[info.path] = "weights left behind: they did not fit --max-total-mib"
    out = []
    for info in runs:
        weights = chosen.get(info.path)
        package = None if weights is None else (full[info.path][0] if weights else small[info.path])
        counts = full[info.path][1] if weights else {}
        out.append((info, package, _run_record(info, weights, counts, reasons.get(info.path))))
    return out


def _run_record(info: RunInfo, weights: bool | None, counts: dict[str, int], reason: str | None) -> dict[str, Any]:
    carried = [str(f.relative_to(info.source)) for f in info.files]
    if weights:
        carried += [str(f.relative_to(info.source)) for f in info.weights]
    return {
        "path": info.path,
        "status": info.status,
        "finished": info.finished,
        "epoch": info.epoch,
        "epochs": info.epochs,
        "step": info.step,
        "packed": weights is not None,
        "weights": bool(weights),
        "checkpoint": info.checkpoint.name if info.checkpoint and weights else None,
        "folder_nbytes": info.folder_nbytes,
        "tensors": counts,
        "carried": carried if weights is not None else [],
        "left": info.left,
        "reason": reason,
    }


# -- writing ----------------------------------------------------------------------------------


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out} is a file; choose a folder")
    if out.is_dir():
        ours = {PLAN_JSON, PLAN_MD}
        other = [
            p.name
            for p in out.iterdir()
            if p.name not in ours and not (p.name.startswith("data-") and p.suffix == ".bin")
        ]
        if other:
            raise PackError(
                f"--out {out} holds other files ({', '.join(sorted(other)[:3])}); choose an empty or new folder"
            )
        for p in out.iterdir():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_parts(out: Path, chunks: list[bytes], part_bytes: int) -> list[dict[str, Any]]:
    """The concatenation of ``chunks`` cut into files of at most ``part_bytes``."""
    parts: list[dict[str, Any]] = []
    handle, digest, size = None, hashlib.sha256(), 0

    def close() -> None:
        nonlocal handle
        if handle is not None:
            handle.close()
            parts[-1].update(nbytes=size, sha256=digest.hexdigest())
            handle = None

    for chunk in chunks:
        view = memoryview(chunk)
        while len(view):
            if handle is None or size == part_bytes:
                close()
                parts.append({"name": PART.format(len(parts))})
                handle, digest, size = open(out / parts[-1]["name"], "wb"), hashlib.sha256(), 0
            n = min(part_bytes - size, len(view))
            handle.write(view[:n])
            digest.update(view[:n])
            size, view = size + n, view[n:]
    close()
    return parts


def _mib(n: int) -> str:
    return f"{n / MIB:.2f} MiB" if n >= MIB // 10 else f"{n / 1024:.1f} KiB"


def _plan_md(plan: dict[str, Any]) -> str:
    lines = [
        "# Packed runs",
        "",
        f"{plan['totals']['summary']}",
        "",
        "| run | status | epochs done | packed | run folder on disk | carried |",
        "|---|---|---|---|---|---|",
    ]
    for r in plan["runs"]:
        epoch = f"{r['epoch']} of {r['epochs']}" if r["epoch"] is not None else f"? of {r['epochs']}"
        packed = _mib(r["nbytes"]) if r["packed"] else "waits"
        what = ("state" if not r["finished"] else "results + weights") if r["weights"] else "results only"
        what = what if r["packed"] else r["reason"]
        lines.append(
            f"| {r['path']} | {r['status']} | {epoch} (step {r['step']}) | {packed} | {_mib(r['folder_nbytes'])} | {what} |"
        )
    lines += ["", "Files: " + ", ".join(f"{p['name']} ({_mib(p['nbytes'])})" for p in plan["parts"])]
    left = [f"- {r['path']}: {x}" for r in plan["runs"] for x in r["left"]]
    skipped = [f"- {s['path']} ({_mib(s['nbytes'])}): {s['reason']}" for s in plan["extras"]["skipped"]]
    if left:
        lines += ["", "Left behind in run folders (not needed to continue them):", *left]
    if skipped:
        lines += ["", "Not carried:", *skipped]
    lines += [
        "",
        "Unpack with `laperm unpack DIR [--into ROOT]`; continue a run with `laperm train --resume ROOT/<run>`.",
    ]
    return "\n".join(lines) + "\n"


def pack_runs(
    paths: list[str | Path],
    out: str | Path,
    max_file_mib: float = 16,
    max_total_mib: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Pack the runs under ``paths`` into ``out`` (see the module's doc); returns the plan (plan.json's content)."""
    if not max_file_mib > 0 or (max_total_mib is not None and not max_total_mib > 0):
        raise PackError("--max-file-mib and --max-total-mib must be positive numbers of MiB")
    out = Path(out)
    runs, extras, skipped = discover(list(paths), out)
    reserve = plan_reserve(runs)
    budget = None if max_total_mib is None else int(max_total_mib * MIB) - reserve
    extras_package = encode_files(extras)
    if budget is not None:
        budget -= len(extras_package)
        if budget <= 0:
            raise PackError(f"--max-total-mib {max_total_mib:g} leaves no room for the runs; raise it")
    chosen = _choose(runs, budget, log)
    if not any(package for _, package, _ in chosen):
        raise PackError("no run fits: " + "; ".join(f"{r['path']}: {r['reason']}" for _, _, r in chosen))
    _prepare_out(out)
    chunks, offset = [extras_package], len(extras_package)
    extra_record = {"offset": 0, "nbytes": len(extras_package), "sha256": hashlib.sha256(extras_package).hexdigest()}
    extra_record |= {"files": [{"path": r, "nbytes": f.stat().st_size, "mtime": f.stat().st_mtime} for f, r in extras]}
    extra_record["skipped"] = skipped
    records = []
    for _, package, record in chosen:
        if package is not None:
            record |= {"offset": offset, "nbytes": len(package), "sha256": hashlib.sha256(package).hexdigest()}
            chunks.append(package)
            offset += len(package)
        records.append(record)
    parts = _write_parts(out, chunks, max(1, int(max_file_mib * MIB)))
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    plan |= {"limits": {"max_file_mib": max_file_mib, "max_total_mib": max_total_mib, "plan_reserve": reserve}}
    plan["parts"] = parts
    plan |= {"extras": extra_record, "runs": records, "totals": _totals(records, parts, out)}
    checkpoint.atomic_write_text(out / PLAN_MD, _plan_md(plan))
    checkpoint.atomic_write_text(out / PLAN_JSON, json.dumps(plan, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    if max_total_mib is not None and total > max_total_mib * MIB:
        raise PackError(
            f"internal error: the pack is {_mib(total)}, over --max-total-mib {max_total_mib:g}; please report it"
        )
    return plan


def _totals(records: list[dict[str, Any]], parts: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    packed = [r for r in records if r["packed"]]
    data = sum(p["nbytes"] for p in parts)
    unfinished = sum(1 for r in packed if not r["finished"])
    waiting = len(records) - len(packed)
    summary = (
        f"packed {len(packed)} of {len(records)} runs ({unfinished} unfinished, {len(packed) - unfinished} finished) "
        f"into {out}: {len(parts) + 2} files, {_mib(data)} of data (the runs: {_mib(sum(r['nbytes'] for r in packed))} "
        f"from {_mib(sum(r['folder_nbytes'] for r in packed))} of run folders on disk)"
    )
    if waiting:
        summary += f"; {waiting} run{'s' if waiting > 1 else ''} wait{'' if waiting > 1 else 's'} (see {PLAN_MD})"
    if len(parts) + 2 > DEVICE_TOOL_FILES:
        summary += f"; note: {len(parts) + 2} files, more than the {DEVICE_TOOL_FILES} a device window returns"
    return {
        "data_nbytes": data,
        "files": len(parts) + 2,
        "runs": len(records),
        "packed": len(packed),
        "summary": summary,
    }
