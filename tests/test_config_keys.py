"""Issue 14, one declaration per key: every RunConfig key declared once with `param` (type, default, help,
choices, bounds), one checker for config keys and method params, `fedhpro config`, and the workflow schema
tested against the declarations. The config hash and canonical JSON of existing configs must not move."""

import pytest

from fedhpro.config import from_dict

# Computed on the code BEFORE the issue-14 refactor of RunConfig's declarations (commit 0ef5b09): the
# refactor must leave every existing config's canonical JSON, and so its hash and run id, bit-identical.
PINNED = [
    ({}, "44136fa355b3678a", "{}"),
    ({"method": "fedhpro", "dataset": "digits", "partition": "creff", "alpha": 0.1, "imbalance_ratio": 10,
      "num_clients": 20, "rounds": 3, "lr": 1e-2, "momentum": 0.9, "seed": 3, "partition_seed": 1,
      "method_params": {}},
     "f9f4a65847eabb6a",
     '{"alpha":0.1,"imbalance_ratio":10.0,"lr":0.01,"method":"fedhpro","method_revision":1,"momentum":0.9,'
     '"num_clients":20,"partition":"creff","partition_seed":1,"rounds":3,"seed":3}'),
    ({"method": "fedprox", "partition": "pathological", "alpha": None, "classes_per_client": 2, "engine": "batched",
      "clients_per_round": 5, "weight_decay": 5e-4, "diagnostics": False, "method_params": {"mu": 0.1},
      "data_root": "/elsewhere", "lr": "1e-3", "augment": "none"},
     "35e2a769ff7ee022",
     '{"alpha":null,"augment":"none","classes_per_client":2,"clients_per_round":5,"diagnostics":false,'
     '"engine":"batched","lr":0.001,"method":"fedprox","method_params":{"mu":0.1},"partition":"pathological",'
     '"weight_decay":0.0005}'),
    ({"method": "fedproto", "eval_mode": "personalized", "client_models": ["cnn", "cnn"], "local_test_fraction": 0.2,
      "feature_dim": 64, "precision": "bf16", "dataset_options": {"test_fraction": 0.3}, "channels_last": True,
      "client_store": "disk", "device": "cpu", "eval_every": 2, "checkpoint_every": 3, "test_batch_size": 100,
      "batch_size": 32, "local_epochs": 2, "augment_per": "sample", "variant": "v1", "method_params": {"lamda": 2}},
     "40b04509c9680eb7",
     '{"augment_per":"sample","batch_size":32,"channels_last":true,"checkpoint_every":3,"client_models":["cnn",'
     '"cnn"],"client_store":"disk","dataset_options":{"test_fraction":0.3},"device":"cpu","eval_every":2,'
     '"eval_mode":"personalized","feature_dim":64,"local_epochs":2,"local_test_fraction":0.2,"method":"fedproto",'
     '"method_params":{"lamda":2.0},"precision":"bf16","test_batch_size":100,"variant":"v1"}'),
]


@pytest.mark.parametrize("raw, config_hash, canonical", PINNED)
def test_config_hash_and_canonical_json_unchanged(raw, config_hash, canonical):
    cfg = from_dict(raw)
    assert cfg.canonical_json() == canonical
    assert cfg.config_hash() == config_hash
