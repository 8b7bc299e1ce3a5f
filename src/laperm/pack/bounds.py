"""How much a package from a pack may make: ceilings from its recipe, and decompression that stops there.

A pack is data from elsewhere, and its sizes are claims. Before anything is decompressed or
allocated, every size a package declares is held against a ceiling:

* a tensor: the model's parameter count (its ``state_dict``, counted on the meta device from the
  recipe, which the model registry checked) times 8 bytes (the widest dtype) times 2 (a flat buffer
  of all parameters is the largest tensor laperm saves; the 2 is margin);
* a blob of small files or a checkpoint's skeleton (configs, metrics, logs): :data:`SMALL_MAX`;
* a whole package: :data:`COPIES` tensor-sized copies of the model (a checkpoint's weights, Adam's
  moments, best and previous synced weights, best.pt, final.pt, init.pt) plus :data:`SMALL_MAX`.

Then each blob is decompressed as a stream with ``max_length`` one byte past its declared size, so
a blob that expands further stops there and is refused (a decompression bomb costs at most its
declared size).
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass

__all__ = ["Ceilings", "SMALL_MAX", "COPIES", "decompress_bounded"]

MIB = 1 << 20
BYTES_PER_ELEMENT = 8  # float64 / int64: the widest dtype a checkpoint holds
TENSOR_MARGIN = 2
COPIES = 16
SMALL_MAX = 128 * MIB  # configs, metrics, logs, vocab of one run (or beside the runs), decompressed


@dataclass(frozen=True)
class Ceilings:
    """The most bytes one tensor, one blob and one package (all blobs) may declare."""

    tensor: int
    blob: int
    package: int

    @classmethod
    def for_model(cls, numel: int | None) -> Ceilings:
        """``numel``: the numbers in the recipe's model state (None: a package of small files only)."""
        tensor = 0 if numel is None else numel * BYTES_PER_ELEMENT * TENSOR_MARGIN
        return cls(tensor, max(tensor, SMALL_MAX), tensor * COPIES // TENSOR_MARGIN + SMALL_MAX)


def _stream(method: str) -> lzma.LZMADecompressor | zlib._Decompress:
    if method == "lzma":
        return lzma.LZMADecompressor()
    if method == "zlib" or method.startswith("shuffle"):
        return zlib.decompressobj()
    raise ValueError(f"unknown compression {method!r}")


def decompress_bounded(data: bytes, method: str, size: int) -> bytes:
    """``data`` decompressed, which must be exactly ``size`` bytes; it never makes more than ``size + 1``."""
    if method == "none":
        out = data
    else:
        stream = _stream(method)
        try:
            out = stream.decompress(data, size + 1)
        except (lzma.LZMAError, zlib.error) as e:
            raise ValueError(f"damaged compressed data ({e})") from None
        if len(out) == size and not stream.eof:
            raise ValueError("the compressed data is truncated")
    if len(out) != size:
        more = "more than" if len(out) > size else f"{len(out)} bytes, not"
        raise ValueError(f"it decompresses to {more} the {size} bytes declared")
    return out
