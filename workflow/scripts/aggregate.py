"""Snakemake script of rule aggregate: one experiment's tables (python -m fedhpro.aggregate)."""

import sys
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
ROOT = Path(sm.scriptdir).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if (ROOT / "fedhpro").is_dir() else []  # this checkout's package (else the installed one)
from fedhpro.wfscript import run_script  # noqa: E402


def job(sm) -> None:
    from fedhpro.aggregate import main

    experiment = sm.params.experiment
    argv = ["--out", str(sm.output[0]), "--rule", sm.params.rule, "--last-k", str(sm.params.last_k),
            "--kind", experiment["kind"], "--title", experiment["title"], "--protocol", experiment["protocol"]]
    for path in sm.input.metrics:
        argv += ["--runs", path]
    rc = main(argv)
    if rc:
        raise RuntimeError(f"fedhpro.aggregate exited with status {rc}")
    if not any(Path(sm.output[0]).glob("*.md")):
        raise RuntimeError(f"fedhpro.aggregate wrote no table into {sm.output[0]}")
    if sm.config.get("published"):  # the published numbers of this experiment's cells beside ours (published.md)
        from fedhpro.published import write_experiment_table

        print(write_experiment_table(sm.config["published"], [Path(p).parent for p in sm.input.metrics],
                                     sm.output[0]))


run_script(sm, job)
