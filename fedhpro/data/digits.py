"""scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits, offline.

The 0..16 intensities are rescaled to uint8 0..255 so that every image dataset
shares one input convention. The split is a fixed, stratified 80/20 split
(seed 0), independent of the run seed, so every run sees the same test set.
"""

from __future__ import annotations

import gzip
import importlib.util
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


def digits_csv() -> np.ndarray:
    """scikit-learn's ``digits.csv.gz`` (64 pixels and the label per row), read exactly as `load_digits` reads it,
    but without importing scikit-learn: that import costs about 2 s of every training process on digits (the
    quick pipeline's runs, most tests), more than torch's. The file ships inside the installed package."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-learn is not installed; dataset 'digits' is its load_digits")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as fh:
        return np.loadtxt(fh, delimiter=",")


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's `utils.extmath._approximate_mode` (1.9): per-class draws closest to the class shares,
    ties broken by `rng`."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The sorted train and test indices of scikit-learn's ``train_test_split(np.arange(n), test_size=f,
    random_state=seed, stratify=labels)`` (StratifiedShuffleSplit, 1.9), the same random draws in the same order;
    tests/test_data_digits.py checks it against scikit-learn itself for many fractions."""
    n_test = math.ceil(test_fraction * len(labels))
    n_train = len(labels) - n_test
    _, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(class_indices):
        drawn = members.take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(drawn[: n_i[i]])
        test.extend(drawn[n_i[i]: n_i[i] + t_i[i]])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def load_digits_data(root: Path | None = None, test_fraction: float = 0.2) -> ArrayData:
    check_options({"test_fraction": test_fraction})
    data = digits_csv()
    images = np.rint(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N x 1 x 8 x 8
    labels = data[:, -1].astype(np.int64)  # load_digits' astype(int), int64 here
    train_idx, test_idx = stratified_split(labels, test_fraction, seed=0)
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
