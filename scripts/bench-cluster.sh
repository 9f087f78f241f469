#!/usr/bin/env bash
# bench-cluster.sh: what a sweep costs the submit host, on the local SLURM cluster (needs root).
#
#   bash scripts/bench-cluster.sh            # N = 10 50 200, a 60 s window each
#   BENCH_N="10 50" BENCH_WINDOW_S=30 bash scripts/bench-cluster.sh
#
# For each design (`--profile profiles/slurm`: executor fedhpro; `--profile profiles/slurm-executor`:
# snakemake-executor-plugin-slurm) and each N, it starts Snakemake on a sweep of N tiny digits runs
# (FedAvg, N seeds, no packing, so N SLURM jobs) while the node is drained, so every job stays
# pending. Once N jobs are queued it measures, over BENCH_WINDOW_S seconds: the processes of the
# Snakemake process tree on this host, their total PSS (/proc/PID/smaps_rollup, sampled, max), and
# the scheduler calls per minute (sbatch, squeue, sacct, scontrol, scancel, sinfo counted by wrapper
# scripts first on PATH). Then it interrupts Snakemake, cancels the jobs and resumes the node.
# Prints one table, the designs side by side. Targets at N = 200 (issue 13): PSS < 1 GB,
# <= ~5 queries/min, both constant in N.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
NS=${BENCH_N:-10 50 200}
WINDOW=${BENCH_WINDOW_S:-60}
PY=$REPO/.venv/bin/python
SNAKEMAKE=$REPO/.venv/bin/snakemake
[[ -x $SNAKEMAKE ]] || { echo "bench-cluster: $SNAKEMAKE missing; run scripts/bootstrap.sh" >&2; exit 1; }
bash scripts/slurm-local.sh up
NODE=$(hostname -s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-cluster.XXXXXX")
SMK_PID=""
cleanup() {
  [[ -n $SMK_PID ]] && kill -INT "$SMK_PID" 2>/dev/null && sleep 3
  [[ -n $SMK_PID ]] && kill -KILL -- "-$SMK_PID" 2>/dev/null
  scancel -u "$(id -un)" 2>/dev/null || true
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# wrappers: log "<epoch seconds> <command>" and run the real one
mkdir -p "$WORK/bin"
CALLS=$WORK/calls.log
: >"$CALLS"
for cmd in sbatch squeue sacct scontrol scancel sinfo; do
  real=$(command -v "$cmd")
  printf '#!/bin/sh\necho "$(date +%%s.%%N) %s" >> %s\nexec %s "$@"\n' "$cmd" "$CALLS" "$real" >"$WORK/bin/$cmd"
  chmod +x "$WORK/bin/$cmd"
done

scontrol update NodeName="$NODE" State=DRAIN Reason=bench-cluster >/dev/null
echo "node $NODE drained: jobs stay pending" >&2

measure() {  # measure DESIGN PROFILE N LAUNCHER -> one result line on stdout
  local design=$1 profile=$2 n=$3 launcher=$4 wf
  wf=$WORK/$design-$n
  mkdir -p "$wf/config"
  cp Snakefile "$wf/"
  cp -r workflow profiles "$wf/"
  "$PY" - "$wf/config/config.yaml" "$n" "$launcher" <<'EOF'
import sys, yaml
path, n, launcher = sys.argv[1], int(sys.argv[2]), sys.argv[3]
yaml.safe_dump({"defaults": {"rounds": 2, "num_clients": 10, "device": "cpu"}, "datasets": {"digits": {}},
                "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}},
                "seeds": list(range(n)),
                "slurm": {"launcher": launcher, "partition": "debug", "account": "testacct", "gpus": 0, "cpus": 1,
                          "mem_gb": 0.5, "time_min": 10, "pack_minutes": 0}}, open(path, "w"))
EOF
  set -m  # job control: the background Snakemake keeps SIGINT (Ctrl-C: it cancels its jobs and exits)
  (cd "$wf" && PATH=$WORK/bin:$PATH PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} exec "$SNAKEMAKE" \
      --profile "profiles/$profile" --jobs "$n" >"$wf/snakemake.out" 2>&1) &
  SMK_PID=$!
  set +m
  FEDHPRO_REPO=$REPO "$PY" - "$SMK_PID" "$n" "$WINDOW" "$CALLS" "$design" <<'EOF'
import os, subprocess, sys, time
sys.path.insert(0, os.path.join(os.environ["FEDHPRO_REPO"], "scripts"))
from proctree import pss_kb, tree  # shared with bench-login-memory.py
pid, n, window, calls, design = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]

deadline = time.monotonic() + 600
while True:
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    if len(queued) >= n:
        break
    if time.monotonic() > deadline or not os.path.exists(f"/proc/{pid}"):
        sys.exit(f"{design} N={n}: only {len(queued)} jobs queued (see snakemake.out)")
    time.sleep(2)
time.sleep(5)  # let the submission burst end
t0 = time.time()
procs = pss = 0
while time.time() - t0 < window:
    members = tree(pid)
    procs = max(procs, len(members))
    pss = max(pss, sum(pss_kb(p) for p in members))
    time.sleep(2)
t1 = time.time()
counts = {}
for line in open(calls):
    stamp, cmd = line.split()
    if t0 <= float(stamp) <= t1:
        counts[cmd] = counts.get(cmd, 0) + 1
per_min = sum(counts.values()) * 60 / (t1 - t0)
detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"
print(f"{design:<16} {n:>4} {len(queued):>7} {procs:>9} {pss / 2**20:>8.2f} {per_min:>9.1f}   {detail}")
EOF
  kill -INT "$SMK_PID" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$SMK_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$SMK_PID" 2>/dev/null || true
  wait "$SMK_PID" 2>/dev/null || true
  SMK_PID=""
  echo "$design N=$n: after Ctrl-C, $(squeue -h -o %i | wc -l) jobs left in the queue" >&2
  scancel -u "$(id -un)" 2>/dev/null || true
  while [[ -n $(squeue -h -o %i) ]]; do sleep 1; done
}

echo "design            N  queued processes  PSS(GB) queries/min   calls in the ${WINDOW}s window"
for n in $NS; do
  measure fedhpro slurm "$n" submitit
  measure slurm-executor slurm-executor "$n" local
done
