"""FedProto's n-way k-shot split (`partition` scheme 'nway').

The reference is FedProto's own algorithm (yuetan031/FedProto exps/federated_main.py + lib/sampling.py),
restated below with the GLOBAL numpy and Python RNGs exactly as FedProto seeds and draws them
(np.random.seed, random.seed, np.random.randint, random.sample, label-sorted index blocks), so the class
counts each client gets for a fixed seed are checked against how FedProto draws them, not against our code.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedhpro.partition import (SCHEMES, client_class_counts, nway_draws, nway_rule, nway_test_parts,
                               partition_identity, partition_labels)


def fedproto_reference(train_y, test_y, *, num_classes, num_users, ways, shots, stdev, seed, dataset,
                       train_shots_max=110, test_shots=15):
    """FedProto's draws with its global RNG calls (saved and restored around them), per-client index lists."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        np.random.seed(seed)
        random.seed(seed)
        n_list = np.random.randint(max(2, ways - stdev), min(num_classes, ways + stdev + 1), num_users)
        if dataset == "mnist":
            k_list = np.random.randint(shots - stdev + 1, shots + stdev - 1, num_users)
        elif dataset == "cifar100":
            k_list = np.random.randint(shots, shots + 1, num_users)
        else:
            k_list = np.random.randint(shots - stdev + 1, shots + stdev + 1, num_users)

        def label_sorted(y):
            idxs = np.arange(len(y))
            order = np.argsort(y, kind="stable")  # FedProto: quicksort; the stable order is the block layout
            label_begin = {}
            for cnt, lab in enumerate(y[order]):
                label_begin.setdefault(int(lab), cnt)
            return idxs[order], label_begin

        idxs, begin_of = label_sorted(train_y)
        train, classes_list = [], []
        for i in range(num_users):
            classes = np.sort(random.sample(range(0, num_classes), n_list[i]))
            user = np.array([])
            for c in classes:
                begin = begin_of[int(c)] + (i * 5 if dataset == "cifar100" else i * train_shots_max)
                user = np.concatenate((user, idxs[begin:begin + k_list[i]]), axis=0)
            train.append(user.astype(np.int64))
            classes_list.append(classes)
        tidxs, tbegin_of = label_sorted(test_y)
        test = []
        for i in range(num_users):
            k = {"mnist": 40, "cifar100": 5}.get(dataset, test_shots)
            user = np.array([])
            for c in classes_list[i]:
                begin = (random.randint(0, 90) if dataset == "cifar100" else i * k) + tbegin_of[int(c)]
                user = np.concatenate((user, tidxs[begin:begin + k]), axis=0)
            test.append(user.astype(np.int64))
        return n_list, k_list, train, test
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def balanced_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    y = np.repeat(np.arange(num_classes), per_class)
    return np.random.RandomState(seed).permutation(y)


def ours(train_y, test_y, dataset, **kw):
    rule = nway_rule(dataset)
    tsm = kw.pop("train_shots_max", 110)
    ts = kw.pop("test_shots", None)
    train = partition_labels(train_y, scheme="nway", train_shots_max=tsm, nway_rule_name=rule, **kw)
    test = nway_test_parts(test_y, rule=rule, test_shots=ts, **kw)
    return train, test


def test_nway_is_a_declared_scheme():
    from fedhpro.config import RunConfig
    from fedhpro.params import declared_choices, declared_fields

    assert "nway" in SCHEMES and "nway" in declared_choices(declared_fields(RunConfig)["partition"][0])


def test_mnist_class_counts_for_seed_0_are_fedprotos():
    """n=3, k=100, stdev=2, 20 clients (FedProto's MNIST command): literal values of FedProto's draws for
    seed 0, then every client's class counts against the reference above."""
    train_y, test_y = balanced_labels(10, 2300, 1), balanced_labels(10, 850, 2)
    train, test = ours(train_y, test_y, "mnist", num_clients=20, seed=0, ways=3, shots=100, stdev=2)
    n_list, k_list, ref_train, ref_test = fedproto_reference(train_y, test_y, num_classes=10, num_users=20, ways=3,
                                                             shots=100, stdev=2, seed=0, dataset="mnist")
    # FedProto's randint(max(2, 1), min(10, 6)) -> n in 2..5; MNIST's k in [99, 101)
    assert n_list.tolist() == [2, 5, 3, 2, 5, 5, 5, 5, 3, 5, 3, 4, 2, 5, 4, 2, 2, 2, 4, 3]
    assert k_list.tolist() == [99, 100, 100, 99, 99, 100, 100, 100, 100, 99, 100, 99, 100, 99, 100, 100, 99, 100,
                               100, 99]
    counts = client_class_counts(train_y, train, 10)
    assert counts[0].tolist() == [0, 0, 0, 0, 0, 0, 99, 0, 0, 99]  # client 0: classes 6, 9 (random.sample)
    assert counts[1].tolist() == [100, 0, 100, 100, 100, 0, 0, 100, 0, 0]
    np.testing.assert_array_equal(counts, client_class_counts(train_y, ref_train, 10))
    np.testing.assert_array_equal((counts > 0).sum(1), n_list)
    for i, part in enumerate(train):  # the very same samples (blocks of the label-sorted order)
        np.testing.assert_array_equal(part, ref_train[i])
        np.testing.assert_array_equal(test[i], ref_test[i])
    tcounts = client_class_counts(test_y, test, 10)
    np.testing.assert_array_equal(tcounts, 40 * (counts > 0))  # MNIST: 40 test images per held class
    everything = np.concatenate(train)
    assert len(np.unique(everything)) == len(everything)  # blocks never overlap (stride 110 >= k)


@pytest.mark.parametrize("dataset,seed,ways,stdev", [("cifar10", 3, 5, 1), ("cifar100", 7, 10, 2),
                                                     ("femnist", 1, 4, 1)])
def test_other_rules_match_fedprotos_draws(dataset, seed, ways, stdev):
    num_classes = {"cifar100": 100, "femnist": 62}.get(dataset, 10)
    train_y, test_y = balanced_labels(num_classes, 2300, seed), balanced_labels(num_classes, 400, seed + 1)
    train, test = ours(train_y, test_y, dataset, num_clients=20, seed=seed, ways=ways, shots=100, stdev=stdev)
    _, k_list, ref_train, ref_test = fedproto_reference(train_y, test_y, num_classes=num_classes, num_users=20,
                                                        ways=ways, shots=100, stdev=stdev, seed=seed, dataset=dataset)
    for i in range(20):
        np.testing.assert_array_equal(train[i], ref_train[i])
        np.testing.assert_array_equal(test[i], ref_test[i])
    if dataset == "cifar100":  # FedProto: k = shots, 5 local test images per class at a random offset
        assert set(k_list.tolist()) == {100}
        assert all(len(t) == 5 * len(np.unique(train_y[p])) for t, p in zip(test, train))
    else:
        assert set(k_list.tolist()) <= set(range(100 - stdev + 1, 100 + stdev + 1))


def test_the_split_leaves_the_global_rngs_alone_and_is_deterministic():
    y = balanced_labels(10, 2300, 0)
    np.random.seed(5)
    random.seed(5)
    before = (np.random.random(), random.random())
    np.random.seed(5)
    random.seed(5)
    a = partition_labels(y, scheme="nway", num_clients=20, seed=4, ways=3, nway_rule_name="mnist")
    assert (np.random.random(), random.random()) == before
    b = partition_labels(y, scheme="nway", num_clients=20, seed=4, ways=3, nway_rule_name="mnist")
    assert all(np.array_equal(x, z) for x, z in zip(a, b))


def test_errors_are_one_line_and_name_the_setting():
    y = balanced_labels(10, 300, 0)
    with pytest.raises(ValueError, match="needs ways"):
        partition_labels(y, scheme="nway", num_clients=4, seed=0)
    with pytest.raises(ValueError, match="too few for the block"):  # 20 clients x 110 > 300 per class
        partition_labels(y, scheme="nway", num_clients=20, seed=0, ways=3)
    with pytest.raises(ValueError, match="empty range of samples per class"):  # MNIST: randint(100, 100)
        nway_draws(10, 4, ways=3, shots=100, stdev=1, seed=0, rule="mnist")
    with pytest.raises(ValueError, match="train_shots_max=50"):
        partition_labels(y, scheme="nway", num_clients=2, seed=0, ways=3, train_shots_max=50,
                         nway_rule_name="cifar10")


def test_identity_records_the_nway_keys_only_for_nway():
    base = dict(dataset="mnist", data_fingerprint="sha256:x", num_clients=20, seed=0)
    nway = partition_identity(scheme="nway", ways=3, shots=100, stdev=2, train_shots_max=110, **base)
    assert (nway["ways"], nway["shots"], nway["stdev"], nway["train_shots_max"], nway["test_shots"]) == (3, 100, 2,
                                                                                                         110, None)
    other = partition_identity(scheme="iid", ways=3, shots=100, **base)
    assert other["ways"] is None and other["shots"] is None


def test_config_het_id_and_local_test_sets_from_the_test_split(tmp_path):
    """A digits run with partition nway: clients train on their blocks and are scored on test-split samples
    of exactly their classes; the het id names ways/shots/stdev; a missing `ways` is a one-line error."""
    from fedhpro.config import ConfigError, from_dict
    from fedhpro.sweep import het_id
    from fedhpro.train import build_context

    with pytest.raises(ConfigError, match="'ways' is required"):
        from_dict({"dataset": "digits", "partition": "nway"})
    cfg = from_dict({"dataset": "digits", "partition": "nway", "ways": 3, "shots": 10, "stdev": 2,
                     "train_shots_max": 12, "test_shots": 3, "num_clients": 4, "eval_mode": "personalized",
                     "method": "local", "device": "cpu"})
    assert het_id(cfg) == "nway-w3-k10-sd2-tsm12-ts3-n4"
    assert cfg.effective_local_test_fraction == 0.0
    ctx = build_context(cfg)
    for client in ctx.clients:
        train_classes = set(client.y.tolist())
        assert set(client.test_y.tolist()) == train_classes
        assert client.test_y.numel() == 3 * len(train_classes)
        assert {int(v) for v in client.class_counts[client.class_counts > 0]} <= set(range(9, 13))  # randint(k - sd + 1, k + sd + 1)


def test_cli_prints_train_and_local_test_counts_and_saves_the_identity(tmp_path, capsys):
    import json

    from fedhpro.partition import main

    out = tmp_path / "part"
    assert main(["--dataset", "digits", "--scheme", "nway", "--num-clients", "4", "--ways", "3", "--shots", "10",
                 "--train-shots-max", "12", "--test-shots", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "local test sets (FedProto: drawn from the test split)" in text
    identity = json.loads((out / "meta.json").read_text())["identity"]
    assert (identity["scheme"], identity["ways"], identity["shots"], identity["test_shots"]) == ("nway", 3, 10, 3)
    # a missing --ways is a one-line usage error (exit 2)
    assert main(["--dataset", "digits", "--scheme", "nway", "--num-clients", "4"]) == 2
    err = capsys.readouterr().err
    assert "needs ways" in err and len(err.strip().splitlines()) == 1


def test_fedprotos_protocol_scores_global_and_local_runs_on_the_clients_test_sets(tmp_path):
    """FedAvg (global mode) under nway reports the global model's client mean on the local test sets; Local
    (personalized) sends nothing and is scored on the same local test sets."""
    import numpy as np

    from fedhpro.config import from_dict
    from fedhpro.train import build_context, train

    base = {"dataset": "digits", "partition": "nway", "ways": 3, "shots": 10, "stdev": 2, "train_shots_max": 12,
            "test_shots": 3, "num_clients": 4, "rounds": 2, "batch_size": 8, "lr": 0.05, "device": "cpu",
            "diagnostics": False}
    fedavg = train(from_dict({**base, "method": "fedavg"}), tmp_path / "fedavg")
    assert fedavg["client_acc_mean"].notna().all() and fedavg["test_acc"].notna().all()
    local_cfg = from_dict({**base, "method": "local", "eval_mode": "personalized"})
    local = train(local_cfg, tmp_path / "local")
    assert (local["bytes_up"] == 0).all() and (local["bytes_down"] == 0).all()
    ctx = build_context(local_cfg)
    sizes = np.array([c.test_y.numel() for c in ctx.clients])
    last = local.iloc[-1]
    assert 0 <= last["client_acc_mean"] <= 1 and sizes.sum() == 3 * sum(len(set(c.y.tolist())) for c in ctx.clients)
