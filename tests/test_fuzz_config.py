"""Property-based tests: any config either validates or fails with a one-line ConfigError naming a key."""

import dataclasses
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhpro.config import ConfigError, RunConfig, from_dict
from fedhpro.methods import METHOD_MODULES

KEYS = [f.name for f in dataclasses.fields(RunConfig)]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["fedhpro", "fedavg", "digits", "cifar10", "creff",
                                                           "dirichlet", "pathological", "global", "personalized",
                                                           "cnn", "auto", "cpu", "matching"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=8), scalars, max_size=3))
param_names = st.sampled_from(["mu", "distance", "hpcl", "temperature", "prototypes_per_class", "lamda", "bogus"])
configs = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=10)),
    st.one_of(values, st.dictionaries(param_names, scalars, max_size=3)),
    max_size=8)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_any_config_validates_or_names_the_key(raw):
    try:
        cfg = from_dict(raw)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and "config" in message
        return
    assert isinstance(cfg, RunConfig)
    assert cfg.method in METHOD_MODULES


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(st.dictionaries(st.sampled_from(["alpha", "rounds", "method", "lr", "num_clients", "dataset"]), scalars,
                       min_size=1, max_size=3))
def test_cli_never_prints_a_traceback(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump({**raw, "rounds": 0} if "rounds" not in raw else raw))
    # rounds: 0 (or the drawn value) keeps every valid config from training for long: validation only.
    out = subprocess.run([sys.executable, "-m", "fedhpro.cli", "train", "--config", str(path), "--out",
                          str(path.parent / "out"), "--quiet", "--set", "rounds=0"],
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr
    assert out.returncode == 2 and out.stderr.startswith("error: ")
