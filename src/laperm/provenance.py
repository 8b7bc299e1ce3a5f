"""Where each stretch of a run's training happened: ``<run folder>/provenance.jsonl``.

Every start and every resume of a run appends one JSON line, before its first step::

    {"time": "2026-12-05T10:00:00Z", "event": "start", "step": 0, "device": "cuda",
     "hardware": "NVIDIA H100 80GB HBM3 (CUDA 13.0)", "torch": "2.13.0+cu130", "commit": "abc1234"}

``event`` is ``start`` or ``resume``; ``step`` the step it starts from (the stretch runs until the
next line's step, or the end); ``commit`` is ``$LAPERM_COMMIT`` when set (a GPU window sets it),
else the laperm source checkout's ``git rev-parse --short HEAD``, else null (not recorded). The file
travels with the run (``laperm pack``), so a run moved between machines keeps every stretch.
:func:`describe` turns it into the report's "device, torch, commit" text.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["PROVENANCE", "COMMIT_ENV", "commit", "record", "read", "describe"]

PROVENANCE = "provenance.jsonl"
COMMIT_ENV = "LAPERM_COMMIT"


@cache
def _git_commit() -> str | None:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (found.stdout.strip() or None) if found.returncode == 0 else None


def commit() -> str | None:
    """The code's commit: ``$LAPERM_COMMIT``, else the source checkout's, else None."""
    return os.environ.get(COMMIT_ENV) or _git_commit()


def record(run_dir: Path, *, step: int, device: torch.device, hardware: str) -> dict[str, Any]:
    """Append this stretch of training's line to ``run_dir/provenance.jsonl`` (start at ``step``)."""
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": "resume" if step > 0 else "start",
        "step": step,
        "device": device.type,
        "hardware": hardware,
        "torch": torch.__version__,
        "commit": commit(),
    }
    with open(Path(run_dir) / PROVENANCE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return line


def read(run_dir: Path) -> list[dict[str, Any]]:
    """The run's stretches, oldest first ([] when none was recorded; damaged lines are skipped)."""
    file = Path(run_dir) / PROVENANCE
    if not file.is_file():
        return []
    out = []
    for text in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def describe(stretches: list[dict[str, Any]]) -> str | None:
    """``"<hardware>, torch <v>, <commit>"`` per distinct place, with the step each began at; None if none."""
    places: list[tuple[str, int]] = []
    for s in stretches:
        text = ", ".join(
            [
                str(s.get("hardware") or s.get("device") or "device not recorded"),
                f"torch {s['torch']}" if s.get("torch") else "torch not recorded",
                str(s.get("commit") or "commit not recorded"),
            ]
        )
        if places and places[-1][0] == text:
            continue
        places.append((text, int(s.get("step") or 0)))
    if not places:
        return None
    if len(places) == 1:
        return places[0][0]
    return "; ".join(f"{text} (from step {step})" for text, step in places)
