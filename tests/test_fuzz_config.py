"""Property-based tests: any config either validates or fails with a one-line ConfigError naming a key."""

import dataclasses
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
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


# ---------------------------------------------------------------- issue 15: YAML text, CLI flags, workflow configs
yaml_scalars = st.one_of(st.sampled_from(["1e-3", "1E5", "-2e-2", ".5", "1_000", "0x10", "yes", "~", "null", "nan",
                                          ".inf", "'1e-3'", "[1, 2]", "{a: 1}", "", "1e", "e5", "0.1"]),
                         st.integers(-5, 100).map(str), st.text(alphabet="abc019.e-:{}[]' ", max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS + ["bogus"]), yaml_scalars), max_size=6))
@example(pairs=[("method", "'"), ("method", "'")])  # the quote swallows the second line: one key, not two
@example(pairs=[("method", "1e-3"), ("variant", "'"), ("method", "'")])
@example(pairs=[("method", "fedavg"), ("method", "fedavg")])  # a real duplicate
def test_any_yaml_text_loads_or_names_the_key_or_line(tmp_path_factory, pairs):
    """Config *files* (YAML 1.2 numbers, duplicate keys, broken syntax): a RunConfig or a one-line ConfigError."""
    from fedhpro.config import load_config

    path = tmp_path_factory.mktemp("yaml") / "run.yaml"
    text = "".join(f"{k}: {v}\n" for k, v in pairs)
    path.write_text(text)
    # The keys as YAML parses the text (a quote or bracket in one value can swallow the next lines, so a key
    # written twice is not always a duplicate); PyYAML's composer keeps duplicates. None: not valid YAML.
    try:
        node = yaml.compose(text)
        keys = [k.value if isinstance(k, yaml.ScalarNode) else repr(k) for k, _ in node.value] \
            if isinstance(node, yaml.MappingNode) else []
    except yaml.YAMLError:
        keys = None
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err)
        if keys is None:
            assert "not valid YAML" in str(err)
        elif len(set(keys)) < len(keys):
            assert "duplicate key" in str(err)
        return
    assert isinstance(cfg, RunConfig)
    assert keys is not None and len(set(keys)) == len(keys)  # duplicates are never accepted


flag_values = st.sampled_from(["0", "-1", "1", "2", "3", "abc", "1e-3", "0.5", "", "digits", "nope", "iid",
                               "dirichlet", "creff", "pathological", "final", "last_k", "best"])
cli_flags = {
    "partition": ["--dataset", "--scheme", "--num-clients", "--seed", "--alpha", "--rho", "--classes-per-client",
                  "--min-size", "--out", "--bogus"],
    "aggregate": ["--runs", "--out", "--rule", "--last-k", "--figures", "--bogus"],
    "train": ["--config", "--out", "--threads", "--set", "--partition-dir", "--bogus"],
    "bench": ["--threads", "--rounds", "--bogus"],
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(cli_flags)).flatmap(
    lambda cmd: st.tuples(st.just(cmd), st.lists(st.tuples(st.sampled_from(cli_flags[cmd]), flag_values),
                                                 max_size=5))))
def test_any_cli_flags_give_a_result_or_a_one_line_error(tmp_path_factory, capsys, drawn):
    """Every subcommand, any flags: exit 0 or a single `error: ...` line, never a traceback. Configs given to
    `train` hold rounds: 0 and `bench` always gets an invalid flag, so nothing trains."""
    from fedhpro.cli import main

    cmd, pairs = drawn
    work = tmp_path_factory.mktemp("cli")
    (work / "run.yaml").write_text("rounds: 0\nnum_clients: 3\n")
    (work / "a_file").write_text("x")
    places = {"--out": [str(work / "out"), str(work / "a_file")], "--config": [str(work / "run.yaml")],
              "--runs": [str(work / "**" / "metrics.parquet")], "--figures": [str(work / "figs")],
              "--partition-dir": [str(work)]}
    argv = [cmd]
    for flag, value in pairs:
        if flag in places:
            value = places[flag][len(value) % len(places[flag])]
        argv += [flag, value]
    if cmd == "bench":
        argv += ["--threads", "0"]
    if cmd == "train":
        argv += ["--set", "rounds=0"]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    if rc != 0:
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (argv, err)


workflow_changes = st.dictionaries(
    st.sampled_from(["defaults", "heterogeneity", "methods", "seeds", "reporting", "threads", "grids", "mirrors",
                     "datasets", "data_root", "bogus"]),
    st.one_of(scalars, st.lists(st.dictionaries(st.sampled_from(["partition", "alpha", "num_clients",
                                                                  "imbalance_ratio", "x"]), scalars, max_size=3),
                                max_size=2),
              st.dictionaries(st.sampled_from(["rounds", "lr", "engine", "eval_mode", "local_test_fraction",
                                               "fedavg", "fedhpro", "digits", "rule", "last_k", "default"]),
                              st.one_of(scalars, st.dictionaries(st.sampled_from(["default", "mu"]), scalars,
                                                                 max_size=2)), max_size=3)),
    max_size=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workflow_changes)
def test_any_workflow_config_expands_or_names_the_key(changes):
    """A workflow config (base sweep with random replacements): runs, or one SweepConfigError line."""
    from fedhpro.sweep import SweepConfigError, validate_workflow_config

    config = {"defaults": {"rounds": 2, "num_clients": 3}, "datasets": {"digits": {}},
              "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}}, "seeds": [0],
              **changes}
    try:
        runs = validate_workflow_config(config, warn=lambda message: None)
    except SweepConfigError as err:
        assert "\n" not in str(err)
        return
    assert runs and all(isinstance(r.config, RunConfig) for r in runs)
