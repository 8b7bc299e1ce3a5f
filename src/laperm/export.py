"""Compact checkpoints of LaPerm-trained networks: ``laperm export``."""

from __future__ import annotations

import argparse
from typing import Callable


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add this module's subcommands to ``sub``; return {command: handler}."""
    return {}
