"""A loaded ``.pt`` object in few bytes: its tensors rebuilt from θ0, as permutation codes, or compressed.

Any object ``torch.load(weights_only=True)`` returns (dicts, lists, tuples, plain values,
tensors) is split into a *skeleton* (the object with every tensor replaced by a marker)
and one entry per tensor, the cheapest exact description found:

* ``theta0`` -- bit-identical to a θ0 tensor (init.pt's state): nothing stored;
* ``sorted`` / ``runs_values`` / ``runs_counts`` -- LaPerm's sorted θ0 rows (dense, or the two
  tensors of its run-length form): nothing stored, they are recomputed from θ0;
* ``codes`` -- every row a permutation of its θ0 row (weights at a sync point): per-row
  codes of :mod:`laperm.export.codec`, bit-packed;
* ``raw`` -- anything else (Adam's moments, weights between syncs, random states, fields
  this module has never heard of): its bytes, byte-shuffled and zlib-compressed.

Identical bytes are stored once (:class:`Blobs`), so best.pt costs nothing next to the
checkpoint's copy of the same weights. Decoding is exact by construction; :func:`same_object`
checks it.
"""

from __future__ import annotations

import copy
import hashlib
import lzma
import math
import os
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import reconnect
from ..export import codec
from ..initial_values import SortedRows
from ..reconnect import RowLayout
from .bounds import decompress_bounded

__all__ = ["Blobs", "Theta0", "encode_object", "decode_object", "same_object", "raw_bytes", "tensor_from_bytes"]

MARKER = "__laperm_pack_tensor__"  # a skeleton's stand-in for tensor number i: {MARKER: i}
ZLIB_LEVEL = 6
MAX_NODES = 1_000_000  # items of one decoded skeleton (a checkpoint's: a few thousand)


# -- bytes ------------------------------------------------------------------------------------


def raw_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> Tensor:
    numel = math.prod(shape)
    if len(data) != numel * torch.empty((), dtype=dtype).element_size():
        raise ValueError(f"{len(data)} bytes for a {dtype} tensor of shape {tuple(shape)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def compress(data: bytes, method: str) -> bytes:
    """``method``: ``none``, ``lzma``, ``zlib``, or ``shuffle<N>`` (bytes grouped by their place in
    N-byte numbers, then zlib: a float's sign and exponent bytes repeat, its low bytes do not)."""
    if method == "none":
        return data
    if method == "lzma":
        return lzma.compress(data, preset=6)
    if method.startswith("shuffle"):
        width = int(method.removeprefix("shuffle"))
        data = np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()
    return zlib.compress(data, ZLIB_LEVEL)


def decompress(data: bytes, method: str, size: int) -> bytes:
    """The inverse of :func:`compress`, making at most ``size`` bytes (the declared size; see :mod:`.bounds`)."""
    out = decompress_bounded(data, method, size)
    if method.startswith("shuffle"):
        width = int(method.removeprefix("shuffle"))
        if width < 1 or size % width:
            raise ValueError(f"{size} bytes are no whole number of {width}-byte values")
        out = np.frombuffer(out, np.uint8).reshape(width, -1).T.tobytes()
    return out


def _method_for(t: Tensor) -> str:
    width = t.element_size()
    if t.numel() * width < 64:
        return "none"  # (a step count: compressing would only add zlib's header)
    return f"shuffle{width}" if width > 1 else "zlib"


class Blobs:
    """The byte blobs of one package; identical (bytes, method) pairs are stored once.

    :meth:`seal` compresses them all, in threads (zlib and lzma release the GIL).
    """

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.methods: list[str] = []
        self._index: dict[bytes, int] = {}

    def add(self, data: bytes, method: str) -> int:
        key = hashlib.sha256(method.encode() + b"|" + data).digest()
        if key not in self._index:
            self._index[key] = len(self.raw)
            self.raw.append(data)
            self.methods.append(method)
        return self._index[key]

    def seal(self) -> tuple[list[dict[str, Any]], bytes]:
        """``(descriptions, concatenated compressed blobs)``."""
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            stored = list(pool.map(compress, self.raw, self.methods))
        meta, offset = [], 0
        for data, method, packed in zip(self.raw, self.methods, stored, strict=True):
            meta.append({"offset": offset, "nbytes": len(packed), "size": len(data), "method": method})
            offset += len(packed)
        return meta, b"".join(stored)


def read_blob(meta: list[dict[str, Any]], area: bytes | memoryview, index: int) -> bytes:
    m = meta[index]
    a, n = int(m["offset"]), int(m["nbytes"])
    if a < 0 or n < 0 or a + n > len(area):
        raise ValueError(f"blob {index} lies outside the package")
    try:
        return decompress(bytes(area[a : a + n]), m["method"], int(m["size"]))
    except ValueError as e:
        raise ValueError(f"blob {index}: {e}") from None


# -- θ0 and what is derived from it -----------------------------------------------------------


class Theta0:
    """θ0 (init.pt's state) and the tensors derived from it that a checkpoint may hold."""

    def __init__(self, state: Mapping[str, Tensor], layouts: Mapping[str, RowLayout]) -> None:
        self.state = {k: v.detach().cpu() for k, v in state.items()}
        self.layouts = {k: v for k, v in layouts.items() if k in self.state}
        self._derived: dict[tuple[str, str], Tensor] | None = None
        self._classes: dict[str, tuple[Tensor, Tensor]] = {}
        # The same synced weights sit in a checkpoint up to three times (model, best, prev_synced)
        # and again in best.pt: code and decode each once.
        self._coded: dict[tuple[str, bytes], tuple[int, Tensor]] = {}
        self._decoded: dict[tuple[str, int], Tensor] = {}

    def derived(self) -> dict[tuple[str, str], Tensor]:
        """``{(encoding, name): tensor}`` of everything an entry can point at instead of storing it."""
        if self._derived is None:
            found = {("theta0", k): v for k, v in self.state.items()}
            for name, layout in self.layouts.items():
                rows = reconnect.sorted_rows(self.state[name], layout)
                found[("sorted", name)] = rows
                runs = SortedRows.from_sorted(rows, "rle")
                assert runs.run_values is not None and runs.run_counts is not None
                found[("runs_values", name)] = runs.run_values
                found[("runs_counts", name)] = runs.run_counts
            self._derived = found
        return self._derived

    def exact_match(self, t: Tensor) -> tuple[str, str] | None:
        for key, cand in self.derived().items():
            if cand.shape == t.shape and cand.dtype == t.dtype and codec.same_bits(cand, t):
                return key
        return None

    def permutation_codes(self, t: Tensor, hint: str) -> tuple[str, int, Tensor] | None:
        """``(name, bits, codes)`` when every row of ``t`` is a permutation of a θ0 tensor's rows."""
        names = sorted(self.layouts, key=lambda n: n != hint)  # the tensor of the same name first
        for name in names:
            t0, layout = self.state[name], self.layouts[name]
            if t0.shape != t.shape or t0.dtype != t.dtype or not t.is_floating_point():
                continue
            rows = reconnect.to_rows(t, layout)
            first = torch.sort(rows[:1], dim=1, stable=True).values
            if not codec.same_bits(first, self.derived()[("sorted", name)][:1]):
                continue  # cheap rejection: the first row alone is no permutation
            key = (name, hashlib.sha256(raw_bytes(t)).digest())
            if key not in self._coded:
                try:
                    codes, bits = codec.encode_rows(rows, reconnect.to_rows(t0, layout), self.classes(name))
                except ValueError:
                    continue
                self._coded[key] = bits, codes
            bits, codes = self._coded[key]
            return name, bits, codes
        return None

    def classes(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self._classes:
            self._classes[name] = codec.row_classes(reconnect.to_rows(self.state[name], self.layouts[name]))
        return self._classes[name]

    def decode_codes(self, name: str, blob: int, codes: Callable[[tuple[int, int]], Tensor]) -> Tensor:
        """The tensor ``name`` whose rows ``codes(rows' shape)`` (stored in ``blob``) describe."""
        if (name, blob) not in self._decoded:
            t0, layout = self.state[name], self.layouts[name]
            theta_rows = reconnect.to_rows(t0, layout)
            shape = (int(theta_rows.shape[0]), int(theta_rows.shape[1]))
            rows = codec.decode_rows(codes(shape), theta_rows, self.classes(name))
            self._decoded[(name, blob)] = reconnect.from_rows_(t0.clone(), rows, layout)
        return self._decoded[(name, blob)].clone()


# -- objects ----------------------------------------------------------------------------------


def _rebuilt(obj: Any, visit: Callable[[Any, str], Any], key: str) -> Any:
    """``obj`` with ``visit`` applied to its items; ``obj`` itself when nothing changed.

    Keeping unchanged containers as they are keeps objects shared (Adam's ``betas`` tuple sits in
    every param group): pickle writes a shared object once, so the file comes back byte for byte.
    """
    if isinstance(obj, dict):
        items = {k: visit(v, str(k)) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = copy.copy(obj)  # keeps the dict's type (OrderedDict) and key order
        out.update(items)
        return out
    if type(obj) in (list, tuple):  # (not torch.Size and other tuple types: they hold no tensors)
        values = [visit(v, key) for v in obj]
        return obj if all(a is b for a, b in zip(values, obj, strict=True)) else type(obj)(values)
    return obj


def _walk(obj: Any, fn: Callable[[Tensor, str], Any], key: str = "") -> Any:
    """``obj`` with every tensor ``t`` (under dict key ``key``) replaced by ``fn(t, key)``."""
    if isinstance(obj, Tensor):
        return fn(obj, key)
    return _rebuilt(obj, lambda v, k: _walk(v, fn, k), key)


def encode_object(obj: Any, theta0: Theta0 | None, blobs: Blobs) -> tuple[Any, list[dict[str, Any]]]:
    """``(skeleton, entries)``: ``obj`` with tensor ``i`` replaced by ``{MARKER: i}``, and how to rebuild each."""
    entries: list[dict[str, Any]] = []

    def encode(t: Tensor, key: str) -> dict[str, int]:
        t = t.detach().cpu()
        entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        found = theta0.exact_match(t) if theta0 is not None else None
        perm = theta0.permutation_codes(t, key) if theta0 is not None and found is None else None
        if found is not None:
            entry.update(enc=found[0], name=found[1])
        elif perm is not None:
            name, bits, codes = perm
            entry.update(
                enc="codes", name=name, bits=bits, blob=blobs.add(codec.pack_bits(codes.numpy(), bits), "none")
            )
        else:
            entry.update(enc="raw", blob=blobs.add(raw_bytes(t), _method_for(t)))
        entries.append(entry)
        return {MARKER: len(entries) - 1}

    return _walk(obj, encode), entries


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def decode_tensor(entry: dict[str, Any], theta0: Theta0 | None, blob: Callable[[int], bytes]) -> Tensor:
    dtype, shape, enc = _dtype(entry["dtype"]), [int(s) for s in entry["shape"]], entry["enc"]
    if enc == "raw":
        return tensor_from_bytes(blob(int(entry["blob"])), dtype, shape)
    if theta0 is None:
        raise ValueError(f"a tensor refers to θ0 ({enc}) but the package has none")
    if enc == "codes":
        index, bits = int(entry["blob"]), int(entry["bits"])

        def codes(shape: tuple[int, int]) -> Tensor:
            return torch.from_numpy(codec.unpack_bits(blob(index), bits, shape[0] * shape[1])).reshape(shape)

        t = theta0.decode_codes(entry["name"], index, codes)
    else:
        t = theta0.derived()[(enc, entry["name"])].clone()
    if t.dtype != dtype or list(t.shape) != shape:
        raise ValueError(f"{enc} {entry.get('name')} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


def decode_object(
    skeleton: Any, entries: list[dict[str, Any]], theta0: Theta0 | None, blob: Callable[[int], bytes]
) -> Any:
    """The object :func:`encode_object` was given, exactly.

    At most :data:`MAX_NODES` containers and values are visited: a forged skeleton that shares one
    list many times over would otherwise be walked exponentially often."""
    visited = 0

    def visit(obj: Any, key: str = "") -> Any:
        nonlocal visited
        visited += 1
        if visited > MAX_NODES:
            raise ValueError(f"the skeleton has more than {MAX_NODES:,} items; a checkpoint has far fewer")
        if isinstance(obj, dict) and set(obj) == {MARKER} and isinstance(obj[MARKER], int):
            return decode_tensor(entries[obj[MARKER]], theta0, blob)
        return _rebuilt(obj, visit, key)

    return visit(skeleton)


def same_object(a: Any, b: Any) -> bool:
    """Same structure, plain values and tensor bits (dtype, shape, every bit: -0.0 != 0.0)."""
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype == torch.bool:
            return bool(torch.equal(a.cpu(), b.cpu()))
        return a.numel() == 0 or raw_bytes(a) == raw_bytes(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_object(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_object(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)
