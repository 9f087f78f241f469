"""Issue 22: the workflow config's sections are declared once with `param()` (fedhpro/sections.py), checked by
the run keys' checker, and the JSON schema Snakemake validates and fills the config with is generated from
them: the committed file must be exactly what `fedhpro schema --write` writes."""

import copy
import subprocess
import sys

import pytest
import yaml

from fedhpro.config import RunConfig
from fedhpro.params import declared_choices, declared_fields
from fedhpro.partition import heterogeneity_keys
from fedhpro.sections import (SCHEMA_PATH, AblationSection, Reporting, Slurm, check_section, json_schema,
                              schema_text, section_defaults)
from fedhpro.sweep import SLURM_DEFAULTS, SweepConfigError, check_slurm, check_workflow_keys

MINIMAL = {"datasets": {"digits": {}}, "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}}}


def test_committed_schema_is_generated_from_the_declarations():
    assert SCHEMA_PATH.read_text() == schema_text(), "run `fedhpro schema --write` and commit the schema"


def test_schema_command_prints_what_it_writes():
    out = subprocess.run([sys.executable, "-m", "fedhpro.cli", "schema"], capture_output=True, text=True, check=True)
    assert out.stdout == schema_text()


def test_snakemake_fills_the_declared_defaults():
    """Snakemake's validate(set_default=True) on a config without the sections gives the declared defaults."""
    from snakemake.utils import validate

    config = copy.deepcopy(MINIMAL)
    validate(config, str(SCHEMA_PATH))
    assert config["slurm"] == SLURM_DEFAULTS == section_defaults(Slurm)
    assert config["reporting"] == {"rule": "last_k", "last_k": 3} == section_defaults(Reporting)
    assert config["ablations"] == section_defaults(AblationSection)
    assert (config["seeds"], config["partition_seeds"], config["threads"], config["results"]) == ([0], [0], 1,
                                                                                                   "results")
    assert "kind" not in yaml.safe_load(SCHEMA_PATH.read_text())["$defs"]["experiment"]["properties"]["kind"] \
        .get("default", {})  # nothing is filled inside an experiment: the sweep applies those defaults


def test_a_list_of_ablation_sections_is_filled_and_a_bad_one_is_named():
    """`ablations:` as a list: Snakemake's default filler used to call setdefault on the list (a traceback);
    now each section gets the declared defaults, and a bad key inside one is named by schema_error."""
    from snakemake.utils import validate

    from fedhpro.runtable import schema_error

    config = {**copy.deepcopy(MINIMAL), "ablations": [{"methods": ["fedavg"]}, {"variants": {"x": {}}}]}
    validate(config, str(SCHEMA_PATH))
    assert config["ablations"] == [{**section_defaults(AblationSection), "methods": ["fedavg"]},
                                   {**section_defaults(AblationSection), "variants": {"x": {}}}]
    bad = {**copy.deepcopy(MINIMAL), "ablations": [{"methods": ["fedavg"]}, {"bogus": 1}]}
    assert schema_error(bad, str(SCHEMA_PATH)).startswith("ablations[1].bogus: unknown key; accepted: methods")


def test_heterogeneity_entries_carry_the_run_config_types_and_scheme_names():
    described = json_schema()["$defs"]["heterogeneity_entry"]["properties"]
    declared = declared_fields(RunConfig)
    assert list(described) == list(heterogeneity_keys())
    json_type = {"int": "integer", "float": "number", "str": "string"}
    for key, entry in described.items():
        f, kind, _ = declared[key]
        assert entry["type"] == json_type[kind] and entry["description"] == f.metadata["help"], key
    assert described["partition"]["enum"] == list(declared_choices(declared["partition"][0]))


@pytest.mark.parametrize("section, value, message", [
    (Slurm, {"gpus": -1}, "slurm.gpus: must be >= 0, got -1"),
    (Slurm, {"gpus": 1.5}, "slurm.gpus: must be an integer, got 1.5"),
    (Slurm, {"launcher": "ssh"}, "slurm.launcher: unknown value 'ssh'; accepted: local, submitit"),
    (Slurm, {"partition": ""}, "slurm.partition: must be a non-empty string, got ''"),
    (Slurm, {"mem_gb": 0}, "slurm.mem_gb: must be > 0, got 0"),
    (Slurm, {"run_minutes": {"digits": "fast"}}, "slurm.run_minutes.digits: must be a number, got 'fast'"),
    (Slurm, {"gpu": 1}, "slurm.gpu: unknown key; accepted: launcher, partition, account, gpus"),
    (Reporting, {"last_k": 0}, "reporting.last_k: must be >= 1, got 0"),
    (AblationSection, {"seeds": [0, -1]}, "ablations.seeds: must be >= 0, got -1"),
    (AblationSection, {"methods": "fedhpro"}, "ablations.methods: must be a list of names, got 'fedhpro'"),
])
def test_sections_are_checked_by_the_run_keys_checker(section, value, message):
    path = {Slurm: "slurm", Reporting: "reporting", AblationSection: "ablations"}[section]
    with pytest.raises(SweepConfigError) as info:
        check_section(section, value, path, SweepConfigError)
    assert str(info.value).startswith(message)


def test_slurm_values_are_kept_as_written_and_defaults_filled():
    out = check_slurm({"mem_gb": 32, "poll_seconds": "1e1", "run_minutes": {"digits": 3, "default": None}})
    assert out["mem_gb"] == 32 and isinstance(out["mem_gb"], int)  # sbatch sizes go on as given
    assert out["poll_seconds"] == 10.0  # a YAML 1.1 reading of 1e1 becomes the number
    assert out["run_minutes"] == {"digits": 3, "default": None}
    assert {k: v for k, v in out.items() if k not in ("mem_gb", "poll_seconds", "run_minutes")} == {
        k: v for k, v in SLURM_DEFAULTS.items() if k not in ("mem_gb", "poll_seconds", "run_minutes")}


def test_top_level_keys_are_checked_against_their_declarations():
    check_workflow_keys(MINIMAL)
    for bad, message in [({"threads": 0}, "threads: must be >= 1"), ({"results": ""}, "results: must be a non-empty"),
                         ({"report_partial": "yes"}, "report_partial: must be true or false"),
                         ({"seeds": ["a"]}, "seeds: must be a list of integers"),
                         ({"reporting": {"rule": "median"}}, "reporting.rule: unknown value 'median'"),
                         ({"result": "x"}, "result: unknown key; accepted: results, data_root")]:
        with pytest.raises(SweepConfigError) as info:
            check_workflow_keys({**MINIMAL, **bad})
        assert str(info.value).startswith(message), bad
