"""A run's identity: the run ids (config hashes) of every shipped workflow config pinned, so no change to the
code moves a run to a new id (and reruns it) unnoticed."""

from __future__ import annotations

import hashlib

import pytest

from conftest import REPO
from fedhpro.plan import load_workflow_config
from fedhpro.sweep import expand_sweep

# config/*.yaml -> (runs, digest of the sorted "run_id config_hash" lines); config/published.yaml is the
# published-results registry, not a workflow config.
PINNED = {
    "config.yaml": (70, "54dc6f55f493661c"),
    "paper.yaml": (1931, "2cd27916c3a33180"),
    "published-mnist.yaml": (15, "8cc3464b576b503a"),
}


def shipped_runs(name: str) -> dict[str, str]:
    """run id -> config hash of every run a shipped workflow config plans."""
    runs = expand_sweep(load_workflow_config(REPO / "config" / name), warn=lambda message: None)
    return {run.run_id: run.config_hash for run in runs}


def digest(ids: dict[str, str]) -> str:
    return hashlib.sha256("\n".join(f"{r} {h}" for r, h in sorted(ids.items())).encode()).hexdigest()[:16]


def test_every_shipped_workflow_config_is_pinned():
    shipped = {p.name for p in (REPO / "config").glob("*.yaml")} - {"published.yaml"}
    assert shipped == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_run_ids_are_pinned(name):
    ids = shipped_runs(name)
    assert (len(ids), digest(ids)) == PINNED[name]
