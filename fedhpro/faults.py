"""Fault injection for the reliability tests: SIGKILL this process at a named point.

`FEDHPRO_FAULT=<point>@<n>` kills the process the n-th time execution reaches `<point>` (n >= 1).
Points: `batch` (inside local training, after an optimiser step), `server` (inside the server
step, after aggregation), `checkpoint_write`, `client_state_write` and `metrics_write` (after the
temporary file is written, before the atomic rename), `round_end`. Unset, every call is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("FEDHPRO_FAULT", "")
_POINT, _, _AT = _SPEC.partition("@")
_COUNT = 0


def fault_point(name: str) -> None:
    global _COUNT
    if not _POINT or name != _POINT:
        return
    _COUNT += 1
    if _COUNT == int(_AT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
