"""Tests for fedhpro.partition.

The creff scheme is checked against a literal transcription of the official
FedHPro / CReFF code (mala-lab/FedHPro utils/long_tailed_setting.py,
utils/sample_dirichlet.py, main_run.py), written below with Python lists of
tuples, the resampling while loop, functools.reduce and partition_balance.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhpro.partition import (
    CREFF_MAX_DRAWS,
    MAX_ATTEMPTS,
    LABEL_ALGORITHMS,
    client_class_counts,
    format_count_table,
    load_partition,
    long_tail_counts,
    main,
    partition_labels,
    save_partition,
)

REPO = Path(__file__).resolve().parents[1]


# ============================================================================
# Reference: the official code, transcribed literally
# ============================================================================
def ref_classify_label(labels, num_classes):
    list1 = [[] for _ in range(num_classes)]
    for idx, label in enumerate(labels.tolist()):
        list1[label].append(idx)
    return list1


def ref_label_indices2indices(list_label2indices):
    indices_res = []
    for indices in list_label2indices:
        indices_res.extend(indices)
    return indices_res


def ref_get_img_num_per_cls(list_label2indices_train, num_classes, imb_factor, imb_type):
    img_max = len(list_label2indices_train) / num_classes
    img_num_per_cls = []
    if imb_type == "exp":
        for _classes_idx in range(num_classes):
            num = img_max * (imb_factor ** (_classes_idx / (num_classes - 1.0)))
            img_num_per_cls.append(int(num))
    return img_num_per_cls


def ref_train_long_tail(list_label2indices_train, num_classes, imb_factor, imb_type, shuffle):
    # `shuffle` stands in for np.random.shuffle after np.random.seed(seed)
    new_list_label2indices_train = ref_label_indices2indices(copy.deepcopy(list_label2indices_train))
    img_num_list = ref_get_img_num_per_cls(copy.deepcopy(new_list_label2indices_train), num_classes,
                                           imb_factor, imb_type)
    list_clients_indices = []
    classes = list(range(num_classes))
    for _class, _img_num in zip(classes, img_num_list):
        indices = list_label2indices_train[_class]
        shuffle(indices)
        idx = indices[:_img_num]
        list_clients_indices.append(idx)
    return img_num_list, list_clients_indices


def ref_partition_balance(idxs, num_split: int):
    num_per_part, r = len(idxs) // num_split, len(idxs) % num_split
    parts = []
    i, r_used = 0, 0
    while i < len(idxs):
        if r_used < r:
            parts.append(idxs[i:(i + num_per_part + 1)])
            i += num_per_part + 1
            r_used += 1
        else:
            parts.append(idxs[i:(i + num_per_part)])
            i += num_per_part
    return parts


def ref_build_non_iid_by_dirichlet(seed, indices2targets, non_iid_alpha, num_classes, num_indices, n_workers):
    random_state = np.random.RandomState(seed)
    n_auxi_workers = 10
    assert n_auxi_workers <= n_workers
    random_state.shuffle(indices2targets)
    from_index = 0
    splitted_targets = []
    num_splits = math.ceil(n_workers / n_auxi_workers)
    split_n_workers = [
        n_auxi_workers if idx < num_splits - 1 else n_workers - n_auxi_workers * (num_splits - 1)
        for idx in range(num_splits)
    ]
    split_ratios = [_n_workers / n_workers for _n_workers in split_n_workers]
    for idx, _ in enumerate(split_ratios):
        to_index = from_index + int(n_auxi_workers / n_workers * num_indices)
        splitted_targets.append(
            indices2targets[from_index: (num_indices if idx == num_splits - 1 else to_index)]
        )
        from_index = to_index

    idx_batch = []
    for _targets in splitted_targets:
        _targets = np.array(_targets)
        _targets_size = len(_targets)
        _n_workers = min(n_auxi_workers, n_workers)
        n_workers = n_workers - n_auxi_workers
        min_size = 0
        _idx_batch = None
        while min_size < int(0.50 * _targets_size / _n_workers):
            _idx_batch = [[] for _ in range(_n_workers)]
            for _class in range(num_classes):
                idx_class = np.where(_targets[:, 1] == _class)[0]
                idx_class = _targets[idx_class, 0]
                try:
                    proportions = random_state.dirichlet(np.repeat(non_iid_alpha, _n_workers))
                    proportions = np.array(
                        [p * (len(idx_j) < _targets_size / _n_workers)
                         for p, idx_j in zip(proportions, _idx_batch)]
                    )
                    proportions = proportions / proportions.sum()
                    proportions = (np.cumsum(proportions) * len(idx_class)).astype(int)[:-1]
                    _idx_batch = [idx_j + idx.tolist()
                                  for idx_j, idx in zip(_idx_batch, np.split(idx_class, proportions))]
                    sizes = [len(idx_j) for idx_j in _idx_batch]
                    min_size = min([_size for _size in sizes])
                except ZeroDivisionError:
                    pass
        if _idx_batch is not None:
            idx_batch += _idx_batch
    return idx_batch


def ref_clients_indices(list_label2indices, num_classes, num_clients, non_iid_alpha, seed=None):
    indices2targets = []
    for label, indices in enumerate(list_label2indices):
        for idx in indices:
            indices2targets.append((idx, label))
    batch_indices = ref_build_non_iid_by_dirichlet(seed=seed, indices2targets=indices2targets,
                                                   non_iid_alpha=non_iid_alpha, num_classes=num_classes,
                                                   num_indices=len(indices2targets), n_workers=num_clients)
    indices_dirichlet = functools.reduce(lambda x, y: x + y, batch_indices)
    return ref_partition_balance(indices_dirichlet, num_clients)


def ref_creff(labels, num_classes, num_clients, alpha, imb_factor, seed, shuffle=None):
    """main_run.py: np.random.seed(seed); train_long_tail(...); clients_indices(...)."""
    if shuffle is None:
        shuffle = np.random.RandomState(seed).shuffle  # == np.random.seed(seed); np.random.shuffle
    list_label2indices = ref_classify_label(labels, num_classes)
    with np.errstate(all="ignore"):
        _, lt = ref_train_long_tail(copy.deepcopy(list_label2indices), num_classes, imb_factor, "exp", shuffle)
        return ref_clients_indices(copy.deepcopy(lt), num_classes, num_clients, alpha, seed)


# ============================================================================
# Fixtures / helpers
# ============================================================================
@pytest.fixture(scope="module")
def cifar10_labels():
    """CIFAR-10 class sizes (5000 each), in a fixed shuffled order."""
    return np.random.RandomState(20240601).permutation(np.repeat(np.arange(10), 5000))


@pytest.fixture(scope="module")
def small_labels():
    return np.random.RandomState(3).permutation(np.repeat(np.arange(10), 500))


def assert_same(parts, ref_parts):
    assert len(parts) == len(ref_parts)
    for p, r in zip(parts, ref_parts):
        assert p.dtype == np.int64
        np.testing.assert_array_equal(p, np.asarray(r, dtype=np.int64))


def assert_disjoint_valid(parts, n):
    flat = np.concatenate(parts)
    assert flat.dtype == np.int64
    assert len(np.unique(flat)) == len(flat), "an index is used twice"
    assert flat.min() >= 0 and flat.max() < n
    return flat


def skew(labels, parts, num_classes):
    """Mean over clients of the largest class share (1/C when balanced, 1 when one class)."""
    counts = client_class_counts(labels, parts, num_classes)
    sizes = counts.sum(axis=1)
    return float(np.mean(counts.max(axis=1)[sizes > 0] / sizes[sizes > 0]))


SCHEME_KW = {
    "creff": dict(alpha=0.5),
    "dirichlet": dict(alpha=0.5),
    "pathological": dict(classes_per_client=2),
    "iid": dict(),
}


# ============================================================================
# creff: bit-compatibility with the official code
# ============================================================================
def test_randomstate_shuffle_matches_global_and_list_shuffle():
    state = np.random.get_state()
    try:
        for seed in (0, 536, 2024):
            np.random.seed(seed)
            a = list(range(777))
            np.random.shuffle(a)  # official: global RNG on a Python list
            b = np.arange(777)
            np.random.RandomState(seed).shuffle(b)  # ours: own RandomState on an int array
            c = [(i, i % 7) for i in range(777)]
            np.random.RandomState(seed).shuffle(c)  # list of tuples
            assert a == b.tolist() == [i for i, _ in c]
    finally:
        np.random.set_state(state)


def test_reference_with_global_rng_equals_randomstate_reference(small_labels):
    """The transcription run exactly as main_run.py does (global np.random.seed) agrees."""
    state = np.random.get_state()
    try:
        np.random.seed(536)
        glob = ref_creff(small_labels, 10, 10, 0.5, 0.1, 536, shuffle=np.random.shuffle)
    finally:
        np.random.set_state(state)
    assert glob == ref_creff(small_labels, 10, 10, 0.5, 0.1, 536)
    assert_same(partition_labels(small_labels, scheme="creff", num_clients=10, seed=536, alpha=0.5,
                                 imbalance_ratio=10), glob)


@pytest.mark.parametrize("seed", [0, 1, 536, 2024, 12345])
def test_creff_matches_official_cifar10_rho100(cifar10_labels, seed):
    parts = partition_labels(cifar10_labels, scheme="creff", num_clients=10, seed=seed, alpha=0.5,
                             imbalance_ratio=100)
    assert_same(parts, ref_creff(cifar10_labels, 10, 10, 0.5, 0.01, seed))
    assert [len(p) for p in parts] == [1241] * 6 + [1240] * 4  # 12406 = 6 * 1241 + 4 * 1240
    counts = client_class_counts(cifar10_labels, parts, 10)
    assert counts.sum(axis=0).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert counts.sum() == 12406
    assert_disjoint_valid(parts, len(cifar10_labels))


@pytest.mark.parametrize("seed,alpha,clients,rho", [
    (0, 0.2, 10, 100),
    (536, 0.5, 20, 100),
    (536, 0.5, 15, 100),   # uneven last group: 10 + 5 workers
    (7, 0.2, 15, 50),
    (2024, 0.5, 23, 10),   # 10 + 10 + 3 workers
    (536, 0.5, 10, 1),     # rho = 1: the official long-tail step still shuffles
    (12345, 0.2, 15, 1),
    (2, 0.1, 10, 100),     # small alpha: the official loop needs ~1.2k resampling rounds here
    (3, 100.0, 10, 100),
])
def test_creff_matches_official_more(cifar10_labels, seed, alpha, clients, rho):
    parts = partition_labels(cifar10_labels, scheme="creff", num_clients=clients, seed=seed, alpha=alpha,
                             imbalance_ratio=rho)
    assert_same(parts, ref_creff(cifar10_labels, 10, clients, alpha, 1.0 / rho, seed))
    flat = assert_disjoint_valid(parts, len(cifar10_labels))
    assert len(flat) == sum(long_tail_counts([5000] * 10, rho))


def test_creff_rho_none_is_official_imb_factor_1(cifar10_labels):
    a = partition_labels(cifar10_labels, scheme="creff", num_clients=10, seed=536, alpha=0.5)
    b = partition_labels(cifar10_labels, scheme="creff", num_clients=10, seed=536, alpha=0.5, imbalance_ratio=1)
    assert_same(a, b)
    assert_same(a, ref_creff(cifar10_labels, 10, 10, 0.5, 1.0, 536))
    flat = assert_disjoint_valid(a, len(cifar10_labels))
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(cifar10_labels)))
    assert [len(p) for p in a] == [5000] * 10


def test_creff_matches_official_cifar100_and_unbalanced():
    y100 = np.random.RandomState(5).permutation(np.repeat(np.arange(100), 500))
    parts = partition_labels(y100, scheme="creff", num_clients=20, seed=536, alpha=0.5, imbalance_ratio=100)
    assert_same(parts, ref_creff(y100, 100, 20, 0.5, 0.01, 536))
    assert sum(len(p) for p in parts) == 10847
    # unbalanced raw classes: the official caps use the mean class size
    yu = np.random.RandomState(9).choice(10, size=6000, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())
    for rho in (1, 20):
        parts = partition_labels(yu, scheme="creff", num_clients=12, seed=11, alpha=0.3, imbalance_ratio=rho)
        assert_same(parts, ref_creff(yu, 10, 12, 0.3, 1.0 / rho, 11))
        counts = client_class_counts(yu, parts, 10).sum(axis=0)
        assert counts.tolist() == long_tail_counts(np.bincount(yu, minlength=10), rho)


def test_creff_small_data_dropped_groups_raise():
    # 20 samples, 11 clients: group 0 (18 samples / 10 workers) never enters the while loop, so the
    # official code drops it and returns only 2 parts; we refuse instead of returning < K clients.
    y = np.arange(20) % 2
    assert len(ref_creff(y, 2, 11, 0.5, 1.0, 0)) < 11
    with pytest.raises(ValueError, match="fewer than num_clients"):
        partition_labels(y, scheme="creff", num_clients=11, seed=0, alpha=0.5)


def test_creff_guard_raises_instead_of_hanging(monkeypatch):
    # 2 classes of 10, 10 clients, tiny alpha: each class lands on one client, so at most two
    # clients are non-empty and the official loop (every client >= 1 sample) would never end.
    # The default budget (500k rounds for 2 classes) takes ~30 s to run out; shrink it here.
    assert CREFF_MAX_DRAWS >= 1_000_000 and MAX_ATTEMPTS >= 1000
    monkeypatch.setattr("fedhpro.partition.CREFF_MAX_DRAWS", 2000)
    y = np.repeat([0, 1], 10)
    with pytest.raises(ValueError, match=r"in 1000 attempts; alpha=0\.001 .*num_clients=10"):
        partition_labels(y, scheme="creff", num_clients=10, seed=0, alpha=1e-3)


def test_creff_does_not_touch_global_rng(cifar10_labels):
    np.random.seed(99)
    before = np.random.get_state()[1].copy()
    partition_labels(cifar10_labels, scheme="creff", num_clients=10, seed=1, alpha=0.5, imbalance_ratio=100)
    partition_labels(cifar10_labels, scheme="dirichlet", num_clients=10, seed=1, alpha=0.5, imbalance_ratio=10)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# ============================================================================
# all schemes: determinism, disjointness, coverage
# ============================================================================
# nway (FedProto's n-way k-shot blocks) covers only a few samples per class and takes no long tail: its own
# tests are in tests/test_partition_nway.py
COVERING_SCHEMES = tuple(s for s in LABEL_ALGORITHMS if s != "nway")


@pytest.mark.parametrize("scheme", COVERING_SCHEMES)
def test_deterministic_and_seed_dependent(small_labels, scheme):
    kw = SCHEME_KW[scheme]
    a = partition_labels(small_labels, scheme=scheme, num_clients=12, seed=4, **kw)
    b = partition_labels(small_labels, scheme=scheme, num_clients=12, seed=4, **kw)
    c = partition_labels(small_labels, scheme=scheme, num_clients=12, seed=5, **kw)
    assert len(a) == 12
    assert all(p.dtype == np.int64 for p in a)
    assert_same(a, b)
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("scheme", COVERING_SCHEMES)
def test_disjoint_and_covering(small_labels, scheme):
    parts = partition_labels(small_labels, scheme=scheme, num_clients=12, seed=0, **SCHEME_KW[scheme])
    flat = assert_disjoint_valid(parts, len(small_labels))
    # balanced classes: even creff's rho=1 long-tail step keeps everything
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(small_labels)))


@pytest.mark.parametrize("scheme", COVERING_SCHEMES)
@pytest.mark.parametrize("rho", [10, 100])
def test_imbalance_selection_counts(small_labels, scheme, rho):
    parts = partition_labels(small_labels, scheme=scheme, num_clients=10, seed=2, imbalance_ratio=rho,
                             **SCHEME_KW[scheme])
    assert_disjoint_valid(parts, len(small_labels))
    totals = client_class_counts(small_labels, parts, 10).sum(axis=0)
    assert totals.tolist() == long_tail_counts([500] * 10, rho)


def test_iid_sizes(small_labels):
    parts = partition_labels(small_labels, scheme="iid", num_clients=7, seed=0)
    assert [len(p) for p in parts] == [715] * 2 + [714] * 5
    assert_disjoint_valid(parts, len(small_labels))


def test_imbalance_non_creff_rho1_means_no_selection(small_labels):
    a = partition_labels(small_labels, scheme="dirichlet", num_clients=10, seed=0, alpha=0.5)
    b = partition_labels(small_labels, scheme="dirichlet", num_clients=10, seed=0, alpha=0.5, imbalance_ratio=1)
    assert_same(a, b)


# ============================================================================
# dirichlet
# ============================================================================
def test_dirichlet_min_size(small_labels):
    for alpha in (0.1, 0.5):
        parts = partition_labels(small_labels, scheme="dirichlet", num_clients=20, seed=1, alpha=alpha)
        assert min(len(p) for p in parts) >= 10
        parts = partition_labels(small_labels, scheme="dirichlet", num_clients=20, seed=1, alpha=alpha,
                                 min_size=60)
        assert min(len(p) for p in parts) >= 60


def test_dirichlet_default_min_size_clamped():
    y = np.random.RandomState(0).randint(0, 3, size=60)  # 60 samples / 10 clients: min_size clamps to 6
    parts = partition_labels(y, scheme="dirichlet", num_clients=10, seed=0, alpha=100.0)
    assert min(len(p) for p in parts) >= 6
    with pytest.raises(ValueError, match="min_size=7 can't be met"):
        partition_labels(y, scheme="dirichlet", num_clients=10, seed=0, alpha=1.0, min_size=7)


def test_dirichlet_guard_raises_instead_of_hanging():
    y = np.repeat([0, 1], 6)  # 12 samples, 10 clients, tiny alpha
    with pytest.raises(ValueError, match=r"min_size can't be met with alpha=0\.0001"):
        partition_labels(y, scheme="dirichlet", num_clients=10, seed=0, alpha=1e-4)


@pytest.mark.parametrize("scheme", ["dirichlet", "creff"])
def test_small_alpha_more_skew(cifar10_labels, scheme):
    y = cifar10_labels[:20000]
    low = partition_labels(y, scheme=scheme, num_clients=10, seed=0, alpha=0.1)
    high = partition_labels(y, scheme=scheme, num_clients=10, seed=0, alpha=100.0)
    s_low, s_high = skew(y, low, 10), skew(y, high, 10)
    assert s_high < 0.2 < 0.45 < s_low, (s_low, s_high)


def test_dirichlet_matches_niid_bench_loop(small_labels):
    """Our vectorised split equals the NIID-Bench list-based loop on the same RandomState."""
    y, K, alpha, seed, min_req = small_labels, 8, 0.3, 17, 10
    rng = np.random.RandomState(seed)
    N = len(y)
    min_size = 0
    while min_size < min_req:
        idx_batch = [[] for _ in range(K)]
        for k in range(10):
            idx_k = np.where(y == k)[0]
            rng.shuffle(idx_k)
            proportions = rng.dirichlet(np.repeat(alpha, K))
            proportions = np.array([p * (len(idx_j) < N / K) for p, idx_j in zip(proportions, idx_batch)])
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, proportions))]
            min_size = min([len(idx_j) for idx_j in idx_batch])
    for j in range(K):
        rng.shuffle(idx_batch[j])
    assert_same(partition_labels(y, scheme="dirichlet", num_clients=K, seed=seed, alpha=alpha), idx_batch)


# ============================================================================
# pathological
# ============================================================================
@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_pathological_classes_per_client(small_labels, k):
    parts = partition_labels(small_labels, scheme="pathological", num_clients=20, seed=0, classes_per_client=k)
    counts = client_class_counts(small_labels, parts, 10)
    assert ((counts > 0).sum(axis=1) == k).all()
    for i in range(20):
        assert counts[i, i % 10] > 0  # client i holds class i % C
    flat = assert_disjoint_valid(parts, len(small_labels))
    assert len(flat) == len(small_labels)
    # each class is split evenly among its holders
    for c in range(10):
        held = counts[:, c][counts[:, c] > 0]
        assert held.max() - held.min() <= 1


def test_pathological_fewer_clients_than_classes(small_labels):
    parts = partition_labels(small_labels, scheme="pathological", num_clients=3, seed=0, classes_per_client=2)
    counts = client_class_counts(small_labels, parts, 10)
    assert ((counts > 0).sum(axis=1) == 2).all()
    assert_disjoint_valid(parts, len(small_labels))


# ============================================================================
# validation
# ============================================================================
@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="shards", num_clients=10), r"unknown partition scheme 'shards'.*creff, dirichlet, pathological, iid"),
    (dict(scheme="dirichlet", num_clients=10), "alpha is missing"),
    (dict(scheme="dirichlet", num_clients=10, alpha=0.0), "alpha > 0"),
    (dict(scheme="creff", num_clients=10, alpha=-1.0), "alpha > 0"),
    (dict(scheme="creff", num_clients=10), "alpha is missing"),
    (dict(scheme="creff", num_clients=9, alpha=0.5), "num_clients >= 10"),
    (dict(scheme="pathological", num_clients=10), "needs classes_per_client"),
    (dict(scheme="pathological", num_clients=10, classes_per_client=0), r"classes_per_client must be .*\[1, 10\]"),
    (dict(scheme="pathological", num_clients=10, classes_per_client=11), r"classes_per_client must be .*\[1, 10\]"),
    (dict(scheme="iid", num_clients=0), "num_clients must be >= 1"),
    (dict(scheme="iid", num_clients=5001), r"more clients \(5001\) than samples \(5000\)"),
    (dict(scheme="iid", num_clients=10, imbalance_ratio=0.5), "rho.*>= 1"),
    (dict(scheme="creff", num_clients=10, alpha=0.5, imbalance_ratio=0.99), "rho.*>= 1"),
    (dict(scheme="dirichlet", num_clients=10, alpha=0.5, min_size=-1), "min_size must be >= 0"),
])
def test_validation_errors(small_labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_labels(small_labels, seed=0, **kwargs)


def test_label_validation():
    with pytest.raises(ValueError, match="1-D"):
        partition_labels(np.zeros((4, 2), int), scheme="iid", num_clients=2, seed=0)
    with pytest.raises(ValueError, match="integers"):
        partition_labels(np.zeros(4), scheme="iid", num_clients=2, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        partition_labels(np.array([0, -1, 1]), scheme="iid", num_clients=2, seed=0)


# ============================================================================
# helpers
# ============================================================================
def test_long_tail_counts():
    assert long_tail_counts([5000] * 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts([5000] * 10, 50) == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    assert long_tail_counts([5000] * 10, 10) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    assert sum(long_tail_counts([500] * 100, 100)) == 10847
    assert long_tail_counts([5000] * 10, 1) == [5000] * 10
    # img_max is the mean class size (30 here), not the largest, and counts are capped by class size
    assert long_tail_counts([60, 20, 10], 1) == [30, 20, 10]
    assert long_tail_counts([60, 20, 10], 4) == [30, 15, 7]
    with pytest.raises(ValueError):
        long_tail_counts([10, 10], 0.5)


def test_client_class_counts_and_table(small_labels):
    parts = partition_labels(small_labels, scheme="dirichlet", num_clients=6, seed=0, alpha=0.5)
    counts = client_class_counts(small_labels, parts, 10)
    naive = np.array([[int((small_labels[p] == c).sum()) for c in range(10)] for p in parts])
    np.testing.assert_array_equal(counts, naive)
    assert counts.shape == (6, 10)
    table = format_count_table(counts)
    lines = table.splitlines()
    assert lines[0].split() == ["client"] + [f"c{j}" for j in range(10)] + ["total"]
    assert lines[-1].split() == ["total"] + [str(v) for v in counts.sum(axis=0)] + [str(counts.sum())]
    assert len(lines) == 6 + 4
    assert lines[2].split()[-1] == str(len(parts[0]))


# ============================================================================
# save / load
# ============================================================================
def test_save_load_round_trip(tmp_path, small_labels):
    parts = partition_labels(small_labels, scheme="creff", num_clients=12, seed=0, alpha=0.5, imbalance_ratio=10)
    out = tmp_path / "p" / "nested"
    save_partition(out, parts, small_labels, 10, {"scheme": "creff", "alpha": 0.5, "path": Path("x")})
    names = sorted(f.name for f in out.iterdir())
    assert names == ["class_counts.csv", "counts.csv", "histogram.png", "meta.json", "partition.npz"]
    loaded = load_partition(out)
    assert_same(loaded, parts)
    with np.load(out / "partition.npz") as z:
        assert sorted(z.files) == [f"client_{i:04d}" for i in range(12)]
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scheme"] == "creff" and meta["alpha"] == 0.5 and meta["num_clients"] == 12
    assert meta["client_sizes"] == [len(p) for p in parts]
    counts_rows = (out / "counts.csv").read_text().splitlines()
    assert counts_rows[0].startswith("client,class_0,") and counts_rows[0].endswith(",total")
    assert counts_rows[-1].split(",")[-1] == str(sum(len(p) for p in parts))
    class_rows = [r.split(",") for r in (out / "class_counts.csv").read_text().splitlines()]
    assert class_rows[0] == ["class", "available", "assigned"]
    assert [int(r[2]) for r in class_rows[1:-1]] == long_tail_counts([500] * 10, 10)
    # overwrite in place works and leaves no temporaries behind
    save_partition(out, parts[::-1], small_labels, 10, {})
    assert_same(load_partition(out), parts[::-1])
    assert sorted(f.name for f in out.iterdir()) == names


def test_save_many_clients(tmp_path):
    y = np.random.RandomState(0).randint(0, 5, size=5000)
    parts = partition_labels(y, scheme="iid", num_clients=400, seed=0)
    save_partition(tmp_path, parts, y, 5, {})
    assert_same(load_partition(tmp_path), parts)


# ============================================================================
# CLI
# ============================================================================
def test_cli_main(tmp_path, capsys):
    out = tmp_path / "digits_part"
    rc = main(["--dataset", "digits", "--scheme", "dirichlet", "--alpha", "0.5", "--num-clients", "10",
               "--seed", "0", "--rho", "10", "--data-root", str(tmp_path / "data"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[0] == "client" and "total" in printed.splitlines()[-1]
    parts = load_partition(out)
    assert len(parts) == 10
    from fedhpro.data import load_dataset
    y = load_dataset("digits", tmp_path / "data").train_y.numpy()
    assert_same(parts, partition_labels(y, scheme="dirichlet", num_clients=10, seed=0, alpha=0.5,
                                        imbalance_ratio=10))


def test_cli_bad_arguments_exit_2(tmp_path):
    rc = main(["--dataset", "digits", "--scheme", "dirichlet", "--num-clients", "10",
               "--data-root", str(tmp_path)])  # one-line `error: ...` (run_guarded), no SystemExit
    assert rc == 2


def test_cli_module_entry_point():
    # `python -m fedhpro.partition` reaches main(); --help exits before the (torch) dataset import
    r = subprocess.run([sys.executable, "-m", "fedhpro.partition", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--classes-per-client" in r.stdout and "--num-clients" in r.stdout


# ============================================================================
# scale
# ============================================================================
@pytest.fixture(scope="module")
def million_labels():
    return np.random.RandomState(0).randint(0, 100, size=1_000_000)


@pytest.mark.parametrize("scheme,kw", [
    ("iid", {}),
    ("dirichlet", dict(alpha=0.5)),
    ("pathological", dict(classes_per_client=5)),
])
def test_scale_million_by_thousand(million_labels, scheme, kw):
    parts = partition_labels(million_labels, scheme=scheme, num_clients=1000, seed=0, **kw)
    assert len(parts) == 1000
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 1_000_000
    assert sizes.min() >= (10 if scheme == "dirichlet" else 1)
    flat = np.concatenate(parts)
    assert np.bincount(flat, minlength=1_000_000).max() == 1
    if scheme == "iid":
        assert sizes.max() - sizes.min() == 0
    if scheme == "pathological":
        counts = client_class_counts(million_labels, parts, 100)
        assert ((counts > 0).sum(axis=1) == 5).all()
