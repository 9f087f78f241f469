import json

import pytest

from fedhpro.config import ConfigError, RunConfig, from_dict, load_config
from fedhpro.methods import make_params


def test_defaults_resolve_method_params():
    cfg = from_dict({"method": "fedhpro"})
    assert cfg.method_params["prototypes_per_class"] == 5
    assert cfg.method_params["distance"] == "matching"
    assert cfg.method_params["temperature"] == 0.05
    assert make_params("fedhpro", cfg.method_params).hpcl_batch_scale is True


def test_load_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("method: fedprox\nalpha: 0.1\nmethod_params: {mu: 0.5}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.alpha == 0.1 and cfg.method_params == {"mu": 0.5}
    (tmp_path / "b.json").write_text(json.dumps({"method": "fedavg", "rounds": 3}))
    assert load_config(tmp_path / "b.json").rounds == 3


@pytest.mark.parametrize("raw, key", [
    ({"method": "nope"}, "method"),
    ({"alpha": -1}, "alpha"),
    ({"alpha": 0}, "alpha"),
    ({"num_clients": 5000}, "num_clients"),  # digits has 1437 training samples
    ({"bogus": 1}, "bogus"),
    ({"rounds": 0}, "rounds"),
    ({"rounds": 1.5}, "rounds"),
    ({"dataset": "nope"}, "dataset"),
    ({"partition": "pathological"}, "classes_per_client"),
    ({"partition": "creff", "num_clients": 5}, "num_clients"),
    ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
    ({"clients_per_round": 20, "num_clients": 10}, "clients_per_round"),
    ({"method": "fedhpro", "method_params": {"distance": "l1"}}, "method_params.distance"),
    ({"method": "fedhpro", "method_params": {"nope": 1}}, "method_params.nope"),
    ({"method": "fedprox", "method_params": {"mu": -1}}, "method_params.mu"),
    ({"method": "fedhpro", "method_params": {"hpcl": "yes"}}, "method_params.hpcl"),
    ({"eval_mode": "personalized", "method": "fedavg"}, "eval_mode"),
    ({"client_models": ["cnn", "resnet10"]}, "client_models"),
    ({"model": "vgg"}, "model"),
])
def test_invalid_configs_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert repr(key) in str(err.value) or key in str(err.value)
    assert "\n" not in str(err.value)


def test_hash_changes_with_any_effective_value():
    a = from_dict({"method": "fedhpro"})
    b = from_dict({"method": "fedhpro", "method_params": {"temperature": 0.05}})
    c = from_dict({"method": "fedhpro", "method_params": {"temperature": 0.1}})
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert isinstance(a, RunConfig)
    with pytest.raises(Exception):
        a.rounds = 5  # frozen


def test_hash_covers_non_default_values_only():
    """A key left at its default does not enter the hash, so adding a key keeps old runs' hashes valid."""
    plain = from_dict({"method": "fedhpro", "rounds": 5})
    spelled = from_dict({"method": "fedhpro", "rounds": 5, "precision": "fp32", "channels_last": False,
                         "client_store": "memory", "engine": "sequential"})
    assert plain.config_hash() == spelled.config_hash()
    assert plain.canonical_dict() == {"method": "fedhpro", "rounds": 5, "method_revision": 1}  # REVISIONS
    for change in ({"precision": "bf16"}, {"channels_last": True}, {"rounds": 6}):
        assert from_dict({"method": "fedhpro", "rounds": 5, **change}).config_hash() != plain.config_hash(), change
    # an execution key changes no number, so not the hash either (tests/test_run_identity.py)
    assert from_dict({"method": "fedhpro", "rounds": 5, "client_store": "disk"}).config_hash() == plain.config_hash()
    with pytest.raises(ConfigError, match="'channels_last' must be true or false"):
        from_dict({"channels_last": "yes"})
    with pytest.raises(ConfigError, match="'precision': unknown value 'fp8'"):
        from_dict({"precision": "fp8"})


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "bad.yaml")
