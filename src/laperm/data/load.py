"""``load_dataset``: one entry point for every dataset name."""

from __future__ import annotations

import os

from .cifar import load_cifar10
from .dataset import Dataset
from .errors import DataError
from .idx import FASHION_MNIST_CLASSES, MNIST_DIR, load_idx_dir
from .synthetic import synthetic_dataset

DATASETS = ("mnist", "fashion-mnist", "idx", "cifar10", "synthetic", "synthetic-cifar")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    verify: bool = True,
    **options,
) -> Dataset:
    """Load a dataset by name.

    * ``"mnist"``: the bundled files, or an MNIST-format IDX folder ``data_dir``.
    * ``"fashion-mnist"`` / ``"idx"``: an MNIST-format IDX folder ``data_dir``.
    * ``"cifar10"``: see :mod:`laperm.data.cifar` (searched, decoded once, cached in ``cache_dir``).
    * ``"synthetic"`` (1×28×28) / ``"synthetic-cifar"`` (3×32×32): generated;
      ``options`` go to :func:`synthetic_dataset` (``n_train``, ``n_test``, ``seed``, ...).

    ``verify`` checks the SHA256SUMS / md5 checksums where available.
    """
    key = name.lower()
    if options and not key.startswith("synthetic"):
        raise TypeError(f"dataset {name!r} takes no extra options, got {sorted(options)}")
    if key == "mnist":
        return load_idx_dir(data_dir if data_dir is not None else MNIST_DIR, "mnist", verify=verify)
    if key in ("fashion-mnist", "idx"):
        if data_dir is None:
            raise DataError(f"Dataset {name!r} is not bundled; pass --data-dir pointing to its MNIST-format IDX files.")
        classes = FASHION_MNIST_CLASSES if key == "fashion-mnist" else None
        return load_idx_dir(data_dir, key, classes=classes, verify=verify)
    if key == "cifar10":
        return load_cifar10(data_dir, cache_dir=cache_dir, verify=verify)
    if key == "synthetic":
        return synthetic_dataset(**{"name": "synthetic", **options})
    if key == "synthetic-cifar":
        return synthetic_dataset(**{"name": "synthetic-cifar", "shape": (3, 32, 32), **options})
    raise DataError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
