"""load_dataset, Dataset and the bundled MNIST / synthetic datasets."""

import pytest
import torch

from laperm.data import DataError, Dataset, channel_stats, load_dataset, synthetic_dataset
from laperm.data.idx import IDX_FILES, MNIST_DIR, read_sha256sums


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    # Decompress + verify the bundled files once for the whole module (~0.3 s).
    return load_dataset("mnist")


def test_bundled_mnist_shapes_and_dtypes(mnist):
    assert (len(mnist.train_x), len(mnist.test_x)) == (60000, 10000)
    assert mnist.train_x.shape == (60000, 1, 28, 28) and mnist.train_x.dtype == torch.uint8
    assert mnist.test_x.shape == (10000, 1, 28, 28) and mnist.test_x.dtype == torch.uint8
    assert mnist.train_y.dtype == torch.int64 and mnist.test_y.shape == (10000,)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert (mnist.mean, mnist.std) == ((0.0,), (1.0,))  # plain x/255, as the paper's Keras code
    # Well-known first labels of MNIST: catches byte-order or offset mistakes.
    assert mnist.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert mnist.train_y.bincount().min() > 5000


def test_bundled_checksums_cover_every_file():
    # Verification during the load above is only meaningful if every file is listed.
    assert set(read_sha256sums(MNIST_DIR / "SHA256SUMS")) == set(IDX_FILES.values())


def test_unknown_name_lists_choices():
    with pytest.raises(DataError, match="cifar10.*synthetic"):
        load_dataset("imagenet")


def test_options_only_for_synthetic():
    with pytest.raises(TypeError):
        load_dataset("mnist", n_train=10)


def test_idx_dataset_needs_data_dir():
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("fashion-mnist")


def test_synthetic_is_seeded_and_shaped():
    a = load_dataset("synthetic", n_train=100, n_test=50, seed=3)
    b = synthetic_dataset(n_train=100, n_test=50, seed=3)
    c = synthetic_dataset(n_train=100, n_test=50, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (100, 1, 28, 28) and a.train_x.dtype == torch.uint8
    assert a.train_y.bincount().tolist() == [10] * 10
    s = load_dataset("synthetic-cifar", n_train=20, n_test=10)
    assert s.input_shape == (3, 32, 32) and len(s.mean) == len(s.std) == 3


def test_synthetic_is_learnable():
    # A nearest-centroid classifier stands in for "a tiny model learns it".
    ds = synthetic_dataset(n_train=300, n_test=200, seed=0)
    xtr, xte = ds.train_x.flatten(1).float(), ds.test_x.flatten(1).float()
    centroids = torch.stack([xtr[ds.train_y == k].mean(0) for k in range(10)])
    pred = torch.cdist(xte, centroids).argmin(1)
    assert (pred == ds.test_y).float().mean() > 0.9


def test_channel_stats_exact():
    x = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).view(1, 1, 2, 2).repeat(3, 2, 1, 1)
    x[:, 1] = 51  # channel 1 constant 0.2
    mean, std = channel_stats(x, chunk=2)
    assert mean == pytest.approx((0.5, 0.2)) and std == pytest.approx((0.5, 0.0), abs=1e-7)


def test_dataset_repr_is_short():
    assert "input_shape=(1, 28, 28)" in repr(synthetic_dataset(n_train=10, n_test=10))
