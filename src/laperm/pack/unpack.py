"""``laperm unpack``: a pack from elsewhere, checked whole, then restored under ``--into``.

A pack is data, never paths or sizes to obey. In order:

1. plan.json: its part files (``data-NNN.bin`` in order, no symlinks, sizes and sha256), every run
   path and file name (:mod:`.names`), the runs' positions;
2. every package: its header (names, recipe, declared sizes: :mod:`.header`) and that it is the one
   plan.json says (its run path);
3. where each run goes: inside ``--into``, no symlink or file on the way; a folder there that got
   further (:meth:`~.runs.Position.further_than`) is kept unless ``--force``, and a folder that is not a
   run folder is never replaced;

and only then is anything written: every package is decoded into a staging folder inside
``--into`` (checked against plan.json once more), and moved into place when all of them decoded.
Whatever fails before that removes the staging folder (and ``--into`` itself, if unpack made it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .. import rundir
from .errors import PackError
from .header import check_header
from .names import STAGING, check_disjoint, check_name, check_part_names, target
from .runs import decode_run, parse_package, record_position, run_position, write_run

__all__ = ["unpack", "PLAN_JSON", "FORMAT", "VERSION"]

PLAN_JSON = "plan.json"
FORMAT = "laperm-pack"
VERSION = 1
PLAN_MAX = 64 << 20  # bytes of plan.json (one line per run and file: a few KiB per run)
CHUNK = 1 << 20
_CKPT = re.compile(r"ckpt-(\d{1,18})\.pt")  # as laperm.checkpoint names them
Read = Callable[[int, int], bytes]


def _user_path(value: str | Path, what: str) -> Path:
    """A path the user gave, usable (no NUL byte, statable), or one line saying why not."""
    try:
        path = Path(value)
        if "\0" in str(path):
            raise ValueError("it holds a NUL byte")
        os.stat(path) if path.exists() else None
    except (ValueError, OSError) as e:
        raise PackError(f"{what} {str(value)[:100]!r} is not a usable path ({e})") from None
    return path


def _read_plan(src: Path) -> dict[str, Any]:
    file = src / PLAN_JSON
    if file.is_symlink() or not file.is_file():
        what = "is a symlink" if file.is_symlink() else f"is not a pack folder (no {PLAN_JSON})"
        raise PackError(f"{src if not file.is_symlink() else file} {what}; pass the --out folder of `laperm pack`")
    if file.stat().st_size > PLAN_MAX:
        raise PackError(f"{file} is {file.stat().st_size:,} bytes, more than a plan holds; the pack is damaged")
    try:
        plan = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise PackError(f"{file} is damaged ({str(e)[:200]}); pack again") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise PackError(f"{file} is not a laperm pack plan")
    if plan.get("version") != VERSION:
        raise PackError(f"{file} is pack format {plan.get('version')!r}; this laperm reads {VERSION}: upgrade laperm")
    return plan


def _check_span(record: Any, total: int, what: str) -> None:
    ok = isinstance(record, dict) and isinstance(record.get("sha256"), str)
    ok = ok and all(type(record.get(k)) is int and record[k] >= 0 for k in ("offset", "nbytes"))
    if not ok or record["offset"] + record["nbytes"] > total:
        raise PackError(f"plan.json places {what} outside its part files; the pack is damaged or forged")


def _check_runs(plan: dict[str, Any], total: int) -> list[dict[str, Any]]:
    """The packed runs' records, each with a checked path, span and position fields."""
    runs = plan.get("runs")
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise PackError("plan.json lists no runs; the pack is damaged or forged")
    if not all(isinstance(r.get("packed"), bool) for r in runs):
        raise PackError(
            "plan.json says of a run neither that it is packed nor that it is not; the pack is damaged or forged"
        )
    packed = [r for r in runs if r["packed"]]
    for r in packed:
        path = check_name(r.get("path"), "the run folder")
        _check_span(r, total, path)
        fields = [r.get(k) for k in ("epochs", "epoch", "step")]
        if not all(v is None or type(v) is int for v in fields) or not isinstance(r.get("finished"), bool):
            raise PackError(f"plan.json records no valid position for {path}; the pack is damaged or forged")
        ckpt = r.get("checkpoint")
        found = _CKPT.fullmatch(ckpt) if isinstance(ckpt, str) else None
        if ckpt is not None and (found is None or int(found.group(1)) != r.get("step")):
            raise PackError(f"plan.json names checkpoint {str(ckpt)[:60]!r} for {path} at step {r.get('step')!r}")
    extras: dict[str, Any] = plan.get("extras")  # type: ignore[assignment]  # (checked next)
    _check_span(extras, total, "the non-run files")
    files = extras.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("mtime"), float | int) for f in files
    ):
        raise PackError("plan.json lists the non-run files without their times; the pack is damaged or forged")
    names = [check_name(f.get("path"), "the file") for f in files]
    check_disjoint([*names, *(r["path"] for r in packed)], "plan.json")
    _check_tiling([extras, *packed], total)
    return packed


def _check_tiling(records: list[dict[str, Any]], total: int) -> None:
    """The packages lie one after another and fill the part files (as ``laperm pack`` writes them): no
    overlap, and no bytes that no record accounts for (a package the plan was edited to hide)."""
    end = 0
    for offset, nbytes in sorted((r["offset"], r["nbytes"]) for r in records):
        if offset != end:
            raise PackError(
                "plan.json's packages overlap or leave a gap in the part files; the pack is damaged or forged"
            )
        end = offset + nbytes
    if end != total:
        raise PackError(
            f"the part files hold {total - end} bytes that plan.json does not account for; the pack is damaged or forged"
        )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_stream(src: Path, parts: list[dict[str, Any]]) -> tuple[Read, int]:
    """Check every part (a plain file, its size and sha256); returns ``read(offset, nbytes)`` and the total."""
    starts, offset = [], 0
    for p in parts:
        file = src / p["name"]
        if file.is_symlink() or not file.is_file():
            why = "is a symlink (a pack holds plain files)" if file.is_symlink() else "is missing"
            raise PackError(f"{file} {why}; copy every file of the pack folder")
        if file.stat().st_size != p["nbytes"] or _sha256(file) != p["sha256"]:
            raise PackError(
                f"{file} is damaged or truncated (its size or sha256 differs from {PLAN_JSON}); copy it again"
            )
        starts.append(offset)
        offset += p["nbytes"]

    def read(start: int, nbytes: int) -> bytes:
        chunks = []
        for p, a in zip(parts, starts, strict=True):
            lo, hi = max(start, a), min(start + nbytes, a + p["nbytes"])
            if lo < hi:
                with open(src / p["name"], "rb") as f:
                    f.seek(lo - a)
                    chunks.append(f.read(hi - lo))
        return b"".join(chunks)

    return read, offset


def _package(read: Read, record: dict[str, Any], what: str) -> bytes:
    data = read(record["offset"], record["nbytes"])
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise PackError(f"the packed bytes of {what} are damaged (sha256 mismatch); pack again")
    return data


def _check_package(read: Read, record: dict[str, Any], path: str, what: str) -> None:
    """The package is the one plan.json says, and its header passes :func:`check_header`."""
    header, area = parse_package(_package(read, record, what), what)
    if not isinstance(header, dict) or header.get("path") != path:
        shown = str(header.get("path"))[:80] if isinstance(header, dict) else "?"
        raise PackError(f"plan.json says {what} is at {path!r} but its package says {shown!r}; the pack is forged")
    check_header(header, len(area), what)


def _blocker(here: Path, record: dict[str, Any], force: bool) -> str | None:
    """Why the packed run may not replace ``here`` (None: it may), or "same" to keep a folder that has more."""
    if not here.exists():
        return None
    if not here.is_dir():
        return f"{here} exists and is not a folder (move it away)"
    if (here / rundir.LOCK).is_file():
        try:
            with rundir.locked(here):
                pass
        except rundir.RunDirError:
            return f"{here} is in use by a laperm process"
    if not (here / rundir.MARKER).is_file():
        if any(here.iterdir()):
            return f"{here} exists and is not a run folder; unpack never replaces it, even with --force: move it"
        return None
    mine, packed = run_position(here), record_position(record)
    further = mine.further_than(packed)
    if further and not force:
        return (
            f"{here} is newer: it got further ({', '.join(further)}) than the packed run "
            f"(here: {mine}; packed: {packed}); pass --force to replace it anyway"
        )
    if mine.finished and packed.finished and not record["weights"] and (here / rundir.FINAL).is_file():
        return "same"
    return None


def _matches_record(contents: dict[str, Any], record: dict[str, Any]) -> None:
    """A decoded run agrees with plan.json's record of it (the plan decides what replaces what)."""
    path = record["path"]
    try:
        config = yaml.safe_load(contents[rundir.MARKER]) if isinstance(contents.get(rundir.MARKER), bytes) else None
    except yaml.YAMLError:
        config = None
    problems = []
    if not isinstance(config, dict):
        problems.append(f"no readable {rundir.MARKER}")
    elif config.get("epochs") != record.get("epochs"):
        problems.append(f"{config.get('epochs')!r} epochs, not {record.get('epochs')!r}")
    if (rundir.SUMMARY in contents) != record["finished"]:
        problems.append("finished" if rundir.SUMMARY in contents else "not finished")
    if record.get("checkpoint") and f"{rundir.CHECKPOINTS}/{record['checkpoint']}" not in contents:
        problems.append(f"no {record['checkpoint']}")
    if problems:
        raise PackError(f"plan.json contradicts the package of {path} ({'; '.join(problems)}); the pack is forged")


def _made_root(root: Path) -> Path | None:
    """The topmost folder of ``root`` that does not exist yet (unpack removes it again on failure)."""
    if root.exists():
        if not root.is_dir():
            raise PackError(f"--into {root} is a file; choose a folder")
        return None
    top = root
    while not top.parent.exists():
        top = top.parent
    if not top.parent.is_dir():
        raise PackError(f"--into {root}: {top.parent} is a file; choose a folder")
    return top


def _remove_stale_staging(root: Path) -> None:
    """Staging folders that a killed unpack left (its process is gone)."""
    for folder in root.glob(f"{STAGING}*"):
        pid = folder.name.removeprefix(STAGING)
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _stage(plan: dict[str, Any], read: Read, todo: list[tuple[dict[str, Any], Path]], staging: Path, log) -> list[Path]:
    """Decode the non-run files and each run into ``staging``; returns the staged run folders."""
    extras = decode_run(_package(read, plan["extras"], "the non-run files"), "the non-run files")
    listed = {f["path"] for f in plan["extras"]["files"]}
    if set(extras) != listed:
        raise PackError("plan.json lists other non-run files than its package holds; the pack is forged")
    write_run(extras, staging / "extras")
    staged = []
    for i, (record, _) in enumerate(todo):
        log(f"restoring {record['path']}")
        contents = decode_run(_package(read, record, record["path"]), record["path"])
        _matches_record(contents, record)
        write_run(contents, staging / "runs" / str(i))
        staged.append(staging / "runs" / str(i))
    return staged


def _commit_extras(plan: dict[str, Any], root: Path, staging: Path, force: bool) -> list[str]:
    """Move the staged non-run files into place; an existing newer, different file is kept unless ``force``."""
    kept = []
    for f in plan["extras"]["files"]:
        name, new = f["path"], staging / "extras" / f["path"]
        here = target(root, name, "the file")
        data = new.read_bytes()
        if here.is_file() and here.read_bytes() != data and here.stat().st_mtime > f["mtime"] and not force:
            kept.append(name)
            continue
        if here.is_dir():
            raise PackError(f"{here} is a folder where the pack has a file; move it or unpack elsewhere")
        here.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, here)
    return kept


def _swap_in(staged: Path, here: Path, staging: Path) -> None:
    """Replace ``here`` by ``staged`` (the old folder goes into ``staging``, removed with it)."""
    here.parent.mkdir(parents=True, exist_ok=True)
    if here.exists():
        os.replace(here, staging / f"old-{staged.name}")
    os.replace(staged, here)


def _plan_targets(plan: dict[str, Any], root: Path, force: bool) -> tuple[list[Any], dict[str, Any]]:
    """The runs to restore ``[(record, target)]``, and the result so far (refused and kept runs)."""
    result: dict[str, Any] = {"restored": [], "refused": [], "kept": []}
    todo = []
    for record in plan["runs"]:
        if record.get("packed") is not True:
            continue
        here = target(root, record["path"], "the run folder")
        blocker = _blocker(here, record, force)
        if blocker == "same":
            result["kept"].append(record["path"])
        elif blocker is not None:
            result["refused"].append(blocker)
        else:
            todo.append((record, here))
    for f in plan["extras"]["files"]:
        target(root, f["path"], "the file")
    return todo, result


def unpack(
    src: str | Path, into: str | Path = ".", force: bool = False, log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Restore the packed runs under ``into`` at their recorded paths; returns what was restored, kept and refused.

    Everything is checked before anything is written (the module's doc). A run folder that got
    further is refused unless ``force``; raises :class:`PackError` naming the refused runs after
    restoring the others.
    """
    src, root = _user_path(src, "DIR"), _user_path(into, "--into")
    plan = _read_plan(src)
    read, total = _read_stream(src, check_part_names(plan.get("parts")))
    for record in _check_runs(plan, total):
        _check_package(read, record, record["path"], record["path"])
    _check_package(read, plan["extras"], "", "the non-run files")
    made = _made_root(root)
    todo, result = _plan_targets(plan, root, force)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    staging = root / f"{STAGING}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staged = _stage(plan, read, todo, staging, log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    try:
        result["kept"] += _commit_extras(plan, root, staging, force)
        for (record, here), folder in zip(todo, staged, strict=True):
            _swap_in(folder, here, staging)
            result["restored"].append(record["path"])
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    if result["refused"]:
        raise PackError(f"restored {len(result['restored'])} run(s) but not: {'; '.join(result['refused'])}")
    return result
