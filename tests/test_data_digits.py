"""Dataset `digits` reads scikit-learn's digits file and draws its stratified split without importing scikit-learn
(about 2 s of every training process): both must equal scikit-learn's own `load_digits` and `train_test_split`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedhpro.data.digits import digits_csv, load_digits_data, stratified_split


def reference(test_fraction: float):
    """What the loader computed with scikit-learn itself (the code before it read the file directly)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=0,
                                           stratify=labels)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def test_the_file_is_load_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = digits_csv()
    assert np.array_equal(data[:, :-1], bunch.data) and np.array_equal(data[:, -1].astype(int), bunch.target)


@pytest.mark.parametrize("fraction", [0.0056, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.9, 0.9944])
def test_the_split_is_train_test_splits(fraction):
    images, labels, train_idx, test_idx = reference(fraction)
    ours_train, ours_test = stratified_split(labels, fraction, seed=0)
    assert np.array_equal(ours_train, train_idx) and np.array_equal(ours_test, test_idx)
    assert ours_train.dtype == train_idx.dtype == np.int64


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_the_split_follows_train_test_split_for_other_labels_and_seeds(fraction):
    from sklearn.model_selection import train_test_split

    other = np.random.default_rng(7).integers(0, 4, 203)  # unequal classes: ties broken by the random draws
    for seed in (1, 5):
        train, test = train_test_split(np.arange(203), test_size=fraction, random_state=seed, stratify=other)
        ours = stratified_split(other, fraction, seed=seed)
        assert np.array_equal(ours[0], np.sort(train)) and np.array_equal(ours[1], np.sort(test))
    assert not np.array_equal(stratified_split(other, fraction, seed=1)[1], stratified_split(other, fraction, seed=5)[1])


def test_the_loader_gives_the_same_arrays_as_with_scikit_learn():
    images, labels, train_idx, test_idx = reference(0.2)
    data = load_digits_data(None)
    assert torch.equal(data.train_x, torch.from_numpy(images[train_idx]))
    assert torch.equal(data.test_x, torch.from_numpy(images[test_idx]))
    assert torch.equal(data.train_y, torch.from_numpy(labels[train_idx]))
    assert torch.equal(data.test_y, torch.from_numpy(labels[test_idx]))
    assert data.mean == (float(images[train_idx].mean() / 255.0),) and data.std == (float(images[train_idx].std() / 255.0),)


def test_loading_digits_imports_no_scikit_learn():
    code = ("import sys; from fedhpro.data import load_dataset; d = load_dataset('digits'); "
            "print(len(d.train_y), len(d.test_y), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1437", "360", "False"]
