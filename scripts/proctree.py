"""Process-tree memory sampling shared by the login-node benchmarks (bench-cluster.sh, bench-login-memory.py)."""

from __future__ import annotations

import os
from pathlib import Path


def tree(root: int) -> list[int]:
    """`root` and every process below it (from /proc's parent ids; processes that end meanwhile are skipped)."""
    kids: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            kids.setdefault(int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def pss_kb(pid: int) -> int:
    """Proportional set size of one process in KiB (0 once it has ended): shared pages counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
