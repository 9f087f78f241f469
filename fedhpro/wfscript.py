"""The shared part of the workflow's Snakemake scripts (workflow/scripts/*.py): each runs its rule's job
under `run_script`, which sends the job's stdout, stderr and `logging` into the rule's log file and turns
any failure into one line for Snakemake (``<rule> failed: <message> (full log: <log>)``, exit status 1;
the message is the job's own one-line ``error: ...`` where it printed one, e.g. a CLI that returned 2),
with the full traceback in the log only (the profile does not print failed jobs' logs; Snakemake's error
block names the log). An interrupt (Ctrl-C: SIGINT to the process group) is one line too, ``<rule>:
interrupted; rerun the same command to resume`` (exit status 130, no traceback anywhere): a training run
resumes from its checkpoint. The package's `logging` (loggers under ``fedhpro``) goes to the log at level INFO.

Imports nothing from the package at import time (no torch): a script imports it before its job imports
what the job needs, inside the log redirection, so an import error is reported like any other failure.
"""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Callable

__all__ = ["run_script"]


def _last_error_line(log_path: str) -> str:
    """The last one-line `error: ...` the job wrote into its log (a CLI's refusal, e.g. fedhpro.aggregate's), without
    the prefix; '' if none."""
    try:
        with open(log_path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.startswith("error: ")]
    except OSError:
        return ""
    return lines[-1][len("error: "):] if lines else ""


def run_script(sm: Any, job: Callable[[Any], int | None], name: str | None = None) -> None:
    """Run `job(sm)` (sm: the `snakemake` object Snakemake injects into a script) with its stdout, stderr
    and the `fedhpro` loggers in `sm.log[0]`. A nonzero int returned by the job, or any exception, ends the
    script with SystemExit and a one-line message naming the rule (`name`, by default `sm.rule`) and the
    log; nothing else reaches Snakemake's own output."""
    name = name or getattr(sm, "rule", None) or "job"
    log_path = sm.log[0]
    interrupted = ""
    with open(log_path, "w") as log, redirect_stdout(log), redirect_stderr(log):
        package_log = logging.getLogger("fedhpro")  # the package's loggers (not submitit's, which has its own)
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        package_log.addHandler(handler)
        level = package_log.level
        package_log.setLevel(logging.INFO)
        try:
            status = job(sm)
            if status:
                raise RuntimeError(f"exited with status {status}")
        except KeyboardInterrupt:  # the traceback would only show where the signal landed
            from fedhpro.cliutil import INTERRUPTED

            interrupted = f"{name}: {INTERRUPTED}"
            print(interrupted, file=log, flush=True)
        except BaseException as err:
            log.flush()
            said = _last_error_line(log_path)  # what the job's CLI said (`error: ...`), the reason to show
            traceback.print_exc()
            log.flush()
            reason = " ".join(str(err).split()) or type(err).__name__
            if said and said not in reason:
                reason = f"{said} ({reason})"
            raise SystemExit(f"{name} failed: {reason} (full log: {log_path})") from None
        finally:
            package_log.removeHandler(handler)
            package_log.setLevel(level)
    if interrupted:
        print(interrupted, file=sys.stderr, flush=True)
        raise SystemExit(130)
