"""Snakemake script of rule reproduction_report: docs/reproduction.md from the registry and the runs
(fedhpro.published)."""

import sys
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
ROOT = Path(sm.scriptdir).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if (ROOT / "fedhpro").is_dir() else []  # this checkout's package (else the installed one)
from fedhpro.wfscript import run_script  # noqa: E402


def job(sm) -> None:
    from fedhpro.published import write_report

    print(write_report(sm.input.registry, sm.params.results, sm.output[0], configs=list(sm.params.configs),
                       metrics=list(sm.input.metrics), planned=int(sm.params.planned)))


run_script(sm, job)
