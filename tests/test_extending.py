"""docs/extending.md, shown with toys: declaring a partition scheme in one place (a `register_scheme` call,
as the shipped schemes are declared at the end of fedhpro/partition.py) makes the run config, the sweep's
ids, the partition rule's params, the partition identity, the labels, the split and the workflow schema
accept it; declaring a `slurm:` key in one place (fedhpro/sections.py, one line) makes the section's check,
its defaults, the launcher's options and the generated schema accept it."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedhpro import partition
from fedhpro.partition import IdPart, Scheme, register_scheme

REPO = Path(__file__).resolve().parents[1]


def _split_shards(cfg, labels, domains):
    """FedAvg's shards: the samples sorted by label, cut into classes_per_client shards per client, dealt out
    in a random order (RandomState(partition_seed))."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, cfg.num_clients * cfg.classes_per_client)
    deal = np.random.RandomState(cfg.partition_seed).permutation(len(shards))
    return [np.sort(np.concatenate([shards[j] for j in deal[i::cfg.num_clients]])).astype(np.int64)
            for i in range(cfg.num_clients)]


@pytest.fixture
def shards_scheme():
    """The toy scheme, declared as the shipped ones are; removed again afterwards."""
    scheme = register_scheme(Scheme(
        "shards", "label-sorted shards, classes_per_client per client (FedAvg)", _split_shards,
        keys=("classes_per_client",), required={"classes_per_client": " (shards per client)"},
        ids=(IdPart("s", "classes_per_client"),),
        label=lambda cond: f"shards s={int(cond['classes_per_client'])}", rank=6))
    try:
        yield scheme
    finally:
        del partition.SCHEMES["shards"]


def test_a_declared_scheme_is_accepted_everywhere(shards_scheme):
    from fedhpro.config import ConfigError, from_dict
    from fedhpro.labels import heterogeneity_label
    from fedhpro.sections import json_schema
    from fedhpro.sweep import validate_workflow_config

    # validation: the run config accepts it and applies its declared requirement
    cfg = from_dict({"partition": "shards", "classes_per_client": 2, "num_clients": 5, "alpha": None})
    with pytest.raises(ConfigError, match=r"config key 'classes_per_client' is required for partition 'shards' "
                                          r"\(shards per client\)"):
        from_dict({"partition": "shards", "num_clients": 5})
    # ids, the partition rule's params, the identity and the label, through a workflow config
    runs = validate_workflow_config({"datasets": {"digits": {}}, "methods": {"fedavg": {"default": {}}},
                                     "heterogeneity": [{"partition": "shards", "classes_per_client": 2,
                                                        "num_clients": 5, "alpha": None}]}, warn=lambda m: None)
    assert [r.run_id for r in runs] == ["digits/shards-s2-n5/fedavg/default/ps0_s0"]
    params = runs[0].partition().params()
    assert (params["scheme"], params["classes_per_client"], params["alpha"]) == ("shards", 2, None)
    identity = partition.identity_of(cfg, "sha256:x")
    assert (identity["scheme"], identity["classes_per_client"], identity["alpha"]) == ("shards", 2, None)
    assert heterogeneity_label({"partition": "shards", "classes_per_client": 2, "alpha": float("nan"),
                                "imbalance_ratio": 1.0}) == "shards s=2"
    # the split a run makes: every sample once, two label-sorted shards per client
    labels = np.repeat(np.arange(10), 20)
    parts = partition.split_for(cfg, labels)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200)) and len(parts) == 5
    assert all(len(np.unique(labels[p])) <= 4 for p in parts)
    # the workflow schema lists it
    assert "shards" in json_schema()["$defs"]["heterogeneity_entry"]["properties"]["partition"]["enum"]


def test_an_undeclared_scheme_is_refused_naming_the_declared_ones():
    from fedhpro.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"config key 'partition': unknown value 'shards'; accepted: creff, "
                                          r"dirichlet, pathological, iid, domains, nway$"):
        from_dict({"partition": "shards"})


def test_a_scheme_declaration_is_checked():
    with pytest.raises(ValueError, match="must be a new lower-case word"):
        register_scheme(Scheme("iid", "again", _split_shards))
    with pytest.raises(ValueError, match="must be among its keys"):
        register_scheme(Scheme("toy", "toy", _split_shards, ids=(IdPart("a", "alpha"),)))
    assert "toy" not in partition.SCHEMES


TOY_SLURM = '''
import json
from fedhpro.launch import LaunchOptions
from fedhpro.sections import schema_text
from fedhpro.sweep import SLURM_DEFAULTS, SweepConfigError, check_slurm

assert SLURM_DEFAULTS["qos"] is None
assert check_slurm({"qos": "high"})["qos"] == "high"
try:
    check_slurm({"qos": ""})
except SweepConfigError as err:
    print("refused:", err)
print("options:", LaunchOptions.from_config({"qos": "high"}, threads=2).qos)
print("schema:", "qos:" in schema_text())
'''


def test_a_declared_slurm_key_is_accepted_everywhere(tmp_path):
    """A copy of the package with one line added to fedhpro/sections.py (the `Slurm` section)."""
    shutil.copytree(REPO / "fedhpro", tmp_path / "fedhpro", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "workflow" / "schemas", tmp_path / "workflow" / "schemas")
    sections = tmp_path / "fedhpro" / "sections.py"
    anchor = '    runs_per_gpu: int = param(1, '
    text = sections.read_text()
    assert text.count(anchor) == 1
    sections.write_text(text.replace(anchor, '    qos: str | None = param(None, "SLURM quality of service '
                                             '(null = the default).")\n' + anchor))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(TOY_SLURM)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["refused: slurm.qos: must be a non-empty string, got ''", "options: high",
                                       "schema: True"]
    # the shipped package does not know it: an unknown key is refused, naming it
    from fedhpro.sweep import SweepConfigError, check_slurm

    with pytest.raises(SweepConfigError, match=r"^slurm\.qos: unknown key"):
        check_slurm({"qos": "high"})
