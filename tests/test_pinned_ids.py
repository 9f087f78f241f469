"""Issue 22: the partition-scheme and sweep refactor moves no identity. Every shipped workflow config
(config/*.yaml) and a synthetic sweep over every scheme's id corners must give the same run ids, partition
ids, heterogeneity ids, partition params (the partition rule's rerun trigger), partition identities (what a
saved partition is checked against) and heterogeneity labels as the code before the refactor.

The digests in tests/pinned_ids.json were computed by this file's `collect` on commit 2d49752 (before the
refactor): `.venv/bin/python tests/test_pinned_ids.py --write` rewrites them (only ever on purpose).
Config hashes are pinned elsewhere (tests/test_config_keys.py), since issue 22 item 4 moves some of them.
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).with_name("pinned_ids.json")
SHIPPED = ["config.yaml", "paper.yaml", "published-mnist.yaml"]  # config/published.yaml is a results registry

# Every scheme with every key that enters an id: alpha, rho, k, cpd, nway's ways/shots/stdev and its strides.
SYNTHETIC = {
    "seeds": [0, 3], "partition_seeds": [0, 1],
    "experiments": {
        "labels": {"datasets": {"digits": {}}, "methods": {"fedavg": {"default": {}}},
                   "heterogeneity": [
                       {"partition": "creff", "alpha": 0.1, "imbalance_ratio": 10, "num_clients": 20},
                       {"partition": "creff", "alpha": 1e-05, "num_clients": 10},
                       {"partition": "dirichlet", "alpha": 0.5, "num_clients": 10},
                       {"partition": "dirichlet", "alpha": 2, "imbalance_ratio": 2.5, "num_clients": 5},
                       {"partition": "pathological", "classes_per_client": 2, "num_clients": 10},
                       {"partition": "pathological", "classes_per_client": 3, "imbalance_ratio": 4,
                        "num_clients": 6, "alpha": None},
                       {"partition": "iid", "num_clients": 7},
                       {"partition": "iid", "num_clients": 7, "imbalance_ratio": 3},
                       {"partition": "nway", "ways": 3, "shots": 20, "stdev": 1, "num_clients": 5},
                       {"partition": "nway", "ways": 4, "shots": 10, "stdev": 2, "train_shots_max": 30,
                        "test_shots": 5, "num_clients": 4},
                   ]},
        "domains": {"datasets": {"office_caltech": {}}, "methods": {"fedproto": {"default": {}}},
                    "defaults": {"eval_mode": "personalized"},
                    "heterogeneity": [{"partition": "domains", "num_clients": 8},
                                      {"partition": "domains", "num_clients": 8, "clients_per_domain": 2}]},
    },
}

# The top-level sweep form (no `experiments:`), with grids, a dataset's own heterogeneity and ablation sections.
LEGACY = {
    "seeds": [0, 1], "defaults": {"rounds": 2},
    "datasets": {"digits": {}, "digit_domains": {"heterogeneity": [{"partition": "domains", "num_clients": 8}],
                                                 "methods": ["fedproto"], "eval_mode": "personalized"}},
    "heterogeneity": [{"partition": "dirichlet", "alpha": 0.3, "num_clients": 10},
                      {"partition": "pathological", "classes_per_client": 2, "num_clients": 10}],
    "methods": {"fedavg": {"default": {}}, "fedprox": {"default": {"mu": 0.01}},
                "fedproto": {"default": {"config": {"eval_mode": "personalized"}}}},
    "grids": {"fedprox": {"mu": [0.1, 1.0], "config.lr": [0.05]}},
    "ablations": [{"methods": ["fedprox"], "datasets": ["digits"], "heterogeneity": [1], "seeds": [0],
                   "variants": {"mu0": {"mu": 0.0}}}],
}


def _workflow_configs() -> dict:
    from fedhpro.config import load_yaml_text

    out = {name: load_yaml_text((REPO / "config" / name).read_text(), name) for name in SHIPPED}
    out["synthetic"] = SYNTHETIC
    out["legacy"] = LEGACY
    return out


def _label_cond(cfg) -> dict:
    """A table setting as fedhpro.aggregate builds it (alpha NaN and classes_per_client 0 where unset)."""
    return {"dataset": cfg.dataset, "partition": cfg.partition,
            "alpha": math.nan if cfg.alpha is None else cfg.alpha,
            "classes_per_client": cfg.classes_per_client or 0, "imbalance_ratio": cfg.imbalance_ratio,
            "num_clients": cfg.num_clients, "eval_mode": cfg.eval_mode, "model": cfg.model}


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=False, default=str).encode()).hexdigest()


def collect(config) -> dict:
    """What must not move, of one workflow config: digests of the id tables and the number of runs."""
    from fedhpro.labels import condition_slug, heterogeneity_label
    from fedhpro.sweep import partitions_of, validate_workflow_config
    from fedhpro.train import run_partition_identity

    runs = validate_workflow_config(config, warn=lambda message: None)
    ids = [[r.run_id, r.partition_id, r.het, r.kind, list(r.experiments)] for r in runs]
    partitions = [[pid, spec.params()] for pid, spec in partitions_of(runs).items()]
    identities = [[r.partition_id, run_partition_identity(r.config, "sha256:" + "0" * 64)] for r in runs]
    labels = sorted({(heterogeneity_label(_label_cond(r.config)), condition_slug(_label_cond(r.config)))
                     for r in runs})
    return {"runs": len(runs), "ids": _digest(ids), "partition_params": _digest(partitions),
            "partition_identity": _digest(identities), "labels": _digest(labels)}


@pytest.mark.parametrize("name", SHIPPED + ["synthetic", "legacy"])
def test_ids_of_every_shipped_config_are_unchanged(name):
    pinned = json.loads(PINNED.read_text())[name]
    assert collect(_workflow_configs()[name]) == pinned


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    PINNED.write_text(json.dumps({name: collect(c) for name, c in _workflow_configs().items()}, indent=1) + "\n")
    print(PINNED.read_text())
