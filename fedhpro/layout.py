"""Where a sweep's runs and partitions live under the results root: the one definition of the run id, the
partition id and their directories, used by the sweep (`fedhpro.sweep`), the workflow rules
(`workflow/rules/common.smk`, whose wildcards are the fields below) and the scripts.

Imports nothing (no torch): the Snakemake process on the submit host reads it at parse time.

* partition id ``{dataset}/{het}/ps{pseed}`` -> ``<results>/partitions/<partition id>/``;
* run id ``{dataset}/{het}/{method}/{variant}/ps{pseed}_s{seed}`` -> ``<results>/runs/<run id>/``.

The patterns are also Snakemake wildcard patterns (``{dataset}``, ``{het}``, ... ``{seed}``); every field
is a single path component (`fedhpro.sweep.WILDCARD_PATTERNS` allows no '/').
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["RUN_ID", "PARTITION_ID", "RUNS", "PARTITIONS", "RUN_FIELDS", "PARTITION_FIELDS", "run_id",
           "partition_id", "run_dir", "partition_dir", "run_id_of", "partition_id_of", "shared_data"]

RUN_ID = "{dataset}/{het}/{method}/{variant}/ps{pseed}_s{seed}"
PARTITION_ID = "{dataset}/{het}/ps{pseed}"
RUNS = "runs"  # <results>/runs/<run id>/
PARTITIONS = "partitions"  # <results>/partitions/<partition id>/
RUN_FIELDS = ("dataset", "het", "method", "variant", "pseed", "seed")
PARTITION_FIELDS = ("dataset", "het", "pseed")


def run_id(dataset: str, het: str, method: str, variant: str, partition_seed: Any, seed: Any) -> str:
    """The run id, e.g. ``digits/dirichlet-a0p5-n10/fedavg/default/ps0_s1``."""
    return RUN_ID.format(dataset=dataset, het=het, method=method, variant=variant, pseed=partition_seed, seed=seed)


def partition_id(dataset: str, het: str, partition_seed: Any) -> str:
    """The partition id, e.g. ``digits/dirichlet-a0p5-n10/ps0``."""
    return PARTITION_ID.format(dataset=dataset, het=het, pseed=partition_seed)


def run_id_of(wildcards: Mapping[str, Any]) -> str:
    """The run id of a rule's wildcards (a mapping or Snakemake's Wildcards; extra fields are ignored)."""
    return run_id(*(_field(wildcards, name) for name in RUN_FIELDS))


def partition_id_of(wildcards: Mapping[str, Any]) -> str:
    """The partition id of a rule's wildcards (a run's or a partition's)."""
    return partition_id(*(_field(wildcards, name) for name in PARTITION_FIELDS))


def run_dir(results: str, run: str) -> str:
    """``<results>/runs/<run id>``; with `run` = `RUN_ID` it is the rules' output pattern."""
    return f"{results.rstrip('/')}/{RUNS}/{run}"


def partition_dir(results: str, partition: str) -> str:
    """``<results>/partitions/<partition id>``; with `partition` = `PARTITION_ID` the rules' output pattern."""
    return f"{results.rstrip('/')}/{PARTITIONS}/{partition}"


def _field(wildcards: Any, name: str) -> Any:
    if isinstance(wildcards, Mapping):
        return wildcards[name]
    return getattr(wildcards, name)


def shared_data() -> Path:
    """The offline real datasets beside a checkout (never committed): `FEDHPRO_SHARED_DATA`, else
    `../shared/data` next to the repository. The tests and the parity harness's default CIFAR-10 tar read it."""
    return Path(os.environ.get("FEDHPRO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
