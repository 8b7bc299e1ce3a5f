"""IDX parsing and MNIST-format directories built from small fixtures."""

import gzip
import hashlib

import numpy as np
import pytest
import torch

from laperm.data import DataError, load_dataset, parse_idx, write_idx
from laperm.data.idx import IDX_FILES


def make_idx_dir(root, gz: bool, n_train=6, n_test=4, seed=0):
    """Write four small MNIST-format files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for role, base in IDX_FILES.items():
        write_idx(arrays[role], root / (base + (".gz" if gz else "")))
    return arrays


def write_sums(root, arrays, wrong=None):
    lines = []
    for base in IDX_FILES.values():
        path = root / base if (root / base).exists() else root / f"{base}.gz"
        data = path.read_bytes()
        data = gzip.decompress(data) if path.suffix == ".gz" else data
        digest = "0" * 64 if base == wrong else hashlib.sha256(data).hexdigest()
        lines.append(f"{digest}  {base}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dir_loads(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz)
    write_sums(tmp_path, arrays)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.train_x.shape == (6, 1, 5, 4) and ds.train_x.dtype == torch.uint8
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train_x"])
    assert np.array_equal(ds.test_y.numpy(), arrays["test_y"]) and ds.test_y.dtype == torch.int64
    assert load_dataset("idx", data_dir=tmp_path).name == "idx"


def test_fashion_mnist_class_names(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    assert load_dataset("fashion-mnist", data_dir=tmp_path).classes[0] == "T-shirt/top"


def test_parse_idx_other_dtypes():
    a = np.arange(-3, 9, dtype=np.int32).reshape(3, 4)
    data = bytes([0, 0, 0x0C, 2]) + np.array([3, 4], ">u4").tobytes() + a.astype(">i4").tobytes()
    assert np.array_equal(parse_idx(data), a)


def test_checksum_mismatch_names_file(tmp_path):
    arrays = make_idx_dir(tmp_path, gz=True)
    write_sums(tmp_path, arrays, wrong="t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="Checksum mismatch.*t10k-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)
    load_dataset("mnist", data_dir=tmp_path, verify=False)  # explicit opt-out still works


def test_truncated_file_names_file(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00", b"PK\x03\x04junk", b"\x00\x00\x08\x03\x00\x00"])
def test_corrupt_headers(payload):
    with pytest.raises(DataError, match="bad.idx"):
        parse_idx(payload, "bad.idx")


def test_corrupt_gzip(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_file_and_dir(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*--data-dir"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", data_dir=tmp_path / "nope")


def test_mismatched_counts(tmp_path):
    arrays = make_idx_dir(tmp_path, gz=False)
    write_idx(arrays["train_y"][:-1], tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match="train IDX files"):
        load_dataset("mnist", data_dir=tmp_path)
