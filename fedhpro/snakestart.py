"""What a `snakemake` process of this venv does first, before Snakemake reads its command line.

`scripts/snakemake-start.pth`, which `scripts/bootstrap.sh` installs into the venv's site-packages, runs in
every Python process of the venv at interpreter start and calls `start()` only when the process is
`snakemake` (or `python -m snakemake`); everything else is untouched. It is the one place where this
project acts before Snakemake does (the executor plugin and the workflow act only when Snakemake calls them):

- a Ctrl-C nobody catches (Snakemake imports its own modules and plugins for about a second before any code
  of ours runs) is one line instead of a 25-40 line traceback (`quiet_interrupt_hook`);
- a `--configfile` that is missing, a directory, unreadable or not valid YAML/JSON (duplicate keys too) is a
  one-line error naming the file, exit status 2 (`refuse_bad_configfiles`): Snakemake reads config files
  before any workflow code and answers with a traceback, or "Config file is not valid JSON or YAML" with no
  file and no line.

Light: the standard library here; `fedhpro.sweep` (torch-free) only when a --configfile is given.
"""

from __future__ import annotations

import os
import sys

from fedhpro.cliutil import INTERRUPTED  # light: the standard library only

__all__ = ["start", "is_snakemake", "quiet_interrupt_hook", "configfiles_of", "refuse_bad_configfiles"]

_started = False


def is_snakemake(argv: list[str], orig_argv: list[str]) -> bool:
    """Whether this process is `snakemake ...` or `python -m snakemake ...` (at interpreter start, sys.argv[0]
    is the script, or '-m' for a module)."""
    return bool(argv) and os.path.basename(argv[0]) == "snakemake" or orig_argv[1:3] == ["-m", "snakemake"]


def quiet_interrupt_hook(previous=sys.excepthook):
    """A sys.excepthook that prints one line for a KeyboardInterrupt nobody caught; other exceptions go to
    `previous` (the traceback, as before)."""
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            print(INTERRUPTED, file=sys.stderr)
        else:
            previous(exc_type, exc, tb)
    return hook


def configfiles_of(argv: list[str]) -> list[str]:
    """The files given to --configfile/--configfiles on a Snakemake command line (both spellings, several each)."""
    files: list[str] = []
    taking = False
    for arg in argv[1:]:
        if arg.startswith("--configfile=") or arg.startswith("--configfiles="):
            files.append(arg.split("=", 1)[1])
            taking = False
        elif arg in ("--configfile", "--configfiles"):
            taking = True
        elif arg.startswith("-"):
            taking = False
        elif taking:
            files.append(arg)
    return files


def refuse_bad_configfiles(argv: list[str]) -> None:
    """Exit with status 2 and a one-line error naming the file when a ``--configfile`` is missing, a directory,
    unreadable, or not valid YAML/JSON (with the line; duplicate keys too: `fedhpro.sweep.check_config_files`,
    the check the workflow repeats at load)."""
    for name in configfiles_of(argv):
        problem = None
        if os.path.isdir(name):
            problem = f"config file {name} (--configfile) is a directory"
        elif not os.path.isfile(name):
            problem = f"config file {name} (--configfile) does not exist"
        else:
            from fedhpro.sweep import SweepConfigError, check_config_files

            try:
                check_config_files([name])
            except SweepConfigError as err:
                problem = str(err)
            except UnicodeDecodeError:
                problem = f"config file {name!r} is not a text file (YAML or JSON)"
            except OSError as err:
                problem = f"config file {name} (--configfile) cannot be read: {err.strerror or err}"
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            os._exit(2)  # at interpreter start (site) a SystemExit would be a fatal-error report


def start() -> None:
    """Called by the .pth file in every process of the venv; acts once, and only in a `snakemake` process."""
    global _started
    if _started or not is_snakemake(sys.argv, getattr(sys, "orig_argv", [])):
        return
    _started = True
    sys.excepthook = quiet_interrupt_hook(sys.excepthook)
    refuse_bad_configfiles(sys.argv)
