"""Names from a pack are data, never paths: each is checked before anything touches the disk.

A name (a part file, a run folder, a file in a run folder or beside the runs) is accepted only when

* it is a string of ``/``-separated parts, relative, with no empty, ``.`` or ``..`` part;
* every part is a plain file name: letters, digits and ``_ - . + = , @`` (no ``\\``, ``:``, NUL,
  spaces), not starting with ``.`` (laperm's own locks, temporaries and staging folders do), at most
  255 characters;
* it has the form ``laperm pack`` writes (part files ``data-NNN.bin`` in order; ``.pt`` files for
  tensors);

and its place under ``--into`` is checked on disk too (:func:`target`): it resolves inside ``--into``
and no existing part of the way is a symlink or a file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .errors import PackError

__all__ = ["check_name", "check_part_names", "check_disjoint", "target", "is_staging"]

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,@-]{0,254}")
MAX_DEPTH = 16
STAGING = ".laperm-unpack-"  # the folder under --into where unpack builds everything before moving it in


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 120 else text[:120] + "..."


def check_name(name: object, what: str) -> str:
    """``name`` if it is a safe relative name (see the module's doc); else a :class:`PackError` naming it."""
    if not isinstance(name, str) or not name:
        raise PackError(f"{what} has the name {_shown(name)}, not a relative path; the pack is damaged or forged")
    parts = name.split("/")
    bad = next((p for p in parts if p in ("", ".", "..") or not _PART.fullmatch(p)), None)
    if bad is not None or len(parts) > MAX_DEPTH:
        reason = "is absolute" if name.startswith("/") else f"has the part {_shown(bad)}" if bad is not None else ""
        raise PackError(
            f"{what} {_shown(name)} {reason or 'is too deep'}: a pack names only plain relative paths "
            "(parts of letters, digits and _-.+=,@; no '..', no leading '/' or '.')"
        )
    return name


def check_part_names(parts: object) -> list[dict[str, object]]:
    """plan.json's ``parts``: ``data-000.bin``, ``data-001.bin``, ... in order, each with its size and sha256."""
    if not isinstance(parts, list) or not parts:
        raise PackError("plan.json lists no part files; the pack is damaged or forged")
    for i, p in enumerate(parts):
        expected = f"data-{i:03d}.bin"
        if not isinstance(p, dict) or p.get("name") != expected:
            name = p.get("name") if isinstance(p, dict) else p
            raise PackError(f"plan.json names part {i} {_shown(name)}, expected {expected}; the pack is forged")
        if type(p.get("nbytes")) is not int or p["nbytes"] < 0 or not isinstance(p.get("sha256"), str):
            raise PackError(f"plan.json gives {expected} no valid size and sha256; the pack is damaged")
    return parts


def check_disjoint(names: Iterable[str], what: str) -> None:
    """No name twice, and none inside another (a file where a folder must be, a run inside a run)."""
    seen: set[str] = set()
    for name in sorted(names):
        parents = {"/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)}
        clash = next((p for p in (name, *parents) if p in seen), None)
        if clash is not None:
            raise PackError(f"{what}: {_shown(name)} clashes with {_shown(clash)}; the pack is damaged or forged")
        seen.add(name)


def target(root: Path, name: str, what: str) -> Path:
    """Where ``name`` goes under ``root``, after checking the way there on disk.

    Every existing step below ``root`` must be a real folder (the last one may be a file or folder
    that is replaced), none a symlink, and the whole path must resolve inside ``root``."""
    path = root
    parts = check_name(name, what).split("/")
    for i, part in enumerate(parts):
        path = path / part
        if path.is_symlink():
            raise PackError(f"{path} is a symlink; unpack never follows or replaces one: remove it or unpack elsewhere")
        if i < len(parts) - 1 and path.exists() and not path.is_dir():
            raise PackError(f"{path} is a file where {what} {name} needs a folder; move it or unpack elsewhere")
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise PackError(f"{what} {_shown(name)} resolves outside --into {root}; refusing it")
    return path


def is_staging(name: str) -> bool:
    return name.startswith(STAGING)
