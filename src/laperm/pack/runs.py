"""One run folder as one package of bytes, and back.

What a package holds (the plan says it per run):

* every file of the run folder but the ones rebuilt or redrawn: config.yaml, metrics,
  summary, logs, vocab.json, ... (lzma-compressed together);
* init.pt -- as its recipe only, when (model, init, seed) rebuilds its state bit for bit, as
  ``laperm export`` does; its tensors otherwise;
* an unfinished run: the checkpoint ``laperm train --resume`` would continue from (the newest
  one that loads and verifies) and best.pt; older checkpoints stay behind, figures are redrawn
  when the run finishes;
* a finished run: final.pt and best.pt (``laperm verify`` works on the unpacked folder) when
  ``weights``; its checkpoints stay behind.

Each ``.pt`` file is encoded by :mod:`laperm.pack.tensors` and re-saved on unpack with
:func:`laperm.checkpoint.save` (a fresh checksum file): same torch version and device kind
give the same bytes.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, rundir
from ..export import codec
from ..export.fileformat import rebuild_theta0, run_recipe
from ..verify import layouts_of_record
from .errors import PackError
from .header import check_header
from .names import check_name
from .tensors import Blobs, Theta0, decode_object, encode_object, read_blob, same_object

__all__ = [
    "PackError",
    "RunInfo",
    "inspect_run",
    "encode_run",
    "encode_files",
    "decode_run",
    "write_run",
    "Position",
    "record_position",
    "run_position",
]

MAGIC = b"LAPERMPK"
VERSION = 1
_FIXED = len(MAGIC) + 1 + 8
# Never carried: the lock, checksum sidecars (re-made on unpack), temporaries, damaged files set aside.
_NEVER = (rundir.LOCK, ".write-test")


@dataclass
class RunInfo:
    """A run folder and what a package of it carries."""

    source: Path
    path: str  # recorded path (relative to its PATH argument's parent)
    finished: bool
    epochs: int | None
    epoch: int | None  # epochs completed (the checkpoint's, or all when finished)
    step: int | None
    checkpoint: Path | None  # the one to resume (unfinished runs)
    files: list[Path] = field(default_factory=list)  # small files, carried always
    weights: list[Path] = field(default_factory=list)  # .pt files
    left: list[str] = field(default_factory=list)  # what stays behind, and why
    folder_nbytes: int = 0  # every file of the run folder on disk

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        return "unfinished" if self.checkpoint is not None else "unfinished, no checkpoint (resume starts it afresh)"


def _skipped(rel: Path) -> bool:
    name = rel.name
    return name in _NEVER or name.endswith((".sha256", checkpoint.TMP_SUFFIX, ".corrupt")) or ".unpack-" in name


def inspect_run(source: Path, path: str) -> RunInfo:
    """What packing ``source`` carries: the files, the checkpoint to resume, progress."""
    cfg = rundir.read_run_config(source)
    finished = (source / rundir.SUMMARY).is_file()  # written last, after final.pt (results folders keep only it)
    skipped: list[str] = []
    found = None if finished else checkpoint.latest_good(source / rundir.CHECKPOINTS, warn=skipped.append)
    info = RunInfo(source, path, finished, cfg.get("epochs"), None, None, found[0] if found else None)
    info.left += [f"{m} (damaged)" for m in skipped]
    if found is not None:
        run = found[1].get("run", {}) if isinstance(found[1], dict) else {}
        info.epoch, info.step = run.get("epoch"), run.get("step")
    elif finished:
        records = rundir.read_metrics(source)
        info.epoch, info.step = info.epochs, records[-1].get("step") if records else None
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source)
        info.folder_nbytes += file.stat().st_size
        if _skipped(rel):
            continue
        try:
            check_name(rel.as_posix(), "file")
        except PackError:
            info.left.append(f"{rel} (a name unpack refuses: use letters, digits and _-.+=,@)")
            continue
        if rel.parts[0] == rundir.CHECKPOINTS and file != info.checkpoint:
            info.left.append(f"{rel} ({'finished run' if finished else 'older checkpoint'})")
        elif file.suffix == ".pt":
            info.weights.append(file)
        elif file.suffix == ".png" and not finished:
            info.left.append(f"{rel} (redrawn when the run finishes)")
        else:
            info.files.append(file)
    return info


@dataclass(frozen=True)
class Position:
    """How far a run got: finished, epochs planned, epochs done, step (-1: not known or no checkpoint)."""

    finished: bool
    epochs: int
    epoch: int
    step: int

    def __str__(self) -> str:
        where = "finished" if self.finished else "unfinished"
        return f"{where}, epoch {self.epoch} of {self.epochs}, step {self.step}"

    def further_than(self, other: Position) -> list[str]:
        """The ways this position got further than ``other`` (none: it may be replaced by ``other``).

        Finishing counts only against the same number of epochs: a run continued with more
        epochs (unfinished) is further than the finished shorter one, unless it is behind in steps."""
        ways = [k for k in ("epochs", "epoch", "step") if getattr(self, k) > getattr(other, k)]
        if self.finished and not other.finished and self.epochs == other.epochs:
            ways.append("finished")
        return ways


def _int(value: Any) -> int:
    return value if type(value) is int else -1


def record_position(record: dict[str, Any]) -> Position:
    """The position plan.json records for a packed run."""
    return Position(record.get("finished") is True, *(_int(record.get(k)) for k in ("epochs", "epoch", "step")))


def run_position(folder: Path) -> Position:
    """How far the run folder on disk got, read as :func:`inspect_run` reads it for plan.json (without
    loading a checkpoint: the newest checkpoint's step from its name, epochs done from metrics.jsonl)."""
    try:
        epochs = _int(rundir.read_run_config(folder).get("epochs"))
    except rundir.RunDirError:
        epochs = -1
    try:
        records = rundir.read_metrics(folder)
    except (OSError, ValueError):
        records = []
    if (folder / rundir.SUMMARY).is_file():
        return Position(True, epochs, epochs, _int(records[-1].get("step")) if records else -1)
    ckpts = checkpoint.list_checkpoints(folder / rundir.CHECKPOINTS)
    if not ckpts:
        return Position(False, epochs, -1, -1)
    step = int(ckpts[0].name.split("-")[1].split(".")[0])
    done = [
        int(r["epoch"]) for r in records if isinstance(r.get("epoch"), (int, float)) and _int(r.get("step")) <= step
    ]
    return Position(False, epochs, max(done, default=0), step)


# -- encoding ---------------------------------------------------------------------------------


def _theta0_of(info: RunInfo) -> tuple[Theta0 | None, dict[str, Any] | None, Any]:
    """``(θ0, its record for the header, init.pt's content)``: the recipe when it rebuilds init.pt exactly."""
    init_file = info.source / rundir.INIT
    if init_file not in info.weights:
        return None, None, None
    init = checkpoint.load(init_file)
    if not (isinstance(init, dict) and isinstance(init.get("state"), dict)):
        return None, None, init
    layouts = layouts_of_record(init) if init.get("permuted") else {}
    state = init["state"]
    recipe = run_recipe(info.source, rundir.read_run_config(info.source))
    try:
        rebuilt = rebuild_theta0(recipe)
    except checkpoint.CheckpointError:
        rebuilt = {}
    if list(rebuilt) == list(state) and same_object(dict(rebuilt), dict(state)):
        digest = codec.theta0_digest(state, list(state))
        record = {"recipe": recipe, "digest": digest, "layouts": init.get("permuted") or []}
        return Theta0(state, layouts), record, init
    # The recipe does not rebuild it (another torch, a model built differently): θ0 travels in init.pt.
    return Theta0(state, layouts), {"file": rundir.INIT, "layouts": init.get("permuted") or []}, init


def _small_files(blobs: Blobs, files: list[tuple[Path, str]]) -> list[dict[str, Any]]:
    """Entries of small files, compressed together in one blob (they are alike: configs, JSON lines)."""
    entries, chunks, start = [], [], 0
    for file, name in files:
        data = file.read_bytes()
        entries.append({"name": name, "kind": "file", "start": start, "size": len(data)})
        chunks.append(data)
        start += len(data)
    index = blobs.add(b"".join(chunks), "lzma")
    return [e | {"blob": index} for e in entries]


def _package(header: dict[str, Any], blobs: Blobs) -> bytes:
    meta, area = blobs.seal()
    header = {"format": "laperm-pack-run", "version": VERSION, "torch": torch.__version__, **header, "blobs": meta}
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack("<Q", len(head)) + head + area


def encode_files(files: list[tuple[Path, str]]) -> bytes:
    """A package of plain files (an experiment's records beside its runs), recorded under the given names."""
    blobs = Blobs()
    return _package({"path": "", "theta0": None, "files": _small_files(blobs, files)}, blobs)


def _encode_pt(file: Path, rel: str, obj: Any, theta0: Theta0 | None, blobs: Blobs) -> dict[str, Any]:
    skeleton, entries = encode_object(obj, theta0, blobs)
    buf = io.BytesIO()
    torch.save(skeleton, buf)
    return {"name": rel, "kind": "torch", "skeleton": blobs.add(buf.getvalue(), "lzma"), "tensors": entries}


def encode_run(info: RunInfo, weights: bool = True) -> tuple[bytes, dict[str, int]]:
    """The package of run ``info`` (``weights=False``: its small files only); and tensor counts per encoding."""
    blobs = Blobs()
    files = _small_files(blobs, [(f, str(f.relative_to(info.source))) for f in info.files])
    theta0, record, init = _theta0_of(info) if weights else (None, None, None)
    counts: dict[str, int] = {}
    originals: dict[str, Any] = {}
    if weights:
        # init.pt first: when θ0 travels in it, unpack decodes it before everything else.
        for file in sorted(info.weights, key=lambda p: p.name != rundir.INIT):
            rel = str(file.relative_to(info.source))
            obj = originals[rel] = init if file.name == rundir.INIT and init is not None else checkpoint.load(file)
            use = None if (file.name == rundir.INIT and record and "file" in record) else theta0
            entry = _encode_pt(file, rel, obj, use, blobs)
            for t in entry["tensors"]:
                counts[t["enc"]] = counts.get(t["enc"], 0) + 1
            files.append(entry)
    recipe = run_recipe(info.source, rundir.read_run_config(info.source)) if weights else None
    package = _package({"path": info.path, "recipe": recipe, "theta0": record, "files": files}, blobs)
    rebuilt = record is not None and "recipe" in record
    _check_round_trip(package, info, originals, init["state"] if rebuilt and init is not None else None)
    return package, counts


def _check_round_trip(package: bytes, info: RunInfo, originals: dict[str, Any], theta0: Any) -> None:
    """Decode the package again and compare every file with its source, so a pack that succeeds unpacks exactly."""
    for rel, content in decode_run(package, theta0_state=theta0).items():
        source = info.source / rel
        same = same_object(content, originals[rel]) if rel in originals else content == source.read_bytes()
        if not same:
            raise PackError(
                f"internal error: {source} does not come back exactly from its packed form; please report it"
            )


# -- decoding ---------------------------------------------------------------------------------


def parse_package(package: bytes, where: str) -> tuple[dict[str, Any], memoryview]:
    if len(package) < _FIXED or not package.startswith(MAGIC):
        raise PackError(f"{where} is not a packed run (made by `laperm pack`)")
    if package[len(MAGIC)] != VERSION:
        raise PackError(f"{where} is pack format {package[len(MAGIC)]}; this laperm reads {VERSION}: upgrade laperm")
    (n,) = struct.unpack("<Q", package[len(MAGIC) + 1 : _FIXED])
    try:
        header = json.loads(package[_FIXED : _FIXED + n].decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise PackError(f"{where} has an unreadable header ({e})") from None
    return header, memoryview(package)[_FIXED + n :]


def _theta0_for(header: dict[str, Any], theta0_state: dict[str, Any] | None, where: str) -> Theta0 | None:
    record = header.get("theta0")
    if not record or "recipe" not in record:
        return None
    state = theta0_state if theta0_state is not None else rebuild_theta0(record["recipe"])
    if codec.theta0_digest(state, list(state)) != record["digest"]:
        raise PackError(
            f"{where}: this machine rebuilds a different θ0 from the recipe {record['recipe']} (packed with "
            f"torch {header.get('torch')}, this is {torch.__version__}); unpack with the torch version that packed it"
        )
    return Theta0(state, layouts_of_record({"permuted": record["layouts"]}))


def decode_run(package: bytes, where: str = "package", theta0_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{relative file name: bytes (small files) or the loaded object (.pt files)}`` of a package."""
    header, area = parse_package(package, where)
    check_header(header, len(area), where)  # names, recipe and every declared size, before any decoding
    cache: dict[int, bytes] = {}

    def blob(i: int) -> bytes:
        if i not in cache:
            cache[i] = read_blob(header["blobs"], area, i)
        return cache[i]

    try:
        theta0 = _theta0_for(header, theta0_state, where)
        out: dict[str, Any] = {}
        for f in header["files"]:
            if f["kind"] == "file":
                out[f["name"]] = blob(int(f["blob"]))[int(f["start"]) : int(f["start"]) + int(f["size"])]
                continue
            skeleton = torch.load(io.BytesIO(blob(int(f["skeleton"]))), weights_only=True)
            out[f["name"]] = decode_object(skeleton, f["tensors"], theta0, blob)
            if f["name"] == rundir.INIT and theta0 is None and (header.get("theta0") or {}).get("file"):
                init = out[f["name"]]
                theta0 = Theta0(init["state"], layouts_of_record({"permuted": header["theta0"]["layouts"]}))
        return out
    except PackError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a forged package provokes (a bad pickle, a bad layout)
        raise PackError(f"{where} is damaged or inconsistent ({type(e).__name__}: {str(e)[:300]})") from None


def write_run(contents: dict[str, Any], folder: Path) -> None:
    """Write decoded files into a new folder (``.pt`` files with their checksum sidecars)."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(not isinstance(c, bytes) for c in contents.values()):  # a run with weights: as training makes it
        (folder / rundir.CHECKPOINTS).mkdir(exist_ok=True)
    for rel, content in contents.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            checkpoint.atomic_write_bytes(target, content)
        else:
            checkpoint.save(content, target)
