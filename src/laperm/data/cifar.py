"""CIFAR-10 from any of its common layouts, decoded once and then cached.

Accepted sources (``data_dir`` may be the file itself or a folder holding it):

* ``cifar-10-python.tar.gz`` — the official tarball (md5-verified when ``verify``; other
  tarball names are not, so small custom archives work);
* ``cifar-10-batches-py/`` — the extracted tarball (pickled ``data_batch_1..5``, ``test_batch``);
* an image-folder tree ``train/<class>/*.png|jpg`` and ``test/<class>/...``;
* a ``.zip`` of such a tree (e.g. ``cifar10-jpg.zip``), read in one pass without extracting.

With ``verify``, an archive listed in a ``SHA256SUMS`` file next to it is checked too.
"""

from __future__ import annotations

import codecs
import http.client
import importlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import cache
from .checksums import file_digest, read_sha256sums
from .dataset import Dataset, channel_stats
from .errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm"}
ENV_VAR = "LAPERM_CIFAR10"

HOW_TO_PROVIDE = (
    f"pass --data-dir (a {TARBALL}, a {BATCHES_DIR} folder, train/ and test/ image folders, or a zip of them), "
    f"set {ENV_VAR}, or run laperm.data.download_cifar10()"
)


@dataclass(frozen=True)
class Source:
    """Where CIFAR-10 was found: ``kind`` is tarball, batches, tree or zip."""

    kind: str
    path: Path


# ---------------------------------------------------------------- locating


def default_search_dirs() -> list[Path]:
    """Folders tried when neither ``data_dir`` nor ``$LAPERM_CIFAR10`` is given."""
    cwd = Path.cwd()
    return [
        Path(os.path.normpath(cwd / ".." / "shared" / "data" / "cifar10")),
        cwd / "shared" / "data" / "cifar10",
        cwd / "data" / "cifar10",
        cache.default_cache_dir() / "cifar10",
    ]


def find_source(path: Path) -> Source | None:
    """Recognise a CIFAR-10 source at ``path`` (a file or a folder), or return ``None``."""
    name = path.name.lower()
    if path.is_file():
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            return Source("tarball", path)
        if name.endswith(".zip"):
            return Source("zip", path)
        return None
    if not path.is_dir():
        return None
    # Cheapest-to-decode layouts first; the result is cached anyway.
    for folder in (path, path / BATCHES_DIR):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return Source("batches", folder)
    if (path / TARBALL).is_file():
        return Source("tarball", path / TARBALL)
    if (path / "train").is_dir() and (path / "test").is_dir():
        return Source("tree", path)
    archives = sorted(path.glob("*cifar*.zip")) + sorted(path.glob("*cifar*.tar.gz"))
    return find_source(archives[0]) if archives else None


def locate_cifar10(data_dir: str | os.PathLike | None = None) -> Source:
    """Find CIFAR-10 in ``data_dir``, else ``$LAPERM_CIFAR10``, else the default folders."""
    if data_dir is not None:
        places = [Path(data_dir).expanduser()]
    elif os.environ.get(ENV_VAR):
        places = [Path(os.environ[ENV_VAR]).expanduser()]
    else:
        places = default_search_dirs()
    for place in places:
        source = find_source(place)
        if source is not None:
            return source
    looked = ", ".join(str(p) for p in places)
    raise DataError(f"CIFAR-10 not found (looked in {looked}); {HOW_TO_PROVIDE}.")


def source_files(source: Source) -> list[Path]:
    """The files whose size and mtime key the cache entry for ``source``."""
    if source.kind == "batches":
        return [source.path / n for n in [*TRAIN_BATCHES, "test_batch"]]
    if source.kind == "tree":
        return [
            p
            for split in ("train", "test")
            for p in (source.path / split).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
    return [source.path]


# ---------------------------------------------------------------- pickled batches


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a data file must not be able to run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 protocol-2 bytes
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if name == "_reconstruct":
            try:  # numpy >= 2 moved numpy.core to numpy._core
                return importlib.import_module("numpy._core.multiarray")._reconstruct
            except ImportError:
                return importlib.import_module("numpy.core.multiarray")._reconstruct
        return codecs.encode if module == "_codecs" else getattr(np, name)


def _unpickle_batch(f: io.BufferedIOBase, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArrayUnpickler(f, encoding="bytes").load()  # the files are Python 2 pickles
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are channel-major
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(f"{where} is not a valid CIFAR-10 python batch ({exc}); re-download {TARBALL}.") from None
    if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= 10)):
        raise DataError(f"{where} has mismatched images and labels; re-download {TARBALL}.")
    return x, y


def _from_batches(batches: dict[str, tuple[np.ndarray, np.ndarray]], where: str) -> Dataset:
    missing = [n for n in [*TRAIN_BATCHES, "test_batch"] if n not in batches]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}; re-download or re-extract {TARBALL}.")
    train_x = np.concatenate([batches[n][0] for n in TRAIN_BATCHES])
    train_y = np.concatenate([batches[n][1] for n in TRAIN_BATCHES])
    test_x, test_y = batches["test_batch"]
    return _make_dataset(train_x, train_y, test_x, test_y)


def _read_batches_dir(folder: Path) -> Dataset:
    batches = {}
    for n in [*TRAIN_BATCHES, "test_batch"]:
        if (folder / n).is_file():
            with open(folder / n, "rb") as f:
                batches[n] = _unpickle_batch(f, str(folder / n))
    return _from_batches(batches, str(folder))


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


def _check_sha256sums(path: Path) -> None:
    """Verify an archive against a ``SHA256SUMS`` file next to it, when that file lists it."""
    sums_file = path.parent / "SHA256SUMS"
    expected = read_sha256sums(sums_file).get(path.name) if sums_file.is_file() else None
    if expected and file_digest(path, "sha256") != expected:
        raise DataError(f"Checksum mismatch for {path} (sha256 differs from {sums_file}); re-download the archive.")


def _read_tarball(path: Path, verify: bool) -> Dataset:
    if verify and path.name == TARBALL and md5sum(path) != CIFAR10_MD5:
        raise DataError(
            f"Checksum mismatch for {path} (md5 is not {CIFAR10_MD5}); re-download {TARBALL} or pass verify=False for a custom archive."
        )
    batches = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one sequential pass: gzip streams cannot seek cheaply
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in (*TRAIN_BATCHES, "test_batch"):
                    batches[base] = _unpickle_batch(tar.extractfile(member), f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable tar archive ({exc}); re-download {TARBALL}.") from None
    return _from_batches(batches, str(path))


# ---------------------------------------------------------------- image folders


def _split_and_class(parts: list[str]) -> tuple[str, str] | None:
    """``(split, class)`` for a path ending in ``train|test/<class>/<file>``, else ``None``."""
    if len(parts) < 3 or parts[-3] not in ("train", "test") or "__MACOSX" in parts or parts[-1].startswith("."):
        return None
    if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return parts[-3], parts[-2]


def _decode_tree(entries: list[tuple[str, str, str, object]], read: Callable[[object], bytes], where: str) -> Dataset:
    """Decode image entries ``(split, class, sort_name, handle)`` into a dataset."""
    entries.sort(key=lambda e: (e[0], e[1], e[2]))  # deterministic order, independent of the archive
    classes = sorted({c for s, c, _, _ in entries if s == "train"})
    if classes != CIFAR10_CLASSES:
        raise DataError(
            f"{where} has train class folders {classes} but CIFAR-10 needs {CIFAR10_CLASSES}; point --data-dir at the CIFAR-10 image folders."
        )
    label = {c: i for i, c in enumerate(classes)}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "test"):
        items = [e for e in entries if e[0] == split]
        unknown = {c for _, c, _, _ in items} - set(classes)
        if not items or unknown:
            raise DataError(
                f"{where} has no {split} images or unknown {split} classes {sorted(unknown)}; provide train/<class>/ and test/<class>/ folders."
            )
        x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
        for i, (_, _, name, handle) in enumerate(items):
            try:
                with Image.open(io.BytesIO(read(handle))) as im:
                    arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DataError(f"Cannot decode image {name} in {where} ({exc}); replace or remove the file.") from None
            if arr.shape != (32, 32, 3):
                raise DataError(
                    f"Image {name} in {where} is {arr.shape[1]}×{arr.shape[0]}, not 32×32; CIFAR-10 images must be 32×32."
                )
            x[i] = arr
        y = np.array([label[c] for _, c, _, _ in items], dtype=np.int64)
        out[split] = (x.transpose(0, 3, 1, 2), y)  # HWC -> CHW
    return _make_dataset(*out["train"], *out["test"])


def _read_tree(root: Path) -> Dataset:
    entries = []
    for path in source_files(Source("tree", root)):
        sc = _split_and_class(list(path.relative_to(root).parts))
        if sc:
            entries.append((*sc, str(path), path))
    return _decode_tree(entries, Path.read_bytes, str(root))


def _read_zip(path: Path) -> Dataset:
    try:
        with zipfile.ZipFile(path) as zf:
            entries = []
            for info in zf.infolist():
                sc = _split_and_class(info.filename.split("/"))
                if sc and not info.is_dir():
                    entries.append((*sc, info.filename, info))
            return _decode_tree(entries, zf.read, str(path))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(
            f"{path} is not a readable zip archive ({exc}); re-download it or pass another --data-dir."
        ) from None


# ---------------------------------------------------------------- assembling


def _make_dataset(train_x, train_y, test_x, test_y) -> Dataset:
    train_x = torch.from_numpy(np.ascontiguousarray(train_x))
    mean, std = channel_stats(train_x)  # from the data actually loaded (JPEG copies differ slightly)
    return Dataset(
        name="cifar10",
        train_x=train_x,
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
        classes=list(CIFAR10_CLASSES),
        mean=mean,
        std=std,
    )


def decode_source(source: Source, verify: bool = True) -> Dataset:
    """Decode ``source`` from scratch (no cache)."""
    if verify and source.path.is_file():
        _check_sha256sums(source.path)
    readers = {
        "tarball": lambda p: _read_tarball(p, verify),
        "batches": _read_batches_dir,
        "tree": _read_tree,
        "zip": _read_zip,
    }
    return readers[source.kind](source.path)


def load_cifar10(
    data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | bool | None = None, verify: bool = True
) -> Dataset:
    """Locate, decode (first time only) and return CIFAR-10.

    ``cache_dir=None`` uses :func:`~laperm.data.cache.default_cache_dir`;
    ``cache_dir=False`` disables caching.
    """
    source = locate_cifar10(data_dir)
    if cache_dir is False:
        return decode_source(source, verify)
    cache_root = cache.default_cache_dir() if cache_dir in (None, True) else Path(cache_dir).expanduser()
    # A verified archive gets its own entry so verify=False can never vouch for verify=True.
    tag = f"cifar10:{source.kind}:{'verified' if verify and source.path.is_file() else ''}"
    entry = cache.cache_path(cache_root, "cifar10", cache.fingerprint(source_files(source), tag))
    ds = cache.load_cached(entry)
    if ds is None:
        ds = decode_source(source, verify)
        cache.save_cached(entry, ds)
    return ds


def download_cifar10(dest: str | os.PathLike | None = None, url: str = CIFAR10_URL, timeout: float = 60.0) -> Path:
    """Download the official tarball into ``dest`` (default: the cache's ``cifar10`` folder) and return its path."""
    dest = Path(dest).expanduser() if dest is not None else cache.default_cache_dir() / "cifar10"
    target = dest / TARBALL
    if target.is_file() and md5sum(target) == CIFAR10_MD5:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=TARBALL, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, f, 1 << 20)
        if md5sum(Path(tmp)) != CIFAR10_MD5:
            raise DataError(
                f"Downloaded {url} but its md5 is not {CIFAR10_MD5}; retry later or download {TARBALL} by hand."
            )
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
        raise DataError(
            f"Could not download CIFAR-10 from {url} ({exc}); check the internet connection, or fetch {TARBALL} elsewhere and pass --data-dir or set {ENV_VAR}."
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
