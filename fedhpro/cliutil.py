"""The command line's shared parts: a one-line-error argparse, argument types, output-directory checks and
the error handler every subcommand runs under (`run_guarded`). A module of its own, importing no other
part of the package at import time, so that subcommand modules (partition, aggregate, bench) use it
without an import cycle through `fedhpro.cli`, which imports them."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

INTERRUPTED = "interrupted; rerun the same command to resume"  # train: it resumes from its checkpoint
INTERRUPTED_NO_RESUME = "interrupted"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error: `error: fedhpro train: argument --threads: ...`."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (e.g. --threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def check_out_dir(path: str | Path, flag: str = "--out", create: bool = True) -> Path:
    """An output directory that exists (created if missing; with create=False only checked to be creatable)
    and is writable; ValueError naming it otherwise. An empty name is refused (Path('') is the current
    directory: the outputs would land among the user's files)."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; name a directory (e.g. {flag} results/run)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory; choose a directory")
    if not create and not path.exists():
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir():
            raise ValueError(f"{flag} {path} cannot be created: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path} cannot be created: {parent} is not writable")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path} cannot be created: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} is not writable; choose another directory")
    return path


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror or text}"
    return " ".join(text.split())


def run_guarded(func: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None, *,
                resumable: bool = False) -> int:
    """Run a subcommand's `func(argv)`; expected failures become one `error: ...` line on stderr. Ctrl-C, also
    while the package and torch are still being imported, prints one line (saying the command resumes when
    `resumable`: train) and exits with 130."""
    interrupted = INTERRUPTED if resumable else INTERRUPTED_NO_RESUME
    try:
        from fedhpro.errors import ConfigError
        from fedhpro.runio import CheckpointError, RunLockedError
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    try:
        return func(argv) or 0
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except SystemExit as err:  # argparse: --help (0) or a usage error already printed as one line (2)
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        print(f"error: {' '.join(str(err.code).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        if os.environ.get("FEDHPRO_TRACEBACK"):
            raise
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: {_one_line(err)} (the run resumes from its last checkpoint once space is freed)",
                  file=sys.stderr)
            return 2  # like every CLI error (the README's promise); the message says it is the disk
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, RunLockedError, ValueError, KeyError, RuntimeError) as err:
        if os.environ.get("FEDHPRO_TRACEBACK"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
