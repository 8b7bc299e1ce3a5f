"""Checksum helpers shared by the dataset readers."""

from __future__ import annotations

import hashlib
from pathlib import Path


def read_sha256sums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum``-style file into ``{filename: hexdigest}``."""
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB blocks so big archives need little memory."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
