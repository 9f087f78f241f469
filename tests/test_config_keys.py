"""Issue 14, one declaration per key: every RunConfig key declared once with `param` (type, default, help,
choices, bounds), one checker for config keys and method params, `fedhpro config`, and the workflow schema
tested against the declarations. The config hash and canonical JSON of existing configs must not move."""

import pytest

from fedhpro.config import from_dict

# Computed on the code BEFORE the issue-14 refactor of RunConfig's declarations (commit 0ef5b09): the
# refactor must leave every existing config's canonical JSON, and so its hash and run id, bit-identical (the
# execution keys have left the hash since: issue 22, docs/run-identity.md).
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
     "7bf1ca2a8afc907e",  # 35e2a769ff7ee022 while `diagnostics` (an execution key, issue 22) was hashed
     '{"alpha":null,"augment":"none","classes_per_client":2,"clients_per_round":5,'
     '"engine":"batched","lr":0.001,"method":"fedprox","method_params":{"mu":0.1},"partition":"pathological",'
     '"weight_decay":0.0005}'),
    ({"method": "fedproto", "eval_mode": "personalized", "client_models": ["cnn", "cnn"], "local_test_fraction": 0.2,
      "feature_dim": 64, "precision": "bf16", "dataset_options": {"test_fraction": 0.3}, "channels_last": True,
      "client_store": "disk", "device": "cpu", "eval_every": 2, "checkpoint_every": 3, "test_batch_size": 100,
      "batch_size": 32, "local_epochs": 2, "augment_per": "sample", "variant": "v1", "method_params": {"lamda": 2}},
     "11f29e9975672ead",  # 40b04509c9680eb7 while `checkpoint_every` and `client_store` were hashed (issue 22)
     '{"augment_per":"sample","batch_size":32,"channels_last":true,"client_models":["cnn",'
     '"cnn"],"dataset_options":{"test_fraction":0.3},"device":"cpu","eval_every":2,'
     '"eval_mode":"personalized","feature_dim":64,"local_epochs":2,"local_test_fraction":0.2,"method":"fedproto",'
     '"method_params":{"lamda":2.0},"precision":"bf16","test_batch_size":100,"variant":"v1"}'),
]


@pytest.mark.parametrize("raw, config_hash, canonical", PINNED)
def test_config_hash_and_canonical_json_unchanged(raw, config_hash, canonical):
    cfg = from_dict(raw)
    assert cfg.canonical_json() == canonical
    assert cfg.config_hash() == config_hash


# The workflow schema is generated from the declarations (fedhpro.sections); tests/test_sections.py checks the
# committed file is that output, and that a heterogeneity entry's keys carry the run config's types and choices.


# ---------------------------------------------------------------- declarations and the one checker
def test_every_runconfig_key_is_declared_with_help_and_a_valid_default():
    from fedhpro.config import RunConfig
    from fedhpro.params import check_value, declared_fields, field_default

    declared = declared_fields(RunConfig)
    assert len(declared) == len(RunConfig.__dataclass_fields__) >= 38
    for name, (f, kind, nullable) in declared.items():
        help_text = f.metadata.get("help", "")
        assert help_text and "\n" not in help_text, name
        default = field_default(f)
        assert check_value(name, f, kind, nullable, default) == default, name


@pytest.mark.parametrize("raw, message", [
    ({"rounds": 1.5}, "config key 'rounds' must be an integer, got 1.5"),
    ({"method": "fedhpro", "method_params": {"prototypes_per_class": 1.5}},
     "config key 'method_params.prototypes_per_class' (fedhpro) must be an integer, got 1.5"),
    ({"lr": "fast"}, "config key 'lr' must be a number, got 'fast'"),
    ({"method": "fedprox", "method_params": {"mu": "fast"}},
     "config key 'method_params.mu' (fedprox) must be a number"),
    ({"lr": 0}, "config key 'lr' must be > 0, got 0.0"),
    ({"method": "fedhpro", "method_params": {"temperature": 0}},
     "config key 'method_params.temperature' (fedhpro) must be > 0.0, got 0.0"),
    ({"augment": "rotate"}, "config key 'augment': unknown value 'rotate'; accepted: auto, none, crop_flip, flip"),
    ({"method": "fedhpro", "method_params": {"distance": "l1"}},
     "config key 'method_params.distance' (fedhpro): unknown value 'l1'; accepted: matching, cos, mse"),
    ({"seed": 2**32}, "config key 'seed' must be in [0, 2**32), got 4294967296"),
    ({"partition_seed": -1}, "config key 'partition_seed' must be in [0, 2**32), got -1"),
    ({"local_test_fraction": 1}, "config key 'local_test_fraction' must be in [0, 1), got 1.0"),
    ({"imbalance_ratio": 0.5}, "config key 'imbalance_ratio' must be >= 1, got 0.5"),
    ({"batch_size": 1}, "config key 'batch_size' must be >= 2, got 1"),  # a batch of one is never trained
    ({"lr": float("inf")}, "config key 'lr' must be finite, got inf"),
    ({"rounds": None}, "config key 'rounds' must not be null"),
    ({"client_models": ["cnn", "vgg"]}, "config key 'client_models': unknown value 'vgg'; accepted: cnn,"),
    ({"model": "vgg"}, "config key 'model': unknown value 'vgg'; accepted: auto, cnn,"),
    ({"dataset": "nope"}, "config key 'dataset': unknown value 'nope'; accepted: "),
    ({"device": "tpu"}, "config key 'device': unknown value 'tpu'; accepted: auto, cpu, cuda, cuda:N"),
])
def test_one_checker_for_config_keys_and_method_params(raw, message):
    from fedhpro.config import ConfigError

    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_numbers_written_as_yaml_1_1_strings_are_numbers_for_keys_and_params():
    """`1e-3` read by a YAML 1.1 loader (Snakemake's) is a string; the one checker reads it as the number,
    for a RunConfig key and a method parameter alike."""
    cfg = from_dict({"method": "fedprox", "lr": "1e-3", "method_params": {"mu": "1e-3"}})
    assert cfg.lr == 0.001 and cfg.method_params["mu"] == 0.001
    assert cfg.config_hash() == from_dict({"method": "fedprox", "lr": 1e-3,
                                           "method_params": {"mu": 1e-3}}).config_hash()


def test_values_are_normalised_as_before():
    cfg = from_dict({"alpha": 1, "client_models": ["cnn"], "eval_mode": "personalized", "method": "fedproto",
                     "dataset_options": {}, "device": "cuda:1"})
    assert isinstance(cfg.alpha, float) and cfg.client_models == ("cnn",) and cfg.device == "cuda:1"


# ---------------------------------------------------------------- `fedhpro config`
def test_fedhpro_config_prints_every_key_with_type_default_and_help(capsys):
    import json

    from fedhpro.cli import main
    from fedhpro.config import RunConfig
    from fedhpro.params import declared_fields, describe_type, field_default

    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("RunConfig keys")
    by_key = {line.split()[0]: line for line in lines[1:]}
    declared = declared_fields(RunConfig)
    assert sorted(by_key) == sorted(declared)
    for name, (f, kind, nullable) in declared.items():
        line = by_key[name]
        assert line.endswith(f"= {json.dumps(field_default(f))}: {f.metadata['help']}"), line
        assert line.startswith(f"  {name} ({describe_type(kind, nullable)}"), line
    assert "(float; > 0; finite) = 0.1: local learning rate" in by_key["lr"]
    assert "one of sequential, batched" in by_key["engine"] and "or null" in by_key["alpha"]


def test_fedhpro_config_method_prints_its_params(capsys):
    from fedhpro.cli import main

    assert main(["config", "--method", "fedprox"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == ["method_params of fedprox:",
                                    "  mu (float; >= 0.0) = 0.01: proximal term weight mu"]
    assert main(["config", "--method", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: --method 'nope' is not a method; accepted: creff")
    assert len(captured.err.splitlines()) == 1
