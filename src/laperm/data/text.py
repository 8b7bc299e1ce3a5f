"""Character-level text data: corpus, vocabulary, contiguous splits and window loaders.

Corpus (``--dataset text``):

* default (no ``--data-dir``): the English prose of the Python Language Reference that every
  CPython ships offline in ``pydoc_data.topics`` (the ``topics`` dict; PSF License). The
  text is the dict's values joined by a blank line in sorted key order, so it is the same
  on every machine with the same Python minor version (3.11: 79 topics, 465,126 characters,
  103 distinct ones).
* ``--data-dir FILE``: that UTF-8 file. ``--data-dir FOLDER``: every regular file below it,
  recursively, in sorted path order, joined by a blank line; hidden files and folders (names
  starting with ``.``, e.g. ``.git``) are skipped, and so are files that are not UTF-8 text
  (undecodable, or holding NUL bytes: images, archives, compiled files), since a folder of
  documents often holds a few of those. A single FILE that is not text is an error.
  ``\\r\\n`` and ``\\r`` become ``\\n``.

Splits: the first 90% of the characters train, the next 5% validate, the last 5% test
(contiguous blocks, so no window straddles two splits and the test text is unseen prose).

Vocabulary: the distinct characters of the *training* split, sorted, after id 0 = ``<unk>``.
Characters first seen in validation or test map to ``<unk>`` (the model cannot know them, so
counting them as one unknown symbol is the honest measure); it is stored as ``vocab.json`` in
the run folder, and a resumed run checks it gets the same one.

Windows: training batches are ``batch`` windows of ``context + 1`` characters at start offsets
drawn uniformly from a generator seeded by ``(seed, epoch, batch index)``, so any batch can be
recomputed exactly from the loader's position (epoch, batch) -- which is what the checkpoint
keeps -- and a resumed run sees bit-identical batches. An epoch is ``train_chars // (batch *
context)`` batches. Evaluation uses the fixed, non-overlapping windows tiling a split.

Batches are ``(x, y)``: ``x`` ``(batch, context)`` int64 ids, ``y`` the ``batch * context``
next-character ids flattened, matching :class:`laperm.models.CharGPT`'s flattened logits.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .loader import derive_seed

__all__ = [
    "TEXT_DATASETS",
    "TextCorpus",
    "UNK",
    "WindowLoader",
    "EvalWindows",
    "bits_per_char",
    "build_vocab",
    "decode",
    "default_corpus_text",
    "encode",
    "load_text",
    "load_text_corpus",
    "read_vocab",
    "split_text",
    "write_vocab",
]

TEXT_DATASETS = ("text",)
UNK = "<unk>"
SPLITS = (0.9, 0.05, 0.05)
SAMPLE_PROMPT = "The "  # the start of the sample printed at the end of a run
# Its temperature: greedy decoding of a small model soon repeats itself (on the default corpus it
# settles into runs of indentation spaces), a seeded sample at 0.8 shows what it learnt.
SAMPLE_TEMPERATURE = 0.8


def bits_per_char(loss_nats: float) -> float:
    """Mean cross-entropy in nats per character -> bits per character (divide by ln 2)."""
    return loss_nats / math.log(2)


def default_corpus_text() -> str:
    """The Python Language Reference prose of ``pydoc_data.topics`` (PSF License), sorted by topic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _decode_file(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (undecodable or holding NUL bytes)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, or of every text file below a folder (see the module docstring)."""
    root = Path(path)
    if root.is_file():
        text = _decode_file(root)
        if text is None:
            raise DataError(
                f"{root} is not UTF-8 text (binary or another encoding); pass a UTF-8 text file "
                "or a folder of them as --data-dir"
            )
        parts = [text]
    elif root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        parts = [t for t in map(_decode_file, files) if t is not None]
        if not parts:
            raise DataError(
                f"{root} holds no UTF-8 text files ({len(files)} files, none of them text); "
                "pass a folder of text files as --data-dir"
            )
    else:
        raise DataError(f"text corpus {root} does not exist; pass a UTF-8 text file or folder as --data-dir")
    text = "\n\n".join(parts).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DataError(f"text corpus {root} is empty; pass a file or folder with some text as --data-dir")
    return text


def split_text(text: str, fractions: tuple[float, float, float] = SPLITS) -> tuple[str, str, str]:
    """Contiguous train / validation / test blocks of ``text``."""
    n = len(text)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return text[:a], text[a:b], text[b:]


def build_vocab(train_text: str) -> list[str]:
    """``[UNK, *sorted distinct characters of train_text]``: id 0 is the unknown character."""
    return [UNK, *sorted(set(train_text))]


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """int64 ids of ``text``'s characters (unknown ones -> 0)."""
    index = {c: i for i, c in enumerate(vocab) if i > 0}
    return torch.tensor([index.get(c, 0) for c in text], dtype=torch.int64)


def decode(ids: torch.Tensor | list[int], vocab: list[str]) -> str:
    """Text of ``ids`` (the unknown id shows as U+FFFD)."""
    return "".join("\ufffd" if i == 0 else vocab[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))


def write_vocab(path: Path, vocab: list[str]) -> None:
    from ..checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps({"unk": 0, "chars": vocab}, ensure_ascii=False) + "\n")


def read_vocab(path: Path) -> list[str]:
    return list(json.loads(Path(path).read_text(encoding="utf-8"))["chars"])


@dataclass(eq=False)
class TextCorpus:
    """A character corpus split into id tensors, with its vocabulary."""

    name: str
    vocab: list[str]
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    unknown: int  # validation + test characters outside the training vocabulary

    def __repr__(self) -> str:
        return (
            f"TextCorpus(name={self.name!r}, vocab={len(self.vocab)}, train={len(self.train):,}, "
            f"val={len(self.val):,}, test={len(self.test):,})"
        )


def load_text_corpus(data_dir: str | os.PathLike | None = None) -> TextCorpus:
    """The corpus at ``data_dir`` (default: the Python reference prose), split and encoded."""
    if data_dir is None:
        text, name = default_corpus_text(), "text:python-reference"
    else:
        text, name = load_text(data_dir), f"text:{Path(data_dir).name}"
    train, val, test = split_text(text)
    vocab = build_vocab(train)
    ids = [encode(t, vocab) for t in (train, val, test)]
    unknown = int((ids[1] == 0).sum() + (ids[2] == 0).sum())
    return TextCorpus(name, vocab, train=ids[0], val=ids[1], test=ids[2], unknown=unknown)


def check_length(corpus: TextCorpus, context: int) -> None:
    """Every split must hold at least one window of ``context + 1`` characters."""
    need = context + 1
    short = [
        (n, len(t))
        for n, t in (("train", corpus.train), ("validation", corpus.val), ("test", corpus.test))
        if len(t) < need
    ]
    if short:
        total = len(corpus.train) + len(corpus.val) + len(corpus.test)
        raise DataError(
            f"text corpus {corpus.name} is too short: {total:,} characters leave "
            + ", ".join(f"{n} {k:,}" for n, k in short)
            + f", but each split (90/5/5%) needs a window of {need} characters; use at least "
            f"{math.ceil(need / min(SPLITS)):,} characters of text"
        )


class WindowLoader:
    """Training batches of random windows, reproducible from (seed, epoch, batch); resumable.

    The same interface as :class:`laperm.data.BatchLoader` (iteration = one epoch,
    ``set_epoch``, ``state_dict``/``load_state_dict``, ``global_batch_size``, ``shard``).
    """

    def __init__(
        self,
        ids: torch.Tensor,
        context: int,
        batch_size: int,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if len(ids) < context + 1:
            raise ValueError(f"{len(ids)} characters hold no window of {context + 1}")
        self.ids, self.context, self.batch_size, self.seed = ids, context, batch_size, seed
        self.device, self.shard = torch.device(device), shard
        self.n = len(ids)
        self.epoch, self._batch = 0, 0
        self._resume: int | None = None  # start batch set by load_state_dict

    def __len__(self) -> int:
        return max(1, self.n // (self.batch_size * self.context))

    def starts(self, epoch: int, index: int) -> torch.Tensor:
        """Start offsets of batch ``index`` of ``epoch``."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        return torch.randint(0, self.n - self.context, (self.batch_size,), generator=g)

    def make_batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.ids[starts.unsqueeze(1) + torch.arange(self.context + 1)].to(self.device)
        return windows[:, :-1], windows[:, 1:].reshape(-1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._resume or 0
        self._resume, self._batch = None, start
        rank, world = self.shard
        for i in range(start, len(self)):
            starts = self.starts(epoch, i)
            self._batch = i + 1  # counted before yielding: a checkpoint in the loop body has consumed it
            yield self.make_batch(starts[rank::world])
        self.epoch, self._batch = epoch + 1, 0

    def global_batch_size(self, index: int) -> int:
        """Predicted characters per step across all shards (the unit of the loss average)."""
        return self.batch_size * self.context

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and epoch == self.epoch:
            return
        self.epoch, self._batch, self._resume = int(epoch), 0, None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "seed": self.seed,
            "n": self.n,
            "batch_size": self.batch_size,
            "context": self.context,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "batch_size", "context"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}"
                )
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"cannot resume at batch {state['batch']}: an epoch has {len(self)} batches")
        self.epoch, self._batch, self._resume = int(state["epoch"]), int(state["batch"]), int(state["batch"])


class EvalWindows:
    """The fixed non-overlapping windows tiling ``ids`` (the last partial one dropped), in batches."""

    def __init__(
        self,
        ids: torch.Tensor,
        context: int,
        batch_size: int = 64,
        *,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        count = (len(ids) - 1) // context
        starts = torch.arange(count) * context
        rank, world = shard
        self.starts = starts[rank::world]
        self.ids, self.context, self.batch_size, self.device = ids, context, batch_size, torch.device(device)

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.starts), self.batch_size):
            s = self.starts[i : i + self.batch_size]
            windows = self.ids[s.unsqueeze(1) + torch.arange(self.context + 1)].to(self.device)
            yield windows[:, :-1], windows[:, 1:].reshape(-1)


def text_loaders(
    corpus: TextCorpus,
    context: int,
    batch_size: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    shard: tuple[int, int] = (0, 1),
    train_chars: int | None = None,
) -> tuple[WindowLoader, WindowLoader, EvalWindows, EvalWindows]:
    """(train, calibration, validation, test) loaders of a corpus; ``train_chars`` keeps only
    that many characters of the training split (a prefix), for quick runs."""
    check_length(corpus, context)
    train_ids = corpus.train[:train_chars] if train_chars else corpus.train
    if len(train_ids) < context + 1:
        raise DataError(
            f"train_subset {train_chars} keeps fewer training characters than one window of "
            f"{context + 1}; raise --train-subset"
        )
    train = WindowLoader(train_ids, context, batch_size, seed=derive_seed(seed, 4), device=device, shard=shard)
    calib = WindowLoader(train_ids, context, batch_size, seed=derive_seed(seed, 5), device=device)
    return (
        train,
        calib,
        EvalWindows(corpus.val, context, device=device, shard=shard),
        EvalWindows(corpus.test, context, device=device, shard=shard),
    )


def sample_text(
    model: torch.nn.Module, vocab: list[str], prompt: str, length: int = 200, temperature: float = 0.0, seed: int = 0
) -> str:
    """``prompt`` continued by ``length`` characters from ``model.generate`` (greedy at temperature 0)."""
    device = next(model.parameters()).device
    ids = encode(prompt, vocab).to(device)
    out = model.generate(
        ids,
        length,
        temperature=temperature,  # type: ignore[operator]
        generator=torch.Generator().manual_seed(seed),
    )
    return prompt + decode(out, vocab)
