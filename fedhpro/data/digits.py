"""scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits, offline.

The 0..16 intensities are rescaled to uint8 0..255 so that every image dataset
shares one input convention. The split is a fixed, stratified 80/20 split
(seed 0), independent of the run seed, so every run sees the same test set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedhpro.errors import ConfigError
from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.lazy import lazy_module

torch = lazy_module("torch")


SIZE, CLASSES = 1797, 10  # load_digits: samples and classes


def check_options(options: Mapping[str, Any]) -> None:
    """A stratified split needs at least one sample of each class on each side: ceil(f * 1797) >= 10 test and
    1797 - ceil(f * 1797) >= 10 training samples (scikit-learn's own error names `test_size` and counts)."""
    f = options.get("test_fraction", 0.2)
    n_test = math.ceil(f * SIZE)
    if n_test < CLASSES or SIZE - n_test < CLASSES:
        low, high = (CLASSES - 1) / SIZE, (SIZE - CLASSES) / SIZE
        raise ConfigError(f"config key 'dataset_options.test_fraction' ({f}) leaves {n_test} test and "
                          f"{SIZE - n_test} training samples of digits' {SIZE}; a stratified split needs at least "
                          f"{CLASSES} (one per class) on each side: use a value in ({low:.4f}, {high:.4f}]")


def load_digits_data(root: Path | None = None, test_fraction: float = 0.2) -> ArrayData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_options({"test_fraction": test_fraction})
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N x 1 x 8 x 8
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=0, stratify=labels)
    train_idx.sort()
    test_idx.sort()
    mean = float(images[train_idx].mean() / 255.0)
    std = float(images[train_idx].std() / 255.0)
    return ArrayData(
        train_x=torch.from_numpy(images[train_idx]), train_y=torch.from_numpy(labels[train_idx]),
        test_x=torch.from_numpy(images[test_idx]), test_y=torch.from_numpy(labels[test_idx]),
        num_classes=10, mean=(mean,), std=(std,), class_names=tuple(str(d) for d in range(10)),
    )


register(DatasetSpec(name="digits", num_classes=10, loader=load_digits_data, default_model="cnn",
                     default_augment="none", train_size=1437, check_options=check_options,
                     description="scikit-learn load_digits, 8x8 grey, 1437 train / 360 test"))
