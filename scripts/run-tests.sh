#!/usr/bin/env bash
# The test suite: bootstrap the venv, then pytest (extra arguments are passed on). Tests marked
# `slurm` start a local single-node SLURM cluster themselves (root needed; see scripts/slurm-local.sh).
#
# By default tests marked `slow` are deselected (`-m "not slow"`, the quick default suite); a `-m EXPR`
# of your own replaces that. To run every test:
#   bash scripts/run-tests.sh --all        # or: FEDHPRO_TESTS=all bash scripts/run-tests.sh
#   bash scripts/run-tests.sh -m slow      # only the slow ones (CI runs the default suite, then these)
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
[[ ${FEDHPRO_TESTS:-} == all ]] && all=1
args=()
for arg in "$@"; do
  case $arg in
    --all) all=1 ;;
    -m*) all=1; args+=("$arg") ;;  # the caller's own marker expression
    *) args+=("$arg") ;;
  esac
done
[[ $all == 1 ]] || args=(-m "not slow" "${args[@]}")
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "${args[@]}"
