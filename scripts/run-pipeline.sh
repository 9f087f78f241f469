#!/usr/bin/env bash
# The quick default pipeline: bootstrap the venv, then snakemake (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/snakemake --cores "${CORES:-2}" "$@"
