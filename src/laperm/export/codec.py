"""Compact checkpoints of LaPerm-trained networks: ``laperm export``.

After a sync, every permuted row is a permutation of its θ0 row (docs/algorithm.md §2), so
a trained network is fully described by θ0 plus, for every row, *which* of
its initial values sits at each position.  θ0 itself costs nothing to store:
it is rebuilt bit-exactly from the run's recipe (model, init, seed) by
:func:`laperm.build.build_model`; ``--with-theta0`` stores it instead.

Per row we store one code per position, the index of its value among the
row's *distinct* initial values (sorted ascending, -0.0 before 0.0, compared
by bit pattern), bit-packed with ``ceil(log2(d))`` bits where ``d`` is the
largest number of distinct values in a row of that tensor:

* dense rows (all values distinct): the rank of each value in sorted θ0, i.e.
  the row's permutation, in ``ceil(log2(n))`` bits instead of 32;
* shared-value rows (only 0 and v): a 1-bit mask of the positions holding v;
* pruned rows: ``ceil(log2(nonzeros + 1))`` bits, the zeros being one value.

Tensors LaPerm does not permute (free biases, BatchNorm parameters and
buffers) are stored as they are.

File layout::

    b"LAPERMC" + version byte
    header length (8 bytes, little-endian) + header (UTF-8 JSON)
    data blobs (their offsets and sizes are in the header)
    sha256 of everything above (32 bytes)

The format holds no pickles, so loading a file from elsewhere runs no code.
Loading checks the checksum, that θ0 rebuilt from the recipe is the one the
file was made from, and that every decoded row holds exactly its θ0 values.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import checkpoint, reconnect
from ..reconnect import RowLayout, float_bits

__all__ = [
    "CompactFormatError",
    "Decoded",
    "encode_compact",
    "decode_compact",
    "encode_rows",
    "decode_rows",
    "row_classes",
    "pack_bits",
    "unpack_bits",
    "packed_size",
    "theta0_digest",
    "state_dict_nbytes",
    "same_bits",
    "parse_compact",
]

MAGIC = b"LAPERMC"
VERSION = 1
SUFFIX = ".laperm"
_DIGEST = 32
_PACK_CHUNK = 1 << 16  # codes packed per numpy pass (bounds the temporaries; a multiple of 8)


class CompactFormatError(checkpoint.CheckpointError):
    """A compact checkpoint is damaged, not one, or does not fit the θ0 it is decoded against."""


# -- value classes of a row ---------------------------------------------------------
#
# Everything below works on integer *keys*: a float's bit pattern turned into an
# integer that sorts like the value (an involution, so keys map back to the exact
# bits).  Different bit patterns give different keys, so -0.0 and 0.0 (or two NaN
# payloads) are distinct values, and decoding is bit-exact by construction.

# Signed integers of each width (not reconnect.INT_OF_WIDTH: the sign bit drives the key order below).
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keys(rows: Tensor) -> Tensor:
    """Order-preserving int64 keys of float rows (``-0.0`` gets -1, ``0.0`` gets 0)."""
    width = rows.element_size()
    b = rows.detach().contiguous().view(_INT_OF_WIDTH[width]).long()
    if not rows.is_floating_point():
        return b
    # Negative floats are sign-magnitude: flip their magnitude bits so that a
    # larger magnitude gives a smaller integer (b ^ 0x7FF..F == -1 - magnitude).
    sign = b < 0
    return torch.where(sign, b ^ ((1 << (8 * width - 1)) - 1), b)


def _unkeys(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`_keys`: tensors of ``dtype`` with exactly those bit patterns."""
    width = torch.empty((), dtype=dtype).element_size()
    b = keys
    if dtype.is_floating_point:
        b = torch.where(b < 0, b ^ ((1 << (8 * width - 1)) - 1), b)
    return b.to(_INT_OF_WIDTH[width]).view(dtype)


def _classes(theta_rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(sorted_keys, cls)`` of θ0 rows: their keys ascending, and the class of each sorted position.

    The class of a value is its index among the row's distinct values.
    """
    s = torch.sort(_keys(theta_rows), dim=1).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return s, new.long().cumsum(1) - 1


def _histogram(codes: Tensor) -> Tensor:
    """Per row, how often each code occurs (codes must be < the row length)."""
    return torch.zeros(codes.shape, dtype=torch.int64).scatter_add_(1, codes, torch.ones_like(codes))


def row_classes(theta_rows: Tensor) -> tuple[Tensor, Tensor]:
    """What :func:`encode_rows` and :func:`decode_rows` derive from θ0 rows (pass it as ``classes=``
    to code many tensors against the same θ0 without sorting it again)."""
    return _classes(theta_rows)


def encode_rows(
    final_rows: Tensor, theta_rows: Tensor, classes: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, int]:
    """Codes of ``final_rows`` against ``theta_rows`` and their bit width.

    Raises ``ValueError`` naming the first row that is not a permutation of its θ0 row.
    """
    s, cls = classes if classes is not None else _classes(theta_rows)
    keys = _keys(final_rows)
    pos = torch.searchsorted(s, keys).clamp_(max=max(s.shape[1] - 1, 0))
    present = s.gather(1, pos) == keys
    codes = cls.gather(1, pos)
    same_counts = present.all(1) & (_histogram(codes) == _histogram(cls)).all(1)
    if not bool(same_counts.all()):
        row = int((~same_counts).nonzero()[0, 0])
        raise ValueError(f"row {row} is not a permutation of its initial values")
    distinct = int(cls[:, -1].max()) + 1 if cls.numel() else 1
    return codes, math.ceil(math.log2(distinct)) if distinct > 1 else 0


def decode_rows(codes: Tensor, theta_rows: Tensor, classes: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rows holding, at each position, the θ0 value of class ``codes`` (bit-exact).

    Raises ``ValueError`` if a code is out of range or a decoded row does not
    hold exactly its θ0 values (a damaged file or the wrong θ0).
    """
    s, cls = classes if classes is not None else _classes(theta_rows)
    if codes.shape != s.shape:
        raise ValueError(f"{tuple(codes.shape)} codes for {tuple(s.shape)} weights")
    if codes.numel():
        distinct = cls[:, -1:] + 1
        if bool((codes >= distinct).any()):
            raise ValueError("codes out of range for the θ0 values")
        if not torch.equal(_histogram(codes), _histogram(cls)):
            raise ValueError("decoded rows are not permutations of their θ0 rows")
    # class -> key table (every position of a class writes the same key)
    table = torch.zeros_like(s).scatter_(1, cls, s)
    return _unkeys(table.gather(1, codes), theta_rows.dtype)


# -- bit packing ----------------------------------------------------------------------


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Non-negative integers ``< 2**bits`` packed ``bits`` apiece, least significant bit first."""
    if bits == 0:
        return b""
    codes = codes.reshape(-1).astype(np.uint64, copy=False)
    shifts = np.arange(bits, dtype=np.uint64)
    out = []
    for a in range(0, codes.size, _PACK_CHUNK):  # a multiple of 8 codes: chunks end on a byte boundary
        bitmat = ((codes[a : a + _PACK_CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` int64 codes."""
    if bits == 0:
        return np.zeros(count, np.int64)
    if len(data) != packed_size(bits, count):
        raise ValueError(f"{len(data)} bytes of codes, expected {packed_size(bits, count)}")
    raw = np.frombuffer(data, np.uint8)
    weights = 1 << np.arange(bits, dtype=np.int64)
    out = np.empty(count, np.int64)
    step = _PACK_CHUNK * bits // 8  # bytes per chunk of codes
    for i, a in enumerate(range(0, count, _PACK_CHUNK)):
        n = min(_PACK_CHUNK, count - a)
        bitmat = np.unpackbits(raw[i * step :], count=n * bits, bitorder="little").reshape(n, bits)
        out[a : a + n] = bitmat @ weights
    return out


def packed_size(bits: int, count: int) -> int:
    return (bits * count + 7) // 8


# -- tensors as bytes ---------------------------------------------------------------------


def _raw(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _from_raw(data: bytes, dtype: torch.dtype, shape: list[int]) -> Tensor:
    numel = math.prod(shape)
    if len(data) != numel * torch.empty((), dtype=dtype).element_size():
        raise ValueError(f"{len(data)} bytes for a {dtype} tensor of shape {tuple(shape)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and bit patterns (so -0.0 != 0.0, and a NaN equals itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.numel() == 0 or torch.equal(float_bits(a.reshape(-1)), float_bits(b.reshape(-1)))


def theta0_digest(theta0: Mapping[str, Tensor], names: list[str]) -> str:
    """sha256 of the named θ0 tensors (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name in names:
        t = theta0[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_raw(t))
    return h.hexdigest()


def state_dict_nbytes(state_dict: Mapping[str, Tensor]) -> int:
    """Size of ``torch.save(state_dict)``: the file a compact checkpoint is compared with."""
    buf = io.BytesIO()
    torch.save(OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items()), buf)
    return buf.tell()


# -- the container ------------------------------------------------------------------------


def encode_compact(
    state_dict: Mapping[str, Tensor],
    theta0: Mapping[str, Tensor],
    layouts: Mapping[str, RowLayout],
    *,
    recipe: dict[str, Any] | None = None,
    with_theta0: bool = False,
    config: dict[str, Any] | None = None,
) -> bytes:
    """A compact checkpoint of ``state_dict`` (synced weights) as bytes.

    Args:
        state_dict: the trained model's ``state_dict``.
        theta0: the initial weights (at least every tensor named in ``layouts``).
        layouts: ``{name: RowLayout}`` of every tensor LaPerm permuted.
        recipe: ``{"model", "init", "seed"}`` that rebuilds ``theta0`` through
            :func:`laperm.build.build_model`; stored so that loading needs nothing else.
        with_theta0: store the permuted θ0 tensors themselves.
        config: the run's full config, kept for reference only.

    Raises ``ValueError`` if a permuted tensor is not a row-wise permutation of θ0.
    """
    permuted = [name for name in state_dict if name in layouts]
    missing = sorted(set(layouts) - set(permuted))
    if missing:
        raise ValueError(f"permuted tensor(s) {', '.join(missing)} are not in the state_dict")
    blobs: list[bytes] = []
    offset = 0

    def add(blob: bytes) -> dict[str, int]:
        nonlocal offset
        blobs.append(blob)
        offset += len(blob)
        return {"offset": offset - len(blob), "nbytes": len(blob)}

    entries = []
    for name, t in state_dict.items():
        t = t.detach().cpu()
        entry: dict[str, Any] = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if name in layouts:
            layout, t0 = layouts[name], theta0[name].detach().cpu()
            if t0.shape != t.shape or t0.dtype != t.dtype:
                raise ValueError(
                    f"{name}: θ0 is {t0.dtype} {tuple(t0.shape)} but the weights are {t.dtype} {tuple(t.shape)}"
                )
            try:
                codes, bits = encode_rows(reconnect.to_rows(t, layout), reconnect.to_rows(t0, layout))
            except ValueError as e:
                raise ValueError(f"{name}: {e} (export synced weights: final.pt or best.pt)") from None
            entry.update(
                kind="codes",
                bits=bits,
                rows=int(codes.shape[0]),
                cols=int(codes.shape[1]),
                layout=layout.record(),
                **add(pack_bits(codes.numpy(), bits)),
            )
        else:
            entry.update(kind="plain", **add(_raw(t)))
        entries.append(entry)
    stored_theta0 = []
    if with_theta0:
        for name in permuted:
            t0 = theta0[name].detach().cpu()
            stored_theta0.append(
                {"name": name, "dtype": str(t0.dtype).removeprefix("torch."), "shape": list(t0.shape), **add(_raw(t0))}
            )
    header = {
        "format": "laperm-compact",
        "version": VERSION,
        "recipe": recipe,
        "theta0_sha256": theta0_digest(theta0, permuted),
        "torch": torch.__version__,
        "tensors": entries,
        "theta0": stored_theta0,
        "config": config,
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    body = MAGIC + bytes([VERSION]) + struct.pack("<Q", len(head)) + head + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


@dataclass
class Decoded:
    """A decoded compact checkpoint: the weights, θ0 and what was permuted."""

    state_dict: OrderedDict[str, Tensor]
    theta0: dict[str, Tensor]
    layouts: dict[str, RowLayout]
    header: dict[str, Any]


def parse_compact(data: bytes, where: str) -> tuple[dict[str, Any], memoryview]:
    """Check magic and checksum; return (header, blob area)."""
    fixed = len(MAGIC) + 1 + 8
    if len(data) < fixed + _DIGEST or not data.startswith(MAGIC):
        raise CompactFormatError(f"{where} is not a laperm compact checkpoint (made by `laperm export`)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CompactFormatError(
            f"{where} is damaged (checksum mismatch: truncated or modified); export it again from its run folder"
        )
    if data[len(MAGIC)] != VERSION:
        raise CompactFormatError(
            f"{where} is compact format version {data[len(MAGIC)]}; this laperm reads version {VERSION}, upgrade laperm"
        )
    (head_len,) = struct.unpack("<Q", body[len(MAGIC) + 1 : fixed])
    try:
        header = json.loads(bytes(body[fixed : fixed + head_len]).decode())
        if not isinstance(header, dict) or header.get("format") != "laperm-compact":
            raise ValueError("not a laperm-compact header")
    except (UnicodeDecodeError, ValueError) as e:
        raise CompactFormatError(f"{where} has an unreadable header ({e})") from None
    return header, memoryview(body)[fixed + head_len :]


def decode_compact(
    data: bytes,
    theta0: Mapping[str, Tensor] | None = None,
    *,
    where: str = "data",
    rebuild: Callable[[Mapping[str, Any]], dict[str, Tensor]] | None = None,
) -> Decoded:
    """Decode bytes made by :func:`encode_compact`; ``theta0`` overrides the stored θ0 or recipe.

    ``rebuild`` turns a stored recipe into θ0 (:func:`laperm.export.rebuild_theta0`, which the
    package's ``decode_compact`` passes); the codec itself builds no models.
    """
    header, blobs = parse_compact(data, where)
    try:
        entries = header["tensors"]
        permuted = [e["name"] for e in entries if e["kind"] == "codes"]

        def blob(e: dict[str, Any]) -> bytes:
            a, n = int(e["offset"]), int(e["nbytes"])
            if a < 0 or n < 0 or a + n > len(blobs):
                raise ValueError(f"{e['name']} lies outside the file")
            return bytes(blobs[a : a + n])

        if theta0 is None:
            if header.get("theta0"):
                theta0 = {e["name"]: _from_raw(blob(e), _dtype(e["dtype"]), e["shape"]) for e in header["theta0"]}
            elif header.get("recipe") and rebuild is not None:
                theta0 = rebuild(header["recipe"])
            else:
                raise CompactFormatError(f"{where} stores neither θ0 nor a recipe for it; pass theta0=")
        absent = [n for n in permuted if n not in theta0]
        if absent:
            raise CompactFormatError(f"θ0 lacks {', '.join(absent)}, permuted in {where}")
        if theta0_digest(theta0, permuted) != header["theta0_sha256"]:
            raise CompactFormatError(
                f"the initial weights θ0 for {where} differ from those it was exported with "
                f"(exported with torch {header.get('torch')}, this is {torch.__version__}: the seeded "
                "init may have changed); export again with --with-theta0"
            )
        state: OrderedDict[str, Tensor] = OrderedDict()
        layouts = {}
        for e in entries:
            dtype, shape = _dtype(e["dtype"]), [int(s) for s in e["shape"]]
            if e["kind"] == "plain":
                state[e["name"]] = _from_raw(blob(e), dtype, shape)
                continue
            if e["kind"] != "codes":
                raise ValueError(f"unknown kind {e['kind']!r}")
            layout = RowLayout.from_record(e["layout"])
            t0 = theta0[e["name"]].detach().cpu()
            if list(t0.shape) != shape or t0.dtype != dtype:
                raise ValueError(f"{e['name']} has θ0 of shape {tuple(t0.shape)}, expected {tuple(shape)}")
            rows, cols, bits = int(e["rows"]), int(e["cols"]), int(e["bits"])
            theta_rows = reconnect.to_rows(t0, layout)
            if tuple(theta_rows.shape) != (rows, cols) or not 0 <= bits <= 32:
                raise ValueError(f"{e['name']} has a bad row description")
            codes = torch.from_numpy(unpack_bits(blob(e), bits, rows * cols)).reshape(rows, cols)
            try:
                final_rows = decode_rows(codes, theta_rows)
            except ValueError as err:
                raise ValueError(f"{e['name']}: {err}") from None
            state[e["name"]] = reconnect.from_rows_(t0.clone(), final_rows, layout)
            layouts[e["name"]] = layout
    except CompactFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a forged header provokes (a bad dtype, a bad layout)
        raise CompactFormatError(f"{where} is damaged or inconsistent ({type(e).__name__}: {str(e)[:300]})") from None
    return Decoded(state, {n: theta0[n] for n in permuted}, layouts, header)
