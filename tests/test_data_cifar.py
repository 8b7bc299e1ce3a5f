"""CIFAR-10 from generated fixtures: tarball, extracted batches, image folders, zip, cache."""

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from laperm.data import CIFAR10_CLASSES, DataError, cifar, download_cifar10, load_dataset


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    # Never touch the real cache or find the real CIFAR-10 by accident.
    monkeypatch.setenv("LAPERM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cifar.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- fixtures


def random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """A tiny cifar-10-batches-py folder and its tarball (3 images per batch, 4 test images)."""
    root = tmp_path_factory.mktemp("pickled")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    xs, ys = [], []
    for i, name in enumerate([*cifar.TRAIN_BATCHES, "test_batch"]):
        n = 4 if name == "test_batch" else 3
        x, y = random_images(n, i), [(i + k) % 10 for k in range(n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": y,
            b"data": x.reshape(n, -1),
            b"filenames": [b"f%d.png" % k for k in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        xs.append(x)
        ys.append(y)
    tarball = root / cifar.TARBALL
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=cifar.BATCHES_DIR)
    expected = (np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.array(ys[5]))
    return root, tarball, expected


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/<class>/*.png (2 per class) and test/<class>/*.png (1 per class), plus a zip of it."""
    root = tmp_path_factory.mktemp("tree") / "cifar10"
    expected = {"train": ([], []), "test": ([], [])}
    for split, per_class in (("train", 2), ("test", 1)):
        for label, cls in enumerate(CIFAR10_CLASSES):
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                img = random_images(1, 100 * label + 10 * k + len(split))[0]
                Image.fromarray(img.transpose(1, 2, 0)).save(root / split / cls / f"{k:04d}.png")
                expected[split][0].append(img)
                expected[split][1].append(label)
    archive = root.parent / "cifar10-png.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*.png")):  # nested under a top folder, as zips often are
            zf.write(path, f"cifar10/{path.relative_to(root)}")
        zf.writestr("__MACOSX/cifar10/train/cat/._0000.png", b"junk")
    return root, archive, {s: (np.stack(x), np.array(y)) for s, (x, y) in expected.items()}


def assert_matches(ds, train_x, train_y, test_x, test_y):
    assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES and ds.input_shape == (3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert np.array_equal(ds.train_x.numpy(), train_x) and np.array_equal(ds.train_y.numpy(), train_y)
    assert np.array_equal(ds.test_x.numpy(), test_x) and np.array_equal(ds.test_y.numpy(), test_y)
    # mean/std are computed from the loaded training images
    x = ds.train_x.double() / 255
    assert ds.mean == pytest.approx(tuple(x.mean((0, 2, 3)).tolist()))
    assert ds.std == pytest.approx(tuple(x.std((0, 2, 3), correction=0).tolist()))


# ---------------------------------------------------------------- sources


def test_tarball_loads_without_md5(pickled):
    root, tarball, expected = pickled
    assert_matches(load_dataset("cifar10", data_dir=tarball, verify=False), *expected)


def test_tarball_md5_checked(pickled):
    with pytest.raises(DataError, match="Checksum mismatch.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=pickled[1])


def test_custom_tarball_name_skips_md5(pickled, tmp_path):
    renamed = tmp_path / "my-cifar.tar.gz"
    renamed.write_bytes(pickled[1].read_bytes())
    assert_matches(load_dataset("cifar10", data_dir=renamed), *pickled[2])


def test_batches_folder_and_parent_folder(pickled):
    root, _, expected = pickled
    # root holds both the folder and the tarball: the extracted folder wins, no md5 needed
    assert_matches(load_dataset("cifar10", data_dir=root), *expected)
    assert_matches(load_dataset("cifar10", data_dir=root / cifar.BATCHES_DIR, cache_dir=False), *expected)


def test_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / cifar.BATCHES_DIR
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.getpid, ())  # harmless, but any global besides numpy arrays must be refused

    for name in [*cifar.TRAIN_BATCHES, "test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_1.*not a valid CIFAR-10"):
        load_dataset("cifar10", data_dir=folder)


def test_legacy_numpy_pickles_load(tmp_path, pickled):
    # The official files (pickled by Python 2 / old numpy) name numpy.core.multiarray.
    folder = tmp_path / cifar.BATCHES_DIR
    folder.mkdir()
    for src in (pickled[0] / cifar.BATCHES_DIR).iterdir():
        data = src.read_bytes()
        assert b"numpy._core.multiarray" in data
        (folder / src.name).write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert_matches(load_dataset("cifar10", data_dir=folder, cache_dir=False), *pickled[2])


def test_image_tree_loads_with_labels(tree):
    root, _, expected = tree
    ds = load_dataset("cifar10", data_dir=root)
    assert_matches(ds, *expected["train"], *expected["test"])


def test_zip_of_tree_loads(tree):
    root, archive, expected = tree
    assert_matches(load_dataset("cifar10", data_dir=archive), *expected["train"], *expected["test"])
    # a folder that contains the zip works too
    assert_matches(
        load_dataset("cifar10", data_dir=archive.parent, cache_dir=False), *expected["train"], *expected["test"]
    )


def test_zip_checked_against_sha256sums(tree, tmp_path):
    archive = tmp_path / "cifar10-png.zip"
    archive.write_bytes(tree[1].read_bytes())
    (tmp_path / "SHA256SUMS").write_text(f"{'ab' * 32}  cifar10-png.zip\n")
    with pytest.raises(DataError, match="Checksum mismatch for .*cifar10-png.zip"):
        load_dataset("cifar10", data_dir=archive)
    assert load_dataset("cifar10", data_dir=archive, verify=False).num_classes == 10
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  cifar10-png.zip\n")
    assert load_dataset("cifar10", data_dir=tmp_path).num_classes == 10


def test_env_var_is_used(tree, monkeypatch):
    monkeypatch.setenv(cifar.ENV_VAR, str(tree[1]))
    assert len(load_dataset("cifar10").train_y) == 20


def test_bad_zip(tmp_path):
    (tmp_path / "cifar10.zip").write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataError, match="cifar10.zip is not a readable zip"):
        load_dataset("cifar10", data_dir=tmp_path / "cifar10.zip")


def test_wrong_classes_and_sizes(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "dogs").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / split / "dogs" / "a.png")
    with pytest.raises(DataError, match="class folders"):
        load_dataset("cifar10", data_dir=tmp_path)
    for cls in CIFAR10_CLASSES:
        for split in ("train", "test"):
            (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("L", (32, 32)).save(tmp_path / split / cls / "a.png")  # grayscale is converted
    (tmp_path / "train" / "dogs" / "a.png").unlink()
    (tmp_path / "test" / "dogs" / "a.png").unlink()
    Image.new("RGB", (30, 32)).save(tmp_path / "test" / "cat" / "b.png")
    with pytest.raises(DataError, match="b.png.*not 32×32"):
        load_dataset("cifar10", data_dir=tmp_path)


# ---------------------------------------------------------------- cache, missing data, download


def test_cache_hit_skips_decoding(tree, tmp_path, monkeypatch):
    calls = []
    decode = cifar.decode_source
    monkeypatch.setattr(cifar, "decode_source", lambda *a, **k: calls.append(1) or decode(*a, **k))
    archive = tmp_path / "copy.zip"
    archive.write_bytes(tree[1].read_bytes())
    first = load_dataset("cifar10", data_dir=archive, cache_dir=tmp_path / "c")
    second = load_dataset("cifar10", data_dir=archive, cache_dir=tmp_path / "c")
    assert len(calls) == 1 and torch.equal(first.train_x, second.train_x) and first.mean == second.mean
    assert len(list((tmp_path / "c").glob("cifar10-*.pt"))) == 1
    assert not list((tmp_path / "c").glob("*.tmp"))  # atomic write left no temp file
    os.utime(archive, ns=(0, 0))  # a changed source invalidates the entry
    load_dataset("cifar10", data_dir=archive, cache_dir=tmp_path / "c")
    assert len(calls) == 2


def test_corrupt_cache_is_rebuilt(tree, tmp_path):
    load_dataset("cifar10", data_dir=tree[1], cache_dir=tmp_path / "c")
    (entry,) = (tmp_path / "c").glob("cifar10-*.pt")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        ds = load_dataset("cifar10", data_dir=tree[1], cache_dir=tmp_path / "c")
    assert len(ds.test_y) == 10
    assert load_dataset("cifar10", data_dir=tree[1], cache_dir=tmp_path / "c").num_classes == 10


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"not found \(looked in .*cache.*cifar10\).*--data-dir.*LAPERM_CIFAR10"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="nowhere"):
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")


def test_download_without_internet(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="Could not download CIFAR-10.*no network"):
        download_cifar10(tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []  # no partial file left behind


def test_download_rejects_bad_md5(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not the tarball"))
    with pytest.raises(DataError, match="md5"):
        download_cifar10(tmp_path / "dl")
    assert not (tmp_path / "dl" / cifar.TARBALL).exists()
