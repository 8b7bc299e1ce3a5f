"""A package's header checked, whole, before anything of the package is decompressed or built.

The header (:mod:`laperm.pack.runs`) says which files the package holds, how each tensor is
rebuilt and how large each blob is. All of that is a claim from elsewhere: this module checks the
names (:mod:`.names`), the recipe (against the model registry), and every declared size against
the ceilings the recipe gives (:mod:`.bounds`), and returns those ceilings.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..export.codec import CompactFormatError
from ..export.fileformat import check_recipe
from .bounds import Ceilings
from .errors import PackError
from .names import check_disjoint, check_name

__all__ = ["check_header", "ENCODINGS", "METHODS"]

ENCODINGS = ("raw", "codes", "theta0", "sorted", "runs_values", "runs_counts")
METHODS = ("none", "lzma", "zlib", "shuffle2", "shuffle4", "shuffle8")
MAX_CODE_BITS = 32  # codes index a row's distinct values: a row has fewer than 2**32


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} is {value!r}, not a whole number of bytes")
    return value


def _recipe_of(header: dict[str, Any]) -> Any:
    """The recipe that bounds the package: its own, or θ0's (packs made before the package carried one)."""
    theta0 = header.get("theta0")
    if header.get("recipe") is not None:
        return header["recipe"]
    return theta0.get("recipe") if isinstance(theta0, dict) else None


def _check_blobs(blobs: Any, area: int, ceilings: Ceilings) -> list[int]:
    """Each blob inside the package, of a known method and within the ceilings; returns their sizes."""
    if not isinstance(blobs, list):
        raise ValueError("the blob list is missing")
    sizes = []
    for i, b in enumerate(blobs):
        if not isinstance(b, dict) or b.get("method") not in METHODS:
            raise ValueError(f"blob {i} has no known compression")
        start, nbytes, size = (_uint(b.get(k), f"blob {i}'s {k}") for k in ("offset", "nbytes", "size"))
        if start + nbytes > area:
            raise ValueError(f"blob {i} lies outside the package")
        if size > ceilings.blob:
            raise PackError(f"blob {i} declares {size:,} bytes, over the ceiling of {ceilings.blob:,} for its model")
        sizes.append(size)
    if sum(sizes) > ceilings.package:
        raise PackError(f"its blobs declare {sum(sizes):,} bytes, over the ceiling of {ceilings.package:,}")
    return sizes


def _index(value: Any, sizes: list[int], what: str) -> int:
    if type(value) is not int or not 0 <= value < len(sizes):
        raise ValueError(f"{what} refers to blob {value!r}, which the package does not have")
    return value


def _check_tensor(t: Any, sizes: list[int], ceilings: Ceilings, where: str) -> None:
    if not isinstance(t, dict) or t.get("enc") not in ENCODINGS:
        raise ValueError(f"{where}: a tensor of unknown encoding")
    dtype = getattr(torch, str(t.get("dtype")), None)
    shape = t.get("shape")
    if not isinstance(dtype, torch.dtype) or not isinstance(shape, list):
        raise ValueError(f"{where}: a tensor of unknown dtype or shape")
    nbytes = math.prod(_uint(s, "a dimension") for s in shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > ceilings.tensor:
        raise PackError(
            f"{where}: a tensor declares {nbytes:,} bytes (shape {shape[:8]}), over the ceiling of "
            f"{ceilings.tensor:,} for its model; the pack is damaged or forged"
        )
    if t["enc"] == "raw" and sizes[_index(t.get("blob"), sizes, where)] != nbytes:
        raise ValueError(f"{where}: a raw tensor's blob is not its size")
    if t["enc"] == "codes":
        _index(t.get("blob"), sizes, where)
        if type(t.get("bits")) is not int or not 0 <= t["bits"] <= MAX_CODE_BITS:
            raise ValueError(f"{where}: codes of {t.get('bits')!r} bits")


def _check_file(f: Any, sizes: list[int], ceilings: Ceilings) -> str:
    if not isinstance(f, dict):
        raise ValueError("a file entry is not a mapping")
    name = check_name(f.get("name"), "the packed file")
    if f.get("kind") == "file":
        blob, start, size = _index(f.get("blob"), sizes, name), _uint(f.get("start"), name), _uint(f.get("size"), name)
        if start + size > sizes[blob]:
            raise ValueError(f"{name} lies outside its blob")
    elif f.get("kind") == "torch" and name.endswith(".pt") and isinstance(f.get("tensors"), list):
        _index(f.get("skeleton"), sizes, name)
        for t in f["tensors"]:
            _check_tensor(t, sizes, ceilings, name)
    else:
        raise ValueError(f"{name} is of unknown kind {f.get('kind')!r}")
    return name


def _check_tiling(files: list[dict[str, Any]], sizes: list[int]) -> None:
    """Small files lie one after another in their blob, in the order listed, and fill it (as ``laperm pack``
    writes them): a forged start or size that would hand a file another file's bytes is refused."""
    ends: dict[int, int] = {}
    for f in files:
        if f.get("kind") != "file":
            continue
        blob = f["blob"]
        if f["start"] != ends.get(blob, 0):
            raise ValueError(f"{f['name']} does not start where the file before it in its blob ends")
        ends[blob] = f["start"] + f["size"]
    for blob, end in ends.items():
        if end != sizes[blob]:
            raise ValueError(f"the files of blob {blob} do not fill it ({end} of {sizes[blob]} bytes)")


def check_header(header: Any, area: int, where: str) -> Ceilings:
    """Check a package's header (names, recipe, every declared size); returns the ceilings it was held to."""
    try:
        if not isinstance(header, dict) or not isinstance(header.get("files"), list):
            raise ValueError("the header lists no files")
        torch_files = any(isinstance(f, dict) and f.get("kind") == "torch" for f in header["files"])
        recipe = _recipe_of(header)
        if torch_files and recipe is None:
            raise PackError(f"{where} holds weights but no recipe to bound them; pack it again with this laperm")
        ceilings = Ceilings.for_model(check_recipe(recipe) if torch_files else None)
        sizes = _check_blobs(header.get("blobs"), area, ceilings)
        names = [_check_file(f, sizes, ceilings) for f in header["files"]]
        _check_tiling(header["files"], sizes)
        check_disjoint(names, where)
        return ceilings
    except PackError as e:
        raise PackError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None
    except CompactFormatError as e:  # the recipe, refused by the model registry
        raise PackError(f"{where}: {e}; the pack is damaged or forged") from None
    except (ValueError, TypeError) as e:
        raise PackError(f"{where} is damaged or forged ({e})") from None
