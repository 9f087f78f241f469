"""Client partitions of a label array: plain, deterministic functions.

`partition_labels(labels, scheme=..., num_clients=..., seed=...)` returns one
int64 array of sample indices (into `labels`) per client. Every scheme draws
from its own `np.random.RandomState(seed)` objects; the global numpy RNG is
never touched, so a partition depends only on the labels and the arguments.

Schemes
-------
``creff``
    The FedHPro / CReFF "NID1" split (mala-lab/FedHPro ``utils/long_tailed_setting.py``
    + ``utils/sample_dirichlet.py``, inherited from CReFF), reproduced bit for bit:
    exponential long tail with the numpy stream of ``np.random.seed(seed)``, then
    FedDF-style Dirichlet over groups of 10 "auxiliary workers" with a
    ``RandomState(seed)``, then the contiguous ``partition_balance`` cut. As in the
    official ``main_run.py``, the long-tail step always runs (``imbalance_ratio``
    None or 1 means imb_factor 1.0: every class list is still shuffled, which
    changes the result, and capped at ``int(total / C)`` samples).
``dirichlet``
    NIID-Bench ``noniid-labeldir``: per-class Dirichlet proportions with the
    balance mask, resampled until every client holds ``min_size`` samples, and
    each client's indices shuffled at the end.
``pathological``
    NIID-Bench ``noniid-#label{k}`` (the "NID2" / FedAvg-shards family): client i
    holds class ``i % C`` plus ``classes_per_client - 1`` other distinct classes
    drawn by a ``randint`` rejection loop; each class's shuffled samples are
    split evenly (``np.array_split``) among the clients that hold it.
``iid``
    A permutation cut by ``np.array_split`` into near-equal parts.
``nway``
    FedProto's n-way k-shot split (yuetan031/FedProto ``lib/sampling.py`` with the draws of
    ``exps/federated_main.py``): client i holds n_i classes (numpy ``randint``), k_i samples of each
    (``randint`` around ``shots``), its classes drawn by Python's ``random.sample``; every client takes
    its own block of each class (offset i * ``train_shots_max``) and a per-client local test set from the
    TEST labels (`nway_test_parts`). See `nway_draws`.

``imbalance_ratio`` rho > 1 applies the same exponential long-tail selection as
``creff`` before the non-creff schemes (rho None or 1: no selection there);
indices always refer to the original `labels`.

Also: `long_tail_counts`, `client_class_counts`, `format_count_table`,
`save_partition` / `load_partition` and a CLI (`main`,
``python -m fedhpro.partition``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import re
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "MAX_ATTEMPTS",
    "CREFF_MAX_DRAWS",
    "partition_labels",
    "long_tail_counts",
    "emptied_classes",
    "parts_digest",
    "client_class_counts",
    "format_count_table",
    "NWAY_RULES",
    "nway_rule",
    "nway_draws",
    "nway_test_parts",
    "save_partition",
    "load_partition",
    "main",
]

# the splits `partition_labels` (and `fedhpro partition --scheme`) implements; the schemes a run config
# accepts, with their keys, ids and labels, are declared in `SCHEMES` (end of this module)
LABEL_ALGORITHMS = ("creff", "dirichlet", "pathological", "iid", "nway")
MAX_ATTEMPTS = 1000  # resampling rounds before the `dirichlet` scheme gives up
# The official creff loop needs far more rounds at small alpha (CIFAR-10-LT rho=100: up to ~1.2k
# at alpha=0.1, ~12k at alpha=0.05), and giving up early would break bit-compatibility. Its guard
# is a budget of Dirichlet draws per worker group: max(MAX_ATTEMPTS, CREFF_MAX_DRAWS // C) rounds,
# i.e. 100k rounds for 10 classes, 10k for 100 (more classes average out and need fewer rounds).
CREFF_MAX_DRAWS = 1_000_000
_AUX_WORKERS = 10  # CReFF / FedDF `n_auxi_workers`
_DEFAULT_MIN_SIZE = 10  # NIID-Bench `min_require_size`


# --------------------------------------------------------------------------- helpers
def _as_labels(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch tensor
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    return y


def _class_index_lists(y: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per class, the indices i with y[i] == c in increasing order (CReFF `classify_label`)."""
    order = np.argsort(y, kind="stable")
    ends = np.cumsum(np.bincount(y, minlength=num_classes))
    return np.split(order, ends[:-1])


def _long_tail_n(total: int, num_classes: int, imb_factor: float, c: int) -> int:
    """CReFF `_get_img_num_per_cls` (imb_type 'exp') for class c, same float expression."""
    img_max = total / num_classes
    if num_classes == 1:  # the official code divides by zero here; one class keeps img_max
        return int(img_max)
    return int(img_max * (imb_factor ** (c / (num_classes - 1.0))))


def _long_tail_lists(per_class: list[np.ndarray], imb_factor: float, seed: int) -> list[np.ndarray]:
    """CReFF `train_long_tail`: shuffle every class list, keep its first n_c indices.

    The official code shuffles Python lists with the global RNG seeded by
    `np.random.seed(seed)`; RandomState(seed).shuffle on an int array gives the same
    permutation (same algorithm, same stream), which the tests check.
    """
    rs = np.random.RandomState(seed)
    num_classes = len(per_class)
    total = sum(len(ix) for ix in per_class)
    kept = []
    for c, ix in enumerate(per_class):
        ix = np.array(ix, dtype=np.int64)  # copy: never shuffle the caller's arrays
        rs.shuffle(ix)
        kept.append(ix[: _long_tail_n(total, num_classes, imb_factor, c)])
    return kept


def _split_lengths(points: np.ndarray, n: int) -> list[int]:
    """Exact lengths of the pieces `np.split(arr_of_len_n, points)` makes (Python slice rules)."""
    bounds = [0] + points.tolist() + [n]
    whole = range(n)
    return [len(whole[bounds[j]:bounds[j + 1]]) for j in range(len(bounds) - 1)]


def _segment_counts(points: np.ndarray, n: int) -> np.ndarray:
    """Lengths of the pieces `np.split(arr_of_len_n, points)` makes (Python slice semantics).

    Handles the official code's corner case where 0/0 proportions become NaN and
    `astype(int)` turns them into huge negative numbers.
    """
    pts = np.where(points < 0, points + n, points)
    pts = np.clip(pts, 0, n)
    pts = np.maximum.accumulate(pts) if len(pts) else pts
    bounds = np.concatenate(([0], pts, [n]))
    return np.diff(bounds)


def _split_by_owner(indices: np.ndarray, owners: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Group `indices` by owner, keeping their relative order within each owner."""
    order = np.argsort(owners, kind="stable")
    ends = np.cumsum(np.bincount(owners, minlength=num_clients))
    return [a.astype(np.int64, copy=False) for a in np.split(indices[order], ends[:-1])]


def _check_rho(rho) -> float | None:
    if rho is None:
        return None
    rho = float(rho)
    if not math.isfinite(rho) or rho < 1:
        raise ValueError(f"imbalance_ratio (rho) must be a finite number >= 1, got {rho!r}")
    return rho


def _check_alpha(alpha, scheme: str) -> float:
    if alpha is None:
        raise ValueError(f"scheme {scheme!r} needs a Dirichlet concentration alpha > 0 (alpha is missing)")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"scheme {scheme!r} needs a Dirichlet concentration alpha > 0, got {alpha!r}")
    return alpha


# --------------------------------------------------------------------------- public helpers
def emptied_classes(labels, rho) -> list[int]:
    """The classes present in `labels` that the long tail with ratio `rho` leaves with no sample (rho None
    or <= 1: none)."""
    rho = _check_rho(rho)
    y = _as_labels(labels)
    if rho is None or rho <= 1 or y.size == 0:
        return []
    sizes = np.bincount(y)
    kept = long_tail_counts(sizes.tolist(), rho)
    return [c for c, (n, k) in enumerate(zip(sizes, kept)) if n > 0 and k == 0]


def long_tail_counts(class_sizes: Sequence[int], rho: float) -> list[int]:
    """Samples the exponential long tail keeps per class (CReFF `_get_img_num_per_cls`).

    n_c = int(img_max * (1/rho) ** (c / (C - 1))) with img_max = total / C (the mean
    class size, not the largest), capped at the class's size. CIFAR-10 (5000 per
    class) with rho=100 gives [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50].
    rho=1 still caps every class at int(total / C), as the official code does (only
    `partition_labels(scheme="creff")` applies the step at rho=1).
    """
    rho = _check_rho(rho)
    if rho is None:
        raise ValueError("rho is required")
    sizes = [int(s) for s in class_sizes]
    if any(s < 0 for s in sizes):
        raise ValueError("class sizes must be >= 0")
    total, num_classes = sum(sizes), len(sizes)
    return [min(s, _long_tail_n(total, num_classes, 1.0 / rho, c)) for c, s in enumerate(sizes)]


def client_class_counts(labels, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """K x C matrix: how many samples of each class every client holds (one bincount)."""
    y = _as_labels(labels)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    k = len(parts)
    if k == 0:
        return np.zeros((0, num_classes), dtype=np.int64)
    idx = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if sizes.sum() else np.zeros(0, np.int64)
    lab = y[idx]
    if lab.size and lab.max() >= num_classes:
        raise ValueError(f"label {int(lab.max())} out of range for num_classes={num_classes}")
    owner = np.repeat(np.arange(k, dtype=np.int64), sizes)
    return np.bincount(owner * num_classes + lab, minlength=k * num_classes).reshape(k, num_classes)


def format_count_table(counts) -> str:
    """A plain-text client x class table with per-client totals and a totals row."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2:
        raise ValueError("counts must be a 2-D (clients x classes) array")
    k, c = counts.shape
    header = ["client"] + [f"c{j}" for j in range(c)] + ["total"]
    rows = [[str(i)] + [str(v) for v in row] + [str(int(row.sum()))] for i, row in enumerate(counts)]
    rows.append(["total"] + [str(int(v)) for v in counts.sum(axis=0)] + [str(int(counts.sum()))])
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]

    def fmt(r):
        return " ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])])

    rule = "-" * len(fmt(header))
    lines = [fmt(header), rule] + [fmt(r) for r in rows[:-1]] + [rule, fmt(rows[-1])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- schemes
def _creff(y: np.ndarray, num_classes: int, num_clients: int, alpha: float, rho: float | None,
           seed: int) -> list[np.ndarray]:
    # a. long tail (official main_run.py always calls train_long_tail; rho None -> imb_factor 1.0)
    imb_factor = 1.0 if rho is None else 1.0 / rho
    kept = _long_tail_lists(_class_index_lists(y, num_classes), imb_factor, seed)

    # b. clients_indices / build_non_iid_by_dirichlet
    all_idx = np.concatenate(kept)
    all_lab = np.repeat(np.arange(num_classes, dtype=np.int64), [len(k) for k in kept])
    num_indices = len(all_idx)
    random_state = np.random.RandomState(seed)
    perm = np.arange(num_indices)
    random_state.shuffle(perm)  # == shuffling the list of (idx, label) tuples
    all_idx, all_lab = all_idx[perm], all_lab[perm]

    n_workers = num_clients
    num_splits = math.ceil(n_workers / _AUX_WORKERS)
    chunks = []
    from_index = 0
    for idx in range(num_splits):
        to_index = from_index + int(_AUX_WORKERS / n_workers * num_indices)
        stop = num_indices if idx == num_splits - 1 else to_index
        chunks.append((all_idx[from_index:stop], all_lab[from_index:stop]))
        from_index = to_index

    idx_batch: list[np.ndarray] = []
    for g, (t_idx, t_lab) in enumerate(chunks):
        targets_size = len(t_idx)
        nw = min(_AUX_WORKERS, n_workers)
        n_workers = n_workers - _AUX_WORKERS
        cap = targets_size / nw
        alphas = np.repeat(alpha, nw)
        members = [t_idx[t_lab == c] for c in range(num_classes)]  # np.where keeps chunk order
        threshold = int(0.50 * targets_size / nw)
        max_attempts = max(MAX_ATTEMPTS, CREFF_MAX_DRAWS // max(num_classes, 1))
        min_size, attempts, batch = 0, 0, None
        with np.errstate(all="ignore"):  # official: 0/0 -> nan, astype(int) -> garbage, kept as is
            while min_size < threshold:
                attempts += 1
                if attempts > max_attempts:
                    raise ValueError(
                        f"creff partition: the Dirichlet resampling for worker group {g} "
                        f"({nw} clients, {targets_size} samples) found no split giving every client "
                        f">= {threshold} samples in {max_attempts} attempts; alpha={alpha} is too "
                        f"small (or the data too small) for num_clients={num_clients}")
                sizes = np.zeros(nw, dtype=np.int64)
                cuts = []
                for ic in members:
                    proportions = random_state.dirichlet(alphas)
                    proportions = proportions * (sizes < cap)
                    proportions = proportions / proportions.sum()
                    points = (np.cumsum(proportions) * len(ic)).astype(int)[:-1]
                    sizes += _split_lengths(points, len(ic))
                    cuts.append(points)
                min_size = int(sizes.min())
                batch = cuts
        if batch is not None:  # the official code drops a group whose loop never ran
            pieces = [np.split(ic, points) for ic, points in zip(members, batch)]
            idx_batch.extend(np.concatenate([p[j] for p in pieces]) for j in range(nw))

    # c. functools.reduce(+) then partition_balance
    flat = np.concatenate(idx_batch) if idx_batch else np.zeros(0, dtype=np.int64)
    if len(flat) < num_clients:
        raise ValueError(
            f"creff partition: only {len(flat)} samples survive the long tail and grouping, "
            f"fewer than num_clients={num_clients}")
    per, r = divmod(len(flat), num_clients)
    sizes = np.full(num_clients, per, dtype=np.int64)
    sizes[:r] += 1
    return [a.astype(np.int64, copy=False) for a in np.split(flat, np.cumsum(sizes)[:-1])]


def _dirichlet(y: np.ndarray, num_classes: int, num_clients: int, alpha: float, min_size: int,
               rng: np.random.RandomState) -> list[np.ndarray]:
    n = len(y)
    per_class = _class_index_lists(y, num_classes)
    cap = n / num_clients
    clients = np.arange(num_clients, dtype=np.int64)
    for _ in range(MAX_ATTEMPTS):
        sizes = np.zeros(num_clients, dtype=np.int64)
        idx_parts, owner_parts = [], []
        with np.errstate(all="ignore"):
            for members in per_class:
                idx_k = members.copy()
                rng.shuffle(idx_k)
                proportions = rng.dirichlet(np.repeat(alpha, num_clients))
                proportions = proportions * (sizes < cap)
                proportions = proportions / proportions.sum()
                points = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
                counts = _segment_counts(points, len(idx_k))
                idx_parts.append(idx_k)
                owner_parts.append(np.repeat(clients, counts))
                sizes += counts
        if sizes.min() >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet partition: no split gives every one of num_clients={num_clients} clients "
            f">= min_size={min_size} samples in {MAX_ATTEMPTS} attempts; min_size can't be met "
            f"with alpha={alpha} (raise alpha, lower min_size or use fewer clients)")
    parts = _split_by_owner(np.concatenate(idx_parts), np.concatenate(owner_parts), num_clients)
    for p in parts:
        rng.shuffle(p)
    return parts


def _pathological(y: np.ndarray, num_classes: int, num_clients: int, classes_per_client: int,
                  rng: np.random.RandomState) -> list[np.ndarray]:
    times = np.zeros(num_classes, dtype=np.int64)
    holder_client, holder_class = [], []
    for i in range(num_clients):
        current = [i % num_classes]
        while len(current) < classes_per_client:
            ind = int(rng.randint(0, num_classes))
            if ind not in current:
                current.append(ind)
        for c in current:
            times[c] += 1
            holder_client.append(i)
            holder_class.append(c)
    holder_client = np.asarray(holder_client, dtype=np.int64)
    holder_class = np.asarray(holder_class, dtype=np.int64)
    order = np.lexsort((holder_client, holder_class))  # by class, then client id
    holders = np.split(holder_client[order], np.cumsum(times)[:-1])

    idx_parts, owner_parts = [], []
    for c, members in enumerate(_class_index_lists(y, num_classes)):
        idx_c = members.copy()
        rng.shuffle(idx_c)
        m = int(times[c])
        if m == 0:  # no client holds this class (num_clients * k < C): its samples go unused
            continue
        per, r = divmod(len(idx_c), m)
        counts = np.full(m, per, dtype=np.int64)
        counts[:r] += 1  # np.array_split sizes
        idx_parts.append(idx_c)
        owner_parts.append(np.repeat(holders[c], counts))
    if not idx_parts:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_clients)]
    return _split_by_owner(np.concatenate(idx_parts), np.concatenate(owner_parts), num_clients)


def _iid(n: int, num_clients: int, rng: np.random.RandomState) -> list[np.ndarray]:
    perm = rng.permutation(n).astype(np.int64)
    return np.array_split(perm, num_clients)


# --------------------------------------------------------------------------- FedProto n-way k-shot
# FedProto's sampling code has one function per dataset and they differ: MNIST draws k from
# randint(shots - stdev + 1, shots + stdev - 1) and tests on 40 samples per class at offset i * 40;
# CIFAR-10 and FEMNIST draw k from randint(shots - stdev + 1, shots + stdev + 1) and test on `test_shots`
# per class at offset i * test_shots; CIFAR-100 uses k = shots, train offset i * 5 (overlapping blocks)
# and 5 test samples per class at a random offset random.randint(0, 90). The rule follows the dataset.
NWAY_RULES = ("mnist", "cifar10", "cifar100")
_NWAY_TEST_SHOTS = {"mnist": 40, "cifar10": 15, "cifar100": 5}  # FedProto: hard-coded 40 / --test_shots / 5


def nway_rule(dataset: str) -> str:
    """The FedProto sampling rule of a dataset: its own for MNIST and CIFAR-100, CIFAR-10's otherwise
    (FEMNIST's function is CIFAR-10's on data stored class by class in blocks of train_shots_max)."""
    return dataset if dataset in ("mnist", "cifar100") else "cifar10"


def nway_draws(num_classes: int, num_clients: int, *, ways: int, shots: int, stdev: int, seed: int,
               rule: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], random.Random]:
    """FedProto's draws: (n_i, k_i, sorted classes of each client, the Python RNG after them).

    As `federated_main.py` after np.random.seed(seed) and random.seed(seed): n_list =
    randint(max(2, ways - stdev), min(C, ways + stdev + 1), K), then k_list (the rule's range), then
    per client np.sort(random.sample(range(C), n_i)). Our own RandomState / Random objects give the same
    streams without touching the global ones.
    """
    if rule not in NWAY_RULES:
        raise ValueError(f"unknown n-way rule {rule!r}; choose one of {', '.join(NWAY_RULES)}")
    for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("stdev", stdev, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"scheme 'nway' needs {name} an integer >= {low}, got {value!r}")
    n_low, n_high = max(2, ways - stdev), min(num_classes, ways + stdev + 1)
    if n_low >= n_high:
        raise ValueError(f"scheme 'nway': ways={ways}, stdev={stdev} give an empty range of classes per client "
                         f"[{n_low}, {n_high}) for {num_classes} classes (FedProto's randint would fail)")
    k_low, k_high = {"mnist": (shots - stdev + 1, shots + stdev - 1), "cifar100": (shots, shots + 1)}.get(
        rule, (shots - stdev + 1, shots + stdev + 1))
    if k_low >= k_high or k_low < 1:
        raise ValueError(f"scheme 'nway': shots={shots}, stdev={stdev} give an empty range of samples per class "
                         f"[{k_low}, {k_high}) under FedProto's {rule} rule (its randint would fail)")
    rs = np.random.RandomState(int(seed))
    n_list = rs.randint(n_low, n_high, num_clients)
    k_list = rs.randint(k_low, k_high, num_clients)
    py = random.Random(int(seed))
    classes = [np.sort(np.asarray(py.sample(range(num_classes), int(n)), dtype=np.int64)) for n in n_list]
    return n_list.astype(np.int64), k_list.astype(np.int64), classes, py


def _nway_block(per_class: list[np.ndarray], c: int, begin: int, k: int, what: str) -> np.ndarray:
    members = per_class[c]
    if begin + k > len(members):  # FedProto's slice would run into the next class's samples
        raise ValueError(f"scheme 'nway': class {c} has {len(members)} {what} samples, too few for the block "
                         f"[{begin}, {begin + k}) FedProto takes (fewer clients, shots or train_shots_max)")
    return members[begin:begin + k]


def _nway_train(y: np.ndarray, num_classes: int, num_clients: int, *, ways, shots, stdev, train_shots_max,
                seed, rule) -> list[np.ndarray]:
    _, k_list, classes, _ = nway_draws(num_classes, num_clients, ways=ways, shots=shots, stdev=stdev, seed=seed,
                                       rule=rule)
    # FedProto sorts the indices by label (np.argsort, quicksort): which samples of a class come first
    # depends on numpy's sort; we sort stably (index order within a class), so the class counts and blocks
    # are FedProto's, the particular images of a block may differ.
    per_class = _class_index_lists(y, num_classes)
    step = 5 if rule == "cifar100" else int(train_shots_max)
    if step < int(k_list.max(initial=0)) and rule != "cifar100":
        raise ValueError(f"scheme 'nway': train_shots_max={train_shots_max} is below the largest shots drawn "
                         f"({int(k_list.max())}): clients' blocks would overlap")
    return [np.concatenate([_nway_block(per_class, int(c), i * step, int(k_list[i]), "training")
                            for c in classes[i]]).astype(np.int64) for i in range(num_clients)]


def nway_test_parts(test_labels, *, num_clients: int, seed: int, ways: int, shots: int, stdev: int,
                    rule: str, test_shots: int | None = None, num_classes: int | None = None) -> list[np.ndarray]:
    """Each client's local test set (indices into `test_labels`) as FedProto draws it: for every class the
    client holds, `test_shots` test samples (rule default: MNIST 40, CIFAR-10 15, CIFAR-100 5) at offset
    i * test_shots of the class (CIFAR-100: at random.randint(0, 90), drawn after the training classes)."""
    y = _as_labels(test_labels)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    _, _, classes, py = nway_draws(num_classes, num_clients, ways=ways, shots=shots, stdev=stdev, seed=seed,
                                   rule=rule)
    per = _NWAY_TEST_SHOTS[rule] if test_shots is None else int(test_shots)
    if per < 1:
        raise ValueError(f"scheme 'nway' needs test_shots >= 1, got {per}")
    per_class = _class_index_lists(y, num_classes)
    parts = []
    for i in range(num_clients):
        blocks = []
        for c in classes[i]:
            begin = py.randint(0, 90) if rule == "cifar100" else i * per
            blocks.append(_nway_block(per_class, int(c), begin, per, "test"))
        parts.append(np.concatenate(blocks).astype(np.int64))
    return parts


# --------------------------------------------------------------------------- entry point
def partition_labels(labels, *, scheme, num_clients, seed, alpha=None, classes_per_client=None,
                     imbalance_ratio=None, min_size=None, ways=None, shots=100, stdev=2, train_shots_max=110,
                     nway_rule_name="cifar10") -> list[np.ndarray]:
    """Split the samples of `labels` among `num_clients` clients.

    Returns one int64 array of indices into `labels` per client; the same
    arguments always give the same result, and the global numpy RNG is untouched.
    The number of classes is ``labels.max() + 1``.

    scheme: "creff" (needs alpha, num_clients >= 10; bit-compatible with the
    official FedHPro/CReFF code, whose long-tail step also runs at rho=1),
    "dirichlet" (needs alpha; `min_size` per client, default 10 clamped to
    N // num_clients), "pathological" (needs classes_per_client in [1, C]; the
    NIID-Bench ``noniid-#label{k}`` variant: client i gets class i % C, then
    distinct random classes; each class is split evenly among its holders), "iid" or "nway" (FedProto's
    n-way k-shot training blocks: needs ways; shots, stdev, train_shots_max and the dataset's
    `nway_rule_name` as FedProto's flags; the clients' test sets come from `nway_test_parts`).
    imbalance_ratio: rho >= 1; rho > 1 keeps int(total/C * rho**(-c/(C-1))) samples
    of class c (CReFF exponential long tail) before the scheme runs.
    Arguments a scheme does not use are ignored.
    """
    if scheme not in LABEL_ALGORITHMS:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(LABEL_ALGORITHMS)}")
    y = _as_labels(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}")
    num_clients = int(num_clients)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(y):
        raise ValueError(f"more clients ({num_clients}) than samples ({len(y)})")
    seed = int(seed)
    rho = _check_rho(imbalance_ratio)
    num_classes = int(y.max()) + 1

    if scheme == "creff":
        alpha = _check_alpha(alpha, scheme)
        if num_clients < _AUX_WORKERS:
            raise ValueError(f"scheme 'creff' needs num_clients >= {_AUX_WORKERS} (the official code "
                             f"asserts n_auxi_workers <= n_workers), got {num_clients}")
        return _creff(y, num_classes, num_clients, alpha, rho, seed)

    if scheme == "nway":
        if ways is None:
            raise ValueError("scheme 'nway' needs ways (the mean number of classes per client, FedProto's --ways)")
        if rho is not None and rho > 1:
            raise ValueError("scheme 'nway' takes no long tail (imbalance_ratio must be 1)")
        return _nway_train(y, num_classes, num_clients, ways=ways, shots=shots, stdev=stdev,
                           train_shots_max=train_shots_max, seed=seed, rule=nway_rule_name)
    if scheme == "dirichlet":
        alpha = _check_alpha(alpha, scheme)
    elif scheme == "pathological":
        if classes_per_client is None:
            raise ValueError("scheme 'pathological' needs classes_per_client")
        if (isinstance(classes_per_client, bool) or not isinstance(classes_per_client, (int, np.integer))
                or not 1 <= classes_per_client <= num_classes):
            raise ValueError(f"classes_per_client must be an integer in [1, {num_classes}] "
                             f"(the number of classes), got {classes_per_client!r}")
        classes_per_client = int(classes_per_client)

    # optional long-tail selection, then the scheme on the selected samples
    if rho is not None and rho > 1:
        kept = _long_tail_lists(_class_index_lists(y, num_classes), 1.0 / rho, seed)
        selected = np.sort(np.concatenate(kept))
        if len(selected) < num_clients:
            raise ValueError(f"the long tail (rho={rho}) keeps {len(selected)} samples, "
                             f"fewer than num_clients={num_clients}")
    else:
        selected = None
    sub = y if selected is None else y[selected]
    n = len(sub)

    rng = np.random.RandomState(seed)
    if scheme == "iid":
        parts = _iid(n, num_clients, rng)
    elif scheme == "dirichlet":
        cap = n // num_clients
        if min_size is None:
            min_size = min(_DEFAULT_MIN_SIZE, cap)
        else:
            min_size = int(min_size)
            if min_size < 0:
                raise ValueError(f"min_size must be >= 0, got {min_size}")
            if min_size > cap:
                raise ValueError(f"min_size={min_size} can't be met: {n} samples over {num_clients} "
                                 f"clients allow at most {cap} per client")
        parts = _dirichlet(sub, num_classes, num_clients, alpha, min_size, rng)
    else:
        parts = _pathological(sub, num_classes, num_clients, classes_per_client, rng)

    if selected is not None:
        parts = [selected[p] for p in parts]
    return [np.asarray(p, dtype=np.int64) for p in parts]


# --------------------------------------------------------------------------- files
def _atomic_write(path: Path, write) -> None:
    """Write via `write(fileobj)` to a temporary name in the same folder, then rename (umask mode)."""
    from fedhpro.runio import atomic_stream  # late: runio imports pandas and pyarrow

    atomic_stream(path, write)


def _csv_bytes(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _histogram_png(counts: np.ndarray, f) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, c = counts.shape
    fig = Figure(figsize=(min(max(6.0, 0.12 * k + 3), 24.0), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(k)
    cmap = matplotlib.colormaps["tab10" if c <= 10 else "tab20" if c <= 20 else "turbo"]
    colors = [cmap(j if c <= 20 else j / max(c - 1, 1)) for j in range(c)]
    if k <= 300:
        bottom = np.zeros(k)
        for j in range(c):
            ax.bar(x, counts[:, j], bottom=bottom, width=0.85, color=colors[j], label=f"class {j}",
                   linewidth=0)
            bottom += counts[:, j]
    else:  # many clients: a step-style stack is far cheaper than k * c rectangles
        ax.stackplot(x, counts.T, step="mid", colors=colors, labels=[f"class {j}" for j in range(c)])
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_title(f"{k} clients, {c} classes, {int(counts.sum())} samples")
    if c <= 20:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=100)


PARTS_HASH_KEY = "partition_sha256"  # meta.json: `parts_digest` of partition.npz's arrays


def parts_digest(parts: Sequence[np.ndarray]) -> str:
    """'sha256:<hex>' of client index arrays (count, then each client's length and little-endian int64 bytes):
    ties partition.npz to its meta.json (the npz file's own bytes hold zip timestamps, so they are not used)."""
    import hashlib

    h = hashlib.sha256(f"{len(parts)}\n".encode())
    for p in parts:
        a = np.ascontiguousarray(np.asarray(p), dtype="<i8")
        h.update(f"{a.size}\n".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def save_partition(path_dir, parts: Sequence[np.ndarray], labels, num_classes: int, meta: dict) -> None:
    """Write a partition to `path_dir` (created if missing), every file atomically.

    partition.npz (int64 array per client, keys client_0000, ...), counts.csv
    (client x class counts with totals), class_counts.csv (per class: samples in
    `labels` and samples assigned to clients, i.e. after any long tail),
    histogram.png (stacked bars per client) and meta.json (`meta` plus sizes and
    `parts_digest` of the arrays, which `load_partition` checks). meta.json is written last.
    """
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    y = _as_labels(labels)
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    counts = client_class_counts(y, parts, num_classes)

    arrays = {f"client_{i:04d}": p for i, p in enumerate(parts)}
    _atomic_write(path_dir / "partition.npz", lambda f: np.savez(f, **arrays))

    header = ["client"] + [f"class_{j}" for j in range(num_classes)] + ["total"]
    rows = [header] + [[i, *row.tolist(), int(row.sum())] for i, row in enumerate(counts)]
    rows.append(["total", *counts.sum(axis=0).tolist(), int(counts.sum())])
    _atomic_write(path_dir / "counts.csv", lambda f: f.write(_csv_bytes(rows)))

    available = np.bincount(y, minlength=num_classes)[:num_classes] if y.size else np.zeros(num_classes, int)
    assigned = counts.sum(axis=0)
    crow = [["class", "available", "assigned"]]
    crow += [[j, int(available[j]), int(assigned[j])] for j in range(num_classes)]
    crow.append(["total", int(available.sum()), int(assigned.sum())])
    _atomic_write(path_dir / "class_counts.csv", lambda f: f.write(_csv_bytes(crow)))

    _atomic_write(path_dir / "histogram.png", lambda f: _histogram_png(counts, f))

    full_meta = dict(meta)
    full_meta.update({PARTS_HASH_KEY: parts_digest(parts)})
    full_meta.update(num_clients=len(parts), num_classes=int(num_classes),
                     num_samples=int(sum(len(p) for p in parts)),
                     client_sizes=[len(p) for p in parts], class_totals=assigned.tolist())
    text = json.dumps(full_meta, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(path_dir / "meta.json", lambda f: f.write(text.encode()))


def load_partition(path_dir, num_samples: int | None = None) -> list[np.ndarray]:
    """The client index arrays that `save_partition` wrote, in client order.

    A file that is not such a partition (not an npz, pickled objects, keys or arrays of the wrong kind,
    indices outside `num_samples`) is a ValueError naming it; pickles are never loaded. So is one whose arrays
    do not hash to the `parts_digest` its meta.json records (a partition.npz swapped in from another
    partition); meta.json files written before the digest existed have none, and are not checked (their
    identity record still is, by `check_identity`).
    """
    path = Path(path_dir) / "partition.npz"
    if not path.is_file():
        raise FileNotFoundError(f"partition file {path} does not exist (make it with `fedhpro partition ... --out "
                                f"{Path(path_dir)}`)")
    remake = "delete it and make the partition again (in the workflow: delete it and rerun snakemake)"
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if not names or any(not re.fullmatch(r"client_[0-9]+", k) for k in names):
                raise ValueError("expected arrays client_0000, client_0001, ...")
            keys = sorted(names, key=lambda k: int(k[len("client_"):]))
            if [int(k[len("client_"):]) for k in keys] != list(range(len(keys))):
                raise ValueError("client numbers are not 0..K-1")
            parts = [z[k] for k in keys]
    except ValueError as err:
        why = str(err).splitlines()[0] if str(err) else "unreadable"
        if "pickle" in why:  # numpy's text would suggest loading it unsafely; partitions never hold objects
            why = "not an npz of integer arrays"
        raise ValueError(f"partition file {path} is not a fedhpro partition ({why}); {remake}") from None
    except Exception as err:  # noqa: BLE001 - zip/npy errors of a damaged file come in many kinds
        raise ValueError(f"partition file {path} is damaged or not an npz file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); {remake}") from None
    for i, p in enumerate(parts):
        if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
            raise ValueError(f"partition file {path}: client {i} is not a 1-D integer index array; {remake}")
        if p.size and (p.min() < 0 or (num_samples is not None and p.max() >= num_samples)):
            raise ValueError(f"partition file {path}: client {i} has indices outside the {num_samples} training "
                             f"samples of the data; {remake}")
    parts = [p.astype(np.int64, copy=False) for p in parts]
    recorded = _recorded_digest(Path(path_dir) / "meta.json")
    if recorded is not None and parts_digest(parts) != recorded:
        raise ValueError(f"partition file {path} does not match its meta.json (its arrays hash to "
                         f"{parts_digest(parts)}, meta.json records {recorded}): it comes from another partition; "
                         f"{remake}")
    return parts


def _recorded_digest(meta_path: Path) -> str | None:
    """The `parts_digest` a partition's meta.json records; None without one (older fedhpro, or no meta.json:
    the caller checks the record itself)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    value = meta.get(PARTS_HASH_KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


# The keys that determine a partition: a saved partition is used only by a run that agrees on every one
# (in this order; a scheme declared later adds its keys after these). Spelled as saved (`LEGACY_NAMES`).
IDENTITY_KEYS = ("dataset", "dataset_options", "data_fingerprint", "scheme", "num_clients", "seed", "alpha",
                 "classes_per_client", "imbalance_ratio", "clients_per_domain", "min_size", "ways", "shots", "stdev",
                 "train_shots_max", "test_shots")
_FLOAT_KEYS = ("alpha",)  # scheme keys recorded as floats; the others are integers


def partition_identity(*, dataset: str, data_fingerprint: str, scheme: str, num_clients: int, seed: int,
                       imbalance_ratio=None, min_size=None, dataset_options=None, **scheme_keys) -> dict:
    """The normalised values of every key that determines a split (`IDENTITY_KEYS`).

    `scheme_keys`: run-config keys of the schemes (alpha, classes_per_client, ways, ...); those the scheme
    does not read (`SCHEMES[scheme].keys`) are None, rho None is 1.0 (the same split), and the loader's
    `path` option is left out: the data is identified by its content (`data_fingerprint`).
    """
    declared = {k for s in SCHEMES.values() for k in s.keys}
    unknown = sorted(set(scheme_keys) - declared)
    if unknown:
        raise TypeError(f"partition_identity: {unknown[0]!r} is not a key of any partition scheme")
    reads = SCHEMES[scheme].keys if scheme in SCHEMES else ()
    options = {k: v for k, v in sorted(dict(dataset_options or {}).items()) if k != "path"}
    values = {"dataset": dataset, "dataset_options": json.loads(json.dumps(options, default=str)),
              "data_fingerprint": data_fingerprint, "scheme": scheme, "num_clients": int(num_clients),
              "seed": int(seed), "imbalance_ratio": 1.0 if imbalance_ratio is None else float(imbalance_ratio),
              "min_size": None if min_size is None or scheme != "dirichlet" else int(min_size)}
    for key in declared:
        value = scheme_keys.get(key)
        values[key] = None if key not in reads or value is None else (float if key in _FLOAT_KEYS else int)(value)
    return {key: values[key] for key in _identity_keys()}


def _identity_keys() -> tuple[str, ...]:
    return IDENTITY_KEYS + tuple(dict.fromkeys(k for s in SCHEMES.values() for k in s.keys if k not in IDENTITY_KEYS))


def identity_of(cfg, data_fingerprint: str) -> dict:
    """The partition identity a run with config `cfg` (a `fedhpro.config.RunConfig`) needs."""
    return partition_identity(dataset=cfg.dataset, dataset_options=cfg.dataset_options,
                              data_fingerprint=data_fingerprint, scheme=cfg.partition, num_clients=cfg.num_clients,
                              seed=cfg.partition_seed, imbalance_ratio=cfg.imbalance_ratio,
                              **{k: getattr(cfg, k) for k in SCHEMES[cfg.partition].keys})


def effective_min_size(identity: dict, num_samples) -> int | None:
    """An identity's `min_size` with None resolved to what `partition_labels` uses for it: the `dirichlet`
    scheme's default min(10, n // num_clients), n the samples it splits (all of which it assigns, so a saved
    dirichlet partition's `num_samples`). Other schemes have no min_size (None)."""
    value = identity.get("min_size")
    if identity.get("scheme") != "dirichlet" or value is not None:
        return value
    clients = identity.get("num_clients")
    if isinstance(num_samples, int) and isinstance(clients, int) and clients > 0:
        return min(_DEFAULT_MIN_SIZE, num_samples // clients)
    return _DEFAULT_MIN_SIZE


def check_identity(path_dir, meta: dict, want: dict) -> None:
    """ValueError naming the first key on which a saved partition's identity differs from `want` (and the run
    config key that sets it). `min_size` None counts as the scheme's default (`effective_min_size`), so a
    partition made with the default given explicitly is the same split."""
    have = meta.get("identity") if isinstance(meta, dict) else None
    if not isinstance(have, dict):
        raise ValueError(f"partition {path_dir} has no identity record in meta.json (made by an older fedhpro, "
                         "or not a fedhpro partition); delete it and make it again")
    for key in _identity_keys():
        found, needed = have.get(key), want.get(key)
        if key == "min_size":  # compared last: every other key agrees, so both sides split the same samples
            found = effective_min_size(have, meta.get("num_samples"))
            needed = effective_min_size(want, meta.get("num_samples"))
        if found != needed:
            run_key = RUN_CONFIG_KEYS.get(key, key)
            if key == "min_size":
                note = " (the scheme's default; a run cannot set min_size)"
            elif key == "data_fingerprint":
                note = " (the content of the data it loads)"
            else:
                note = f" (config key '{run_key}')"
            raise ValueError(f"partition {path_dir} was made with {key}={found!r}, but the run needs "
                             f"{run_key}={needed!r}{note}; use the partition made for this run (or none)")


# --------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    from fedhpro.cliutil import ArgumentParser

    p = ArgumentParser(prog="fedhpro partition",
                                description="Partition a dataset's training labels among clients.")
    p.add_argument("--dataset", required=True, help="registered dataset name (fedhpro.data)")
    p.add_argument("--scheme", required=True, choices=LABEL_ALGORITHMS)
    p.add_argument("--num-clients", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration (creff, dirichlet)")
    p.add_argument("--rho", type=float, default=None, help="long-tail imbalance ratio (>= 1)")
    p.add_argument("--classes-per-client", type=int, default=None, help="pathological scheme")
    p.add_argument("--min-size", type=int, default=None, help="dirichlet: minimum samples per client")
    p.add_argument("--ways", type=int, default=None, help="nway: mean classes per client (FedProto --ways)")
    p.add_argument("--shots", type=int, default=100, help="nway: mean samples per class (FedProto --shots)")
    p.add_argument("--stdev", type=int, default=2, help="nway: spread of ways and shots (FedProto --stdev)")
    p.add_argument("--train-shots-max", type=int, default=110, help="nway: block stride per client "
                   "(FedProto --train_shots_max)")
    p.add_argument("--test-shots", type=int, default=None, help="nway: local test samples per class (default: "
                   "FedProto's for the dataset: MNIST 40, CIFAR-100 5, else 15)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--path", default=None, help="your own copy of the data (the loader's path= option; as "
                   "fingerprint --path)")
    p.add_argument("--out", default=None, help="folder to save the partition to")
    return p


def main(argv=None) -> int:
    """`fedhpro partition`: one-line `error: ...` (exit 2) for bad input, like `fedhpro train`."""
    from fedhpro.cliutil import run_guarded

    return run_guarded(_main, argv)


def _main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from fedhpro.cliutil import check_out_dir
    from fedhpro.data import cli_options, fingerprint, load_dataset

    options = cli_options(args.dataset, args.path)  # the loader's path= (e.g. "give path=" in its errors)
    if args.out is not None:  # `--out ''` is refused, not taken for "no --out"
        check_out_dir(args.out)
    data = load_dataset(args.dataset, args.data_root, **options)
    labels = data.train_y.numpy()
    num_classes = int(getattr(data, "num_classes", int(labels.max()) + 1))
    try:
        parts = partition_labels(labels, scheme=args.scheme, num_clients=args.num_clients, seed=args.seed,
                                 alpha=args.alpha, classes_per_client=args.classes_per_client,
                                 imbalance_ratio=args.rho, min_size=args.min_size, ways=args.ways, shots=args.shots,
                                 stdev=args.stdev, train_shots_max=args.train_shots_max,
                                 nway_rule_name=nway_rule(args.dataset))
        if args.scheme == "nway":
            test_parts = nway_test_parts(data.test_y.numpy(), num_clients=args.num_clients, seed=args.seed,
                                         ways=args.ways, shots=args.shots, stdev=args.stdev,
                                         rule=nway_rule(args.dataset), test_shots=args.test_shots,
                                         num_classes=num_classes)
    except ValueError as e:
        parser.error(str(e))
    counts = client_class_counts(labels, parts, num_classes)
    emptied = emptied_classes(labels, args.rho)
    if emptied:  # `fedhpro train` and the workflow refuse such a split; say so before it is used
        print(f"warning: --rho {args.rho:g} leaves class(es) {', '.join(map(str, emptied))} of dataset "
              f"{args.dataset!r} with no training sample ({len(labels)} samples, {num_classes} classes); runs "
              "with this imbalance_ratio are refused; use a smaller --rho", file=sys.stderr)
    print(format_count_table(counts))
    if args.scheme == "nway":
        print("local test sets (FedProto: drawn from the test split)")
        print(format_count_table(client_class_counts(data.test_y.numpy(), test_parts, num_classes)))
    nway_args = {"ways": args.ways, "shots": args.shots, "stdev": args.stdev, "train_shots_max": args.train_shots_max,
                 "test_shots": args.test_shots} if args.scheme == "nway" else {}
    if args.out:
        identity = partition_identity(dataset=args.dataset, data_fingerprint=fingerprint(data), scheme=args.scheme,
                                      num_clients=args.num_clients, seed=args.seed, alpha=args.alpha,
                                      classes_per_client=args.classes_per_client, imbalance_ratio=args.rho,
                                      min_size=args.min_size, **nway_args)
        meta = {"dataset": args.dataset, "scheme": args.scheme, "num_clients": args.num_clients,
                "seed": args.seed, "alpha": args.alpha, "rho": args.rho,
                "classes_per_client": args.classes_per_client, "min_size": args.min_size,
                "num_train": int(len(labels)), "identity": identity, **nway_args}
        save_partition(args.out, parts, labels, num_classes, meta)
        print(f"saved to {args.out}", file=sys.stderr)
    return 0



# --------------------------------------------------------------------------- feature-shift domains, writers
__all__ += ["partition_domains", "partition_writers"]


def _as_group_ids(ids, what: str) -> np.ndarray:
    if ids is None:
        raise ValueError(f"{what}: no per-sample ids (the dataset has no domains; ArrayData.train_domain is None)")
    g = _as_labels(ids)
    if g.size == 0:
        raise ValueError(f"{what}: no samples")
    return g


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def partition_writers(writer_ids, num_clients, seed) -> list[np.ndarray]:
    """Whole groups (e.g. FEMNIST writers) per client: every writer's samples stay on one client.

    The present writer ids are shuffled with `RandomState(seed)` and cut into
    `num_clients` near-equal runs (`np.array_split`), so each client holds
    `n_writers // num_clients` or one more writers (the LEAF "natural" split,
    with several writers per client when there are more writers than clients).
    Returns sorted int64 sample indices per client; needs num_clients <= writers.
    """
    w = _as_group_ids(writer_ids, "partition_writers")
    num_clients = _check_count(num_clients, "num_clients")
    present = np.unique(w)
    if num_clients > len(present):
        raise ValueError(f"more clients ({num_clients}) than writers/domains ({len(present)}); use "
                         "partition_domains with clients_per_domain to split writers over several clients")
    order = np.random.RandomState(int(seed)).permutation(present)
    owner_of = np.empty(int(present.max()) + 1, dtype=np.int64)
    for cid, group in enumerate(np.array_split(order, num_clients)):
        owner_of[group] = cid
    owners = owner_of[w]
    return [np.flatnonzero(owners == cid).astype(np.int64) for cid in range(num_clients)]


def partition_domains(domain_ids, *, num_clients, seed, clients_per_domain=None) -> list[np.ndarray]:
    """Feature-shift split: every client holds samples of one domain (or, with few clients, whole domains).

    domain_ids: the domain id of every sample (`ArrayData.train_domain`); only
    the ids present count as domains, in increasing order.

    * num_clients >= number of domains D: domain d gets k_d clients, numbered
      consecutively (domain 0's clients first). With `clients_per_domain` k,
      k_d = k for all d and num_clients must equal k * D. Without it,
      k_d = num_clients // D, and the remainder goes one extra client each to
      the domains with the most samples (ties: lower id first). Each domain's
      samples are split IID among its clients: one `RandomState(seed)` draws a
      permutation per domain (in id order), cut by `np.array_split`.
    * num_clients < D (only without clients_per_domain): whole domains per client,
      as `partition_writers` (e.g. FEMNIST writers, several per client).

    Returns sorted int64 sample indices per client; the same arguments always
    give the same result and the global numpy RNG is untouched.
    """
    d = _as_group_ids(domain_ids, "partition_domains")
    num_clients = _check_count(num_clients, "num_clients")
    seed = int(seed)
    present, sizes = np.unique(d, return_counts=True)
    n_dom = len(present)
    if clients_per_domain is not None:
        k = _check_count(clients_per_domain, "clients_per_domain")
        if k * n_dom != num_clients:
            raise ValueError(f"clients_per_domain={k} with {n_dom} domains needs num_clients={k * n_dom}, "
                             f"got {num_clients}")
        per = np.full(n_dom, k, dtype=np.int64)
    elif num_clients < n_dom:
        return partition_writers(d, num_clients, seed)
    else:
        per = np.full(n_dom, num_clients // n_dom, dtype=np.int64)
        extra = num_clients - int(per.sum())
        by_size = sorted(range(n_dom), key=lambda i: (-int(sizes[i]), i))
        per[by_size[:extra]] += 1
    for i in range(n_dom):
        if sizes[i] < per[i]:
            raise ValueError(f"domain {int(present[i])} has {int(sizes[i])} samples, fewer than its "
                             f"{int(per[i])} clients")
    rng = np.random.RandomState(seed)
    parts: list[np.ndarray] = []
    for i, dom in enumerate(present):
        idx = np.flatnonzero(d == dom).astype(np.int64)
        for piece in np.array_split(idx[rng.permutation(len(idx))], int(per[i])):
            parts.append(np.sort(piece))
    return parts


# --------------------------------------------------------------------------- the scheme registry
# One declaration per scheme, read by everyone who needs it: the run config's `partition` choices and
# cross-key checks (`fedhpro.config`), the heterogeneity id (`fedhpro.sweep.het_id`), the partition rule's
# params (`fedhpro.sweep.PartitionSpec`), the saved partition's identity (`partition_identity`), the table
# label (`fedhpro.labels.heterogeneity_label`), the split a run makes (`split_for`) and the workflow schema.
# A scheme's keys are run-config keys (`fedhpro.config.RunConfig`, declared there with `param()`); a scheme
# names the ones its split reads. docs/extending.md says how to add one.
__all__ += ["Scheme", "IdPart", "SCHEMES", "register_scheme", "LABEL_ALGORITHMS", "LEGACY_NAMES", "split_for",
            "heterogeneity_keys", "identity_of"]

_KEEP = object()  # IdPart.omit default: the part is always written


@dataclass(frozen=True)
class IdPart:
    """One part of the heterogeneity id: `prefix` + the encoded value of run-config key `key` (`w3` for
    ways=3), left out when the value equals `omit` (a default the id never spelled out)."""

    prefix: str
    key: str
    omit: Any = _KEEP

    def written(self, value: Any) -> bool:
        return self.omit is _KEEP or value != self.omit


@dataclass(frozen=True)
class Scheme:
    """A partition scheme. `keys`: the run-config keys its split reads besides dataset, num_clients,
    partition_seed and imbalance_ratio (None in the params and identity of other schemes' partitions);
    `required`: those that must be set, each with a note for the error; `ids`: the heterogeneity id after
    the name (then `rho..` when imbalance_ratio != 1, then `n<clients>`); `label`: a table's text of a
    setting (`cond`: partition, alpha, classes_per_client (0 = unset), imbalance_ratio, ...), ' ρ=..' is
    appended when imbalance_ratio > 1 or `rho_in_label`; `split(cfg, labels, domains)`: each client's
    indices; `check(cfg)`: checks across keys (ConfigError naming the key); `local_tests(cfg, test_labels,
    num_classes)`: each client's local test set drawn from the test split (instead of held out of its data;
    then `local_test_fraction` is 0); `long_tail`: accepts imbalance_ratio > 1; `rank`: its place in tables."""

    name: str
    help: str
    split: Callable[[Any, np.ndarray, "np.ndarray | None"], list[np.ndarray]]
    keys: tuple[str, ...] = ()
    required: Mapping[str, str] = field(default_factory=dict)
    ids: tuple[IdPart, ...] = ()
    label: Callable[[Mapping[str, Any]], str] | None = None
    check: Callable[[Any], None] | None = None
    local_tests: Callable[[Any, np.ndarray, int], list[np.ndarray]] | None = None
    rho_in_label: bool = False
    long_tail: bool = True
    needs_domains: bool = False
    rank: int = 100

    def label_of(self, cond: Mapping[str, Any]) -> str:
        return self.label(cond) if self.label is not None else self.name


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Declare a scheme (its name must be new and a wildcard-safe word; its keys unique)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", scheme.name) or scheme.name in SCHEMES:
        raise ValueError(f"scheme name {scheme.name!r} must be a new lower-case word")
    if not set(scheme.required) <= set(scheme.keys) or not {p.key for p in scheme.ids} <= set(scheme.keys):
        raise ValueError(f"scheme {scheme.name!r}: required keys and id keys must be among its keys")
    SCHEMES[scheme.name] = scheme
    return scheme


# The partition rule's params and a saved partition's identity (meta.json) spell two run-config keys
# the way the first partitions were saved; kept so that no existing partition is rebuilt or refused.
LEGACY_NAMES = {"partition": "scheme", "partition_seed": "seed"}
RUN_CONFIG_KEYS = {old: new for new, old in LEGACY_NAMES.items()}  # identity key -> run-config key


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _g(x: float) -> str:
    return f"{float(x):g}"


def _dirichlet_label(cond: Mapping[str, Any]) -> str:
    alpha = _num(cond["alpha"])
    return f"Dir({_g(alpha)})" if alpha == alpha else str(cond["partition"])


def _pathological_label(cond: Mapping[str, Any]) -> str:
    k = int(cond["classes_per_client"])
    return f"pathological k={k}" if k > 0 else "pathological"


def _split_labels(cfg, labels: np.ndarray, domains) -> list[np.ndarray]:
    return partition_labels(labels, scheme=cfg.partition, num_clients=cfg.num_clients, seed=cfg.partition_seed,
                            alpha=cfg.alpha, classes_per_client=cfg.classes_per_client,
                            imbalance_ratio=cfg.imbalance_ratio)


def _split_nway(cfg, labels: np.ndarray, domains) -> list[np.ndarray]:
    return partition_labels(labels, scheme="nway", num_clients=cfg.num_clients, seed=cfg.partition_seed,
                            alpha=cfg.alpha, classes_per_client=cfg.classes_per_client,
                            imbalance_ratio=cfg.imbalance_ratio, ways=cfg.ways, shots=cfg.shots, stdev=cfg.stdev,
                            train_shots_max=cfg.train_shots_max, nway_rule_name=nway_rule(cfg.dataset))


def _nway_local_tests(cfg, test_labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """FedProto's local test sets: indices into the test split, drawn as FedProto draws them."""
    return nway_test_parts(test_labels, num_clients=cfg.num_clients, seed=cfg.partition_seed, ways=cfg.ways,
                           shots=cfg.shots, stdev=cfg.stdev, rule=nway_rule(cfg.dataset), test_shots=cfg.test_shots,
                           num_classes=num_classes)


def _split_domains(cfg, labels: np.ndarray, domains) -> list[np.ndarray]:
    return partition_domains(domains, num_clients=cfg.num_clients, seed=cfg.partition_seed,
                             clients_per_domain=cfg.clients_per_domain)


def _config_error(message: str) -> Exception:
    from fedhpro.errors import ConfigError

    return ConfigError(message)


def _check_creff(cfg) -> None:
    if cfg.num_clients < _AUX_WORKERS:
        raise _config_error("config key 'num_clients' must be >= 10 for partition 'creff' "
                            "(the official split uses groups of 10 workers)")


def _check_nway(cfg) -> None:
    if cfg.local_test_fraction is not None:
        raise _config_error("config key 'local_test_fraction' must be unset for partition 'nway' (its local test "
                            "sets are drawn from the test split; see 'test_shots')")


def _check_domains(cfg) -> None:
    from fedhpro.data import DATASETS

    if not DATASETS[cfg.dataset].domains:
        raise _config_error(f"config key 'partition': 'domains' needs a multi-domain dataset; {cfg.dataset!r} "
                            "has none")


# In the order `fedhpro config` and error messages list them; `rank` is the tables' order.
register_scheme(Scheme(
    "creff", "long tail + Dirichlet over groups of 10 clients, the FedHPro/CReFF NID1 split", _split_labels,
    keys=("alpha",), required={"alpha": ""}, ids=(IdPart("a", "alpha"),), label=_dirichlet_label,
    check=_check_creff, rho_in_label=True, rank=2))
register_scheme(Scheme(
    "dirichlet", "per-class Dirichlet proportions (NIID-Bench noniid-labeldir)", _split_labels,
    keys=("alpha",), required={"alpha": ""}, ids=(IdPart("a", "alpha"),), label=_dirichlet_label, rank=1))
register_scheme(Scheme(
    "pathological", "classes_per_client classes per client (NID2)", _split_labels,
    keys=("classes_per_client",), required={"classes_per_client": ""}, ids=(IdPart("k", "classes_per_client"),),
    label=_pathological_label, rank=3))
register_scheme(Scheme("iid", "a random near-equal cut", _split_labels, rank=0))
register_scheme(Scheme(
    "domains", "one domain per client group (feature shift; multi-domain datasets)", _split_domains,
    keys=("clients_per_domain",), ids=(IdPart("cpd", "clients_per_domain", None),), check=_check_domains,
    needs_domains=True, rank=5))
register_scheme(Scheme(
    "nway", "FedProto's n-way k-shot clients, local test sets from the test split", _split_nway,
    keys=("ways", "shots", "stdev", "train_shots_max", "test_shots"), required={"ways": " (FedProto's --ways)"},
    ids=(IdPart("w", "ways"), IdPart("k", "shots"), IdPart("sd", "stdev"), IdPart("tsm", "train_shots_max", 110),
         IdPart("ts", "test_shots", None)),
    check=_check_nway, local_tests=_nway_local_tests, long_tail=False, rank=4))



def heterogeneity_keys() -> tuple[str, ...]:
    """The keys of a workflow heterogeneity entry: the scheme, its clients and long tail, and every scheme's keys."""
    return ("partition", "imbalance_ratio", "num_clients") + tuple(dict.fromkeys(
        k for scheme in SCHEMES.values() for k in scheme.keys))


def split_for(cfg, labels: np.ndarray, domains: np.ndarray | None = None) -> list[np.ndarray]:
    """Each client's training indices under the run config `cfg` (its scheme's `split`)."""
    return SCHEMES[cfg.partition].split(cfg, labels, domains)


if __name__ == "__main__":
    sys.exit(main())
