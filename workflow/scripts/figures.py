"""Snakemake script of rule figures: one experiment's figures (fedhpro.figures)."""

import sys
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
ROOT = Path(sm.scriptdir).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if (ROOT / "fedhpro").is_dir() else []  # this checkout's package (else the installed one)
from fedhpro.wfscript import run_script  # noqa: E402


def job(sm) -> None:
    from fedhpro.aggregate import collect, collect_clients, summarize_runs
    from fedhpro.figures import write_figures

    experiment = sm.params.experiment
    reference = None
    if sm.config.get("published"):  # the published-results registry: its curves are reference lines
        from fedhpro.published import figure_reference, load_registry

        reference = figure_reference(load_registry(sm.config["published"]))
    df = collect(list(sm.input.metrics))
    # the ablation Δs use the tables' reporting rule; the clients figure the per-client results, where written
    paths = write_figures(df, sm.output[0], kind=experiment["kind"], title=experiment["title"],
                          runs=summarize_runs(df, sm.params.rule, sm.params.last_k), clients=collect_clients(df),
                          reference=reference)
    if not paths:
        raise RuntimeError(f"no figure was drawn into {sm.output[0]} (no evaluated rounds?)")
    print("\n".join(str(p) for p in paths))


run_script(sm, job)
