"""Datasets, splits, batching and augmentation for laperm.

Images are kept as uint8 N×C×H×W tensors; :class:`BatchLoader` turns them
into normalised float batches ``(x/255 - mean)/std`` on the target device.
"""

from .augment import (
    PRESETS,
    Augment,
    make_augment,
    random_affine,
    random_hflip,
    random_rotate,
    random_shift,
    random_zoom,
)
from .cache import default_cache_dir
from .cifar import CIFAR10_CLASSES, download_cifar10, load_cifar10, locate_cifar10
from .dataset import Dataset, channel_stats
from .errors import DataError
from .idx import load_idx_dir, parse_idx, write_idx
from .load import DATASETS, load_dataset
from .loader import BatchLoader, derive_seed, normalize
from .split import random_subset, train_val_split
from .synthetic import synthetic_dataset

__all__ = [
    "Augment",
    "BatchLoader",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DataError",
    "Dataset",
    "PRESETS",
    "channel_stats",
    "default_cache_dir",
    "derive_seed",
    "download_cifar10",
    "load_cifar10",
    "load_dataset",
    "load_idx_dir",
    "locate_cifar10",
    "make_augment",
    "normalize",
    "parse_idx",
    "random_affine",
    "random_hflip",
    "random_rotate",
    "random_shift",
    "random_subset",
    "random_zoom",
    "synthetic_dataset",
    "train_val_split",
    "write_idx",
]
