#!/usr/bin/env bash
# The GPU check of issue 21 (docs/gpu-cost.md#measuring-on-a-gpu), in parts that each fit one 10-minute call on a
# lent GPU machine (the device tool: 15 minutes of device time in all, start-up included), most important first:
#
#   part 1: section paper: a paper-config FedHPro run, eager and with `compile: $COMPILE` (default
#           reduce-overhead), each extrapolated to 100 rounds, beside the official code when OFFICIAL is given;
#   part 2: sections rounds (engine vs bare loop for FedAvg, FedHPro, FedProto; round split; 2 repeats),
#           batched and sharing (1, 2 and 4 runs on the GPU at once);
#   part 3: section rounds again with `compile: $COMPILE` (engine and bare loop alike), if time is left.
#
# usage: scripts/gpu-check.sh 1|2|3 OUT [OFFICIAL] [-- extra fedhpro bench options, e.g. --quick --device cpu]
#
# OUT receives at most four files (the device tool returns at most eight): bench-partN.tar.gz (every JSON, the
# Markdown report and the round-times rows), bench-partN.md, bench-partN.log and, for part 1, the
# machine's nvidia-smi. The benchmark runs under `timeout` (GPU_CHECK_SECONDS, default 540) so that what it
# measured is packed even when the call's limit is near: every section's files are written as it ends (section
# paper also when the limit interrupts its official or compiled run), and the summary JSON says
# `"complete": false` until the last one. OFFICIAL is a checkout of mala-lab/FedHPro (never committed: e.g.
# `git clone` it into the ignored folder .official/ and carry that folder to the machine). On the device machine
# its python3 holds torch; this repository is put on PYTHONPATH, nothing is installed. COMPILE=none leaves the
# compiled runs out (e.g. on a CPU, where reduce-overhead is refused).
set -uo pipefail
usage="usage: scripts/gpu-check.sh 1|2|3 OUT [OFFICIAL] [-- extra bench options]"
part=${1:?$usage}
out=${2:?$usage}
compile=${COMPILE:-reduce-overhead}
shift 2
official=""
if [[ $# -gt 0 && $1 != "--" ]]; then official=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
extra=("$@")
case $part in
  1) sections=(--skip rounds --skip batched --skip precision --skip sharing --skip scale --compile "$compile")
     [[ -n $official ]] && sections+=(--official "$official") ;;
  2) sections=(--skip paper --skip precision --skip scale --rounds 2) ;;
  3) sections=(--skip paper --skip batched --skip precision --skip sharing --skip scale --rounds 2
               --compile "$compile") ;;
  *) echo "error: part must be 1, 2 or 3, got '$part'" >&2; exit 2 ;;
esac
if [[ -n $official && ! -f $official/main_run.py ]]; then
  echo "error: OFFICIAL '$official' is not a checkout of mala-lab/FedHPro (no main_run.py)" >&2; exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$( [[ -x $repo/.venv/bin/python ]] && echo "$repo/.venv/bin/python" || echo python3)}
mkdir -p "$out" || exit 2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log=$out/bench-part$part.log
{
  echo "gpu-check part $part on $(hostname) at $(date -u +%FT%TZ); git $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
  [[ $part == 1 ]] && command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  cd "$repo"
  PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} timeout --signal=INT --kill-after=15 "${GPU_CHECK_SECONDS:-540}" \
    "$python" -m fedhpro.bench --gpu "${sections[@]}" "${extra[@]}" --out "$work/bench" \
    --times "$work/bench/round-times.csv"
  echo "fedhpro bench exited $?"
} > "$log" 2>&1
status=$(tail -n 1 "$log")
if compgen -G "$work/bench/*" > /dev/null; then
  tar -czf "$out/bench-part$part.tar.gz" -C "$work" bench
  md=$(ls "$work"/bench/bench_*.md 2>/dev/null | head -n 1)
  [[ -n $md ]] && cp "$md" "$out/bench-part$part.md"
fi
tail -n 40 "$log"
echo "gpu-check part $part: $status; files in $out: $(ls "$out" | tr '\n' ' ')"
[[ $status == "fedhpro bench exited 0" ]]
