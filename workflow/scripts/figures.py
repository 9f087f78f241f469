"""Snakemake script of rule figures: one experiment's figures (fedhpro.figures)."""

import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
REPO = Path(sm.scriptdir).resolve().parents[1]
if (REPO / "fedhpro").is_dir():  # this checkout's package (else the installed one)
    sys.path.insert(0, str(REPO))

with open(sm.log[0], "w") as log, redirect_stdout(log), redirect_stderr(log):
    try:
        from fedhpro.aggregate import collect
        from fedhpro.figures import write_figures

        experiment = sm.params.experiment
        paths = write_figures(collect(list(sm.input.metrics)), sm.output[0], kind=experiment["kind"],
                              title=experiment["title"])
        if not paths:
            raise RuntimeError(f"no figure was drawn into {sm.output[0]} (no evaluated rounds?)")
        print("\n".join(str(p) for p in paths))
    except BaseException:
        traceback.print_exc()
        raise SystemExit(f"figures failed: {sys.exc_info()[1]} (full log: {sm.log[0]})") from None
