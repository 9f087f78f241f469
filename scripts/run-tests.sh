#!/usr/bin/env bash
# The test suite: bootstrap the venv, then pytest (extra arguments are passed on). Tests marked
# `slurm` start a local single-node SLURM cluster themselves (root needed; see scripts/slurm-local.sh).
#
# By default tests marked `slow` are deselected (`-m "not slow"`, the quick default suite); a `-m EXPR`
# of your own replaces that. To run every test:
#   bash scripts/run-tests.sh --all        # or: FEDHPRO_TESTS=all bash scripts/run-tests.sh
#   bash scripts/run-tests.sh -m slow      # only the slow ones (CI runs the default suite, then these)
#
# Tests run in parallel with pytest-xdist, one worker per core (at most 8): FEDHPRO_TEST_WORKERS=N sets
# the number, 1 runs them in this process (no xdist). `--dist loadgroup` keeps the tests marked `slurm`
# on one worker, one after another (tests/conftest.py puts them in one xdist_group). An `-n N` or
# `-p no:xdist` of your own replaces this.
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
[[ ${FEDHPRO_TESTS:-} == all ]] && all=1
workers=${FEDHPRO_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
[[ $workers =~ ^[0-9]+$ ]] || { echo "error: FEDHPRO_TEST_WORKERS=$workers is not a number" >&2; exit 2; }
(( workers > 8 )) && [[ -z ${FEDHPRO_TEST_WORKERS:-} ]] && workers=8  # each worker imports torch
args=()
for arg in "$@"; do
  case $arg in
    --all) all=1 ;;
    -m*) all=1; args+=("$arg") ;;  # the caller's own marker expression
    -n*|--numprocesses*) workers=own; args+=("$arg") ;;  # the caller's own number of workers
    no:xdist|-pno:xdist) workers=own; dist=own; args+=("$arg") ;;  # no xdist at all
    --dist*) dist=own; args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done
[[ $all == 1 ]] || args=(-m "not slow" "${args[@]}")
if [[ $workers != own ]] && (( workers > 1 )); then args=(-n "$workers" "${args[@]}"); fi
[[ ${dist:-} == own ]] || args=(--dist loadgroup "${args[@]}")  # the groups hold under a caller's -n too
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "${args[@]}"
