"""What the Snakemake process tree costs the login node in each phase of a real sweep on the local cluster.

    python scripts/bench-login-memory.py N       # N tiny digits runs (1 round), packed, run to the end

Runs `snakemake --profile profiles/slurm` in a temporary copy of the workflow, samples the PSS of its whole
process tree (/proc/PID/smaps_rollup) every 0.5 s, and prints the peak per phase: workflow load (until the
first sbatch), runs in flight (until the first local job after them), the end (aggregate and figures).
Needs the local SLURM cluster up (scripts/slurm-local.sh up) and the node idle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from proctree import pss_kb, tree  # noqa: E402  (shared with bench-cluster.sh)


def cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    work = Path(tempfile.mkdtemp(prefix="login-memory."))
    wf = work / "wf"
    (wf / "config").mkdir(parents=True)
    shutil.copy2(REPO / "Snakefile", wf)
    for name in ("workflow", "profiles"):
        shutil.copytree(REPO / name, wf / name)
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump({
        "defaults": {"rounds": 1, "num_clients": 2, "local_epochs": 1, "device": "cpu"}, "datasets": {"digits": {}},
        "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}}, "seeds": list(range(n)),
        "reporting": {"rule": "final"},
        "slurm": {"partition": "debug", "account": "testacct", "gpus": 0, "cpus": 1, "mem_gb": 1, "time_min": 30,
                  "pack_minutes": 30, "run_minutes": 1}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = open(work / "snakemake.out", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "snakemake"), "--profile", "profiles/slurm",
                             "--seconds-between-status-checks", "5"], cwd=wf, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    phase, peaks, seen_local = "load", {"load": (0, ""), "in flight": (0, ""), "end": (0, "")}, False
    while proc.poll() is None:
        members = tree(proc.pid)
        cmds = [cmd(p) for p in members]
        if phase == "load" and (list((wf / "results" / "logs" / "slurm").glob("*")) if
                                (wf / "results" / "logs" / "slurm").exists() else []):
            phase = "in flight"
        if phase == "in flight" and any(("aggregate" in c or "figures" in c) and ".snakemake/scripts" in c
                                        for c in cmds):
            phase = "end"
        total = sum(pss_kb(p) for p in members)
        if total > peaks[phase][0]:
            peaks[phase] = (total, f"{len(members)} processes: " + "; ".join(
                f"{Path(c.split()[1] if len(c.split()) > 1 else c).name} {pss_kb(p) / 2**20:.2f} GB"
                for p, c in zip(members, cmds)))
        time.sleep(0.5)
    print(f"N = {n}: exit {proc.returncode} after {time.monotonic() - t0:.0f} s (log {work / 'snakemake.out'})")
    for name, (kb, detail) in peaks.items():
        print(f"{name:<10} peak PSS {kb / 2**20:.2f} GB  ({detail})")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
