"""The lock of a killed Snakemake: removed by the next `snakemake` in the same directory, safely.

Snakemake locks a working directory (``.snakemake/locks/<n>.input.lock``, ``<n>.output.lock``) and removes the
lock when it ends; a killed Snakemake (SIGKILL, a lost login session, an out-of-memory kill) leaves it, and the
next run stops with "Directory cannot be locked ... --unlock". The workflow's ``onstart`` handler
(workflow/rules/common.smk), which runs once Snakemake holds its lock, notes next to the lock files which
process wrote them, on which host (`write_lock_owner`); the next `snakemake` there, while it loads the workflow
(before it takes its own lock, `common.smk`), removes them when that process is gone (`remove_dead_lock`) and
says so in one line. A lock whose owner still runs, a lock written on another host (whose processes this one
cannot see: a job's Snakemake on a compute node, a second login node), and lock files that process did not
write are never touched. Torch-free (the submit host imports it).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["OWNER_FILE", "write_lock_owner", "remove_dead_lock"]

OWNER_FILE = "fedhpro-owner.json"  # in .snakemake/locks/: which process wrote which lock files


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell a reused pid apart; None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_lock_owner(workflow: Any) -> None:
    """Note which lock files this Snakemake holds (name, inode, mtime) and its pid, next to them."""
    persistence = getattr(workflow, "persistence", None)
    lockfiles = list(getattr(persistence, "_lockfile", {}).values())
    lockdir = getattr(persistence, "_lockdir", None)
    if not lockfiles or not lockdir:
        return
    files = {}
    for path in lockfiles:
        try:
            st = os.stat(path)
        except OSError:
            return
        files[os.path.basename(path)] = [st.st_ino, st.st_mtime_ns]
    owner = {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname(), "files": files}
    tmp = os.path.join(lockdir, f".{OWNER_FILE}.{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(owner, fh)
    os.replace(tmp, os.path.join(lockdir, OWNER_FILE))


def remove_dead_lock(workdir: str = ".") -> str | None:
    """Remove the lock files of a Snakemake of this executor that was killed (its pid is gone, or is another
    process now) and return the one line saying so; None when there is nothing to do. Never touches a lock
    of a live Snakemake, nor one written on another host (its pid means nothing here), nor lock files that
    process did not write (inode and mtime must match)."""
    lockdir = os.path.join(workdir, ".snakemake", "locks")
    path = os.path.join(lockdir, OWNER_FILE)
    try:
        with open(path) as fh:
            owner = json.load(fh)
        pid, files = int(owner["pid"]), dict(owner["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if owner.get("host", socket.gethostname()) != socket.gethostname():
        return None  # another host's Snakemake: whether it runs cannot be seen from here
    start = _start_time(pid)
    if start is not None and start == owner.get("start"):
        return None  # it still runs: Snakemake's own lock error applies
    for name, (ino, mtime) in files.items():
        try:
            st = os.stat(os.path.join(lockdir, name))
        except OSError:
            continue
        if (st.st_ino, st.st_mtime_ns) != (ino, mtime):
            return None  # someone else's lock now
    for name in files:
        try:
            os.unlink(os.path.join(lockdir, name))
        except FileNotFoundError:
            pass
    os.unlink(path)
    return (f"removed the lock left by Snakemake pid {pid}, which is no longer running (killed); its runs resume "
            "(SLURM jobs still queued are re-attached)")
