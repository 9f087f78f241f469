"""Snakemake script of rule partition: split a dataset's training labels over clients and save it
(fedhpro.jobs.write_partition)."""

import sys
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
ROOT = Path(sm.scriptdir).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if (ROOT / "fedhpro").is_dir() else []  # this checkout's package (else the installed one)
from fedhpro.wfscript import run_script  # noqa: E402


def job(sm) -> None:
    from fedhpro.jobs import write_partition
    from fedhpro.sweep import workflow_run

    # the params hold the split's identity only; where the data lives comes from the workflow config
    run = workflow_run(sm.config, sm.wildcards)
    spec = dict(sm.params.spec)
    if run.partition().params() != spec:
        raise RuntimeError(f"partition {run.partition_id}: the workflow config changed since the DAG was built")
    data = dict(sm.params.data)
    print(write_partition(run.config, Path(sm.output.npz).parent, spec, data.get("fingerprint"), data.get("content")))


run_script(sm, job)
