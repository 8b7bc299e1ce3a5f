"""What a language-model run adds to an image run: ``vocab.json``, bits per character, a sample.

Kept apart from the loop: the :class:`~laperm.engine.trainer.Trainer` is the same for both; a
text run differs in its loaders (:func:`laperm.build.build_text_loaders`) and in what it reports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .. import rundir
from ..config import ConfigError
from ..data import text as textdata

__all__ = ["record_vocab", "add_bits_per_char", "text_summary"]


def record_vocab(run_dir: Path, vocab: list[str], resume: bool, write: bool) -> None:
    """Write the run's ``vocab.json`` (``write``: rank 0); on resume first check the corpus gives the same."""
    path = run_dir / rundir.VOCAB
    if resume and path.is_file() and textdata.read_vocab(path) != vocab:
        raise ConfigError(
            f"the corpus now gives another vocabulary than {path} records; resume with the "
            "run's --data-dir (or start a new run)"
        )
    if write:
        textdata.write_vocab(path, vocab)


def add_bits_per_char(record: dict[str, Any]) -> None:
    """``val_bpc``/``test_bpc``: a language model's evaluation losses (nats) in bits per character."""
    for split in ("val", "test"):
        if f"{split}_loss" in record:
            record[f"{split}_bpc"] = textdata.bits_per_char(record[f"{split}_loss"])


def text_summary(
    model: nn.Module,
    vocab: list[str],
    seed: int,
    val_loss: float | None,
    test_loss: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """summary.json's text keys: the final model's bits per character and a seeded sample (also logged)."""
    sample = textdata.sample_text(
        model, vocab, textdata.SAMPLE_PROMPT, 200, temperature=textdata.SAMPLE_TEMPERATURE, seed=seed
    )
    log(f"sample (temperature {textdata.SAMPLE_TEMPERATURE}, seed {seed}, final synced model): {sample!r}")
    return {
        "final_val_bpc": textdata.bits_per_char(val_loss) if val_loss is not None else None,
        "final_test_bpc": textdata.bits_per_char(test_loss),
        "sample": sample,
    }
