"""The run and partition layout (fedhpro.layout) is the one the sweep's RunSpecs and the rules' wildcards use."""

from types import SimpleNamespace

from fedhpro import layout
from fedhpro.sweep import WILDCARD_PATTERNS, expand_sweep

TINY = {"defaults": {"rounds": 2, "num_clients": 10, "device": "cpu"}, "datasets": {"digits": {}},
        "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}, {"partition": "iid"}],
        "methods": {"fedavg": {"default": {}}, "fedprox": {"default": {"mu": 0.01}}},
        "seeds": [0, 3], "partition_seeds": [1]}


def test_ids_and_directories():
    assert layout.run_id("digits", "iid-n10", "fedavg", "default", 1, 3) == "digits/iid-n10/fedavg/default/ps1_s3"
    assert layout.partition_id("digits", "iid-n10", 1) == "digits/iid-n10/ps1"
    assert layout.run_dir("results/", "a/b") == "results/runs/a/b"
    assert layout.partition_dir("out", "a/b") == "out/partitions/a/b"
    # the patterns are the rules' output patterns: every field a wildcard the workflow constrains
    assert layout.run_dir("results", layout.RUN_ID) == \
        "results/runs/{dataset}/{het}/{method}/{variant}/ps{pseed}_s{seed}"
    assert set(layout.RUN_FIELDS) <= set(WILDCARD_PATTERNS) and set(layout.PARTITION_FIELDS) <= set(layout.RUN_FIELDS)


def test_sweep_runs_follow_the_layout_and_round_trip_through_their_wildcards():
    runs = expand_sweep(TINY)
    assert len(runs) == 2 * 2 * 2
    for run in runs:
        w = run.wildcards
        assert run.run_id == layout.run_id_of(w) == layout.RUN_ID.format(**w)
        assert run.partition_id == layout.partition_id_of(w) == layout.partition_id(run.dataset, run.het, 1)
        # Snakemake's Wildcards object: attributes, not a mapping
        assert layout.run_id_of(SimpleNamespace(**w)) == run.run_id
    assert {run.run_id for run in runs if run.method == "fedavg" and run.seed == 3} == {
        "digits/dirichlet-a0p5-n10/fedavg/default/ps1_s3", "digits/iid-n10/fedavg/default/ps1_s3"}
