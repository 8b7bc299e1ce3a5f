"""The one error of ``laperm pack`` / ``laperm unpack`` (its message is the one line the CLI prints)."""

from __future__ import annotations

from ..rundir import RunDirError

__all__ = ["PackError"]


class PackError(RunDirError):
    """Runs cannot be packed or unpacked as asked (bad input, no space in the limits, a newer run in the way)."""
