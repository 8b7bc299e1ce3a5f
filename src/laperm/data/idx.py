"""Reading IDX files (the MNIST format) and whole MNIST-style directories."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch

from .checksums import read_sha256sums
from .dataset import Dataset
from .errors import DataError

# IDX type byte -> big-endian numpy dtype (from the format description on yann.lecun.com).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The four files of an MNIST-format directory, by role.
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

MNIST_DIR = Path(__file__).resolve().parent / "mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of one IDX file into a numpy array (native byte order).

    Checks the magic number, the dimensions and that the payload size matches,
    so truncated or corrupt files fail loudly instead of giving garbage.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{name} is not an IDX file (bad magic number); re-download it or point --data-dir at a valid MNIST-format directory."
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated (incomplete IDX header); re-download it.")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{name} has {len(data)} bytes but its IDX header {dims} implies {expected}, so it is truncated or corrupt; re-download it."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(directory: Path, base: str) -> Path:
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Missing {base}[.gz] in {directory}; pass --data-dir pointing to a directory with the four MNIST-format IDX files."
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes())
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises all three for damaged files
        raise DataError(f"Could not read {path} ({exc}); re-download the file.") from None


def load_idx_dir(directory: str | Path, name: str, classes: list[str] | None = None, verify: bool = True) -> Dataset:
    """Load the four IDX files of an MNIST-format directory into a :class:`Dataset`.

    Files may be gzipped or raw.  When the directory has a ``SHA256SUMS`` file
    (listing the *decompressed* files) and ``verify`` is true, each file is
    checked against it.  Normalisation is plain ``x / 255`` (mean 0, std 1),
    as in the Keras code of the LaPerm paper.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"{directory} is not a directory; pass --data-dir pointing to a directory with the four MNIST-format IDX files."
        )
    sums_file = directory / "SHA256SUMS"
    sums = read_sha256sums(sums_file) if verify and sums_file.is_file() else {}
    arrays = {}
    for role, base in IDX_FILES.items():
        path = _find(directory, base)
        data = _read_bytes(path)
        if base in sums and hashlib.sha256(data).hexdigest() != sums[base]:
            raise DataError(f"Checksum mismatch for {path} (sha256 differs from {sums_file}); re-download the file.")
        arrays[role] = parse_idx(data, str(path))
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"The {split} IDX files in {directory} do not form uint8 N×H×W images with N labels (got {x.dtype} {x.shape} and {y.shape}); check the files."
            )
    num_classes = int(max(arrays["train_y"].max(initial=0), arrays["test_y"].max(initial=0))) + 1
    classes = classes or [str(i) for i in range(num_classes)]
    if num_classes > len(classes):
        raise DataError(
            f"Labels in {directory} go up to {num_classes - 1} but {name} has {len(classes)} classes; check the files."
        )
    # torch.from_numpy shares memory; the arrays are fresh copies, so that is safe.
    return Dataset(
        name=name,
        train_x=torch.from_numpy(arrays["train_x"]).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"]).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        classes=list(classes),
        mean=(0.0,),
        std=(1.0,),
    )


def write_idx(array: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` as an IDX file (gzipped if ``path`` ends in ``.gz``); handy for fixtures."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path
