"""The `slurm:` section's defaults are declared once (fedhpro.sweep.SLURM_DEFAULTS): LaunchOptions takes
them from there, and the JSON schema that fills in the workflow config and the shipped configs agree."""

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from fedhpro.launch import LaunchOptions
from fedhpro.sweep import SLURM_DEFAULTS, SweepConfigError, check_slurm

REPO = Path(__file__).resolve().parents[1]


def schema_slurm() -> dict:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    return schema["properties"]["slurm"]["properties"]


def test_schema_declares_the_same_keys_and_defaults():
    props = schema_slurm()
    assert list(props) == list(SLURM_DEFAULTS)
    assert {key: prop["default"] for key, prop in props.items()} == SLURM_DEFAULTS


def test_launch_options_default_to_slurm_defaults():
    options = LaunchOptions()
    declared = {f.name for f in fields(LaunchOptions)}
    assert set(SLURM_DEFAULTS) <= declared
    assert {key: getattr(options, key) for key in SLURM_DEFAULTS} == SLURM_DEFAULTS
    # an empty section and no section give the same options as the dataclass defaults
    assert LaunchOptions.from_config({}) == LaunchOptions.from_config(None) == options
    # the mutable default is a copy, not the shared declaration
    assert options.additional is not SLURM_DEFAULTS["additional"]


def test_check_slurm_fills_in_the_defaults_and_keeps_what_is_set():
    assert check_slurm(None) == SLURM_DEFAULTS
    assert check_slurm({"gpus": 0, "partition": "debug"}) == {**SLURM_DEFAULTS, "gpus": 0, "partition": "debug"}
    with pytest.raises(SweepConfigError, match=r"^slurm\.gpu: unknown key"):
        check_slurm({"gpu": 1})


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_shipped_configs_set_only_what_differs_from_the_defaults(name):
    """A key spelled at its default value would be a second declaration that silently goes stale."""
    section = yaml.safe_load((REPO / "config" / name).read_text()).get("slurm") or {}
    assert set(section) <= set(SLURM_DEFAULTS), name
    repeated = {key: value for key, value in section.items() if value == SLURM_DEFAULTS[key]}
    assert not repeated, f"config/{name} repeats SLURM defaults {repeated}; declare them only in SLURM_DEFAULTS"
