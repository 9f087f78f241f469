"""Snakemake script of rule download: fetch a dataset's needed files (verified) and write the marker
(fedhpro.jobs.download_files). params.files names the files the sweep's runs need (common.smk)."""

import sys
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
ROOT = Path(sm.scriptdir).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if (ROOT / "fedhpro").is_dir() else []  # this checkout's package (else the installed one)
from fedhpro.wfscript import run_script  # noqa: E402


def job(sm) -> None:
    from fedhpro.jobs import download_files

    download_files(sm.wildcards.dataset, list(sm.params.files), sm.params.data_root, dict(sm.params.mirror),
                   sm.output[0])


run_script(sm, job)
