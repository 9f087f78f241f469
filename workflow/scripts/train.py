"""Snakemake script of rule train: run one training run (in-process or as a SLURM job)."""

import sys
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
ROOT = Path(sm.scriptdir).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if (ROOT / "fedhpro").is_dir() else []  # this checkout's package (else the installed one)
from fedhpro.wfscript import run_script  # noqa: E402


def job(sm) -> None:
    import json

    from fedhpro.config import from_dict
    from fedhpro.launch import LaunchOptions, launch
    from fedhpro.sweep import workflow_run

    cfg = workflow_run(sm.config, sm.wildcards).config  # params hold no data location (data_root, path)
    if cfg.canonical_json() != from_dict(json.loads(sm.params.run_config)).canonical_json():
        raise RuntimeError("the workflow config changed since the DAG was built; run snakemake again")
    options = LaunchOptions.from_config(sm.config.get("slurm"), threads=sm.threads)
    print(f"run {cfg.method}/{cfg.variant} on {cfg.dataset} (config {cfg.config_hash()}), "
          f"launcher {options.launcher}", flush=True)
    launch(cfg, Path(sm.output.metrics).parent, Path(sm.input.partition).parent, options,
           log=lambda msg: print(msg, flush=True))


run_script(sm, job)
