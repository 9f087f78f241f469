"""Snakemake script of rule aggregate: one experiment's tables (python -m fedhpro.aggregate)."""

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
    except BaseException:
        traceback.print_exc()
        raise SystemExit(f"aggregate failed: {sys.exc_info()[1]} (full log: {sm.log[0]})") from None
