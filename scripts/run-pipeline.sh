#!/usr/bin/env bash
# The quick default pipeline: bootstrap the venv, then snakemake (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
# Snakemake itself answers a missing --configfile with a traceback, before our workflow loads: check first.
prev=""
for arg in "$@"; do
  file=""
  case $arg in
    --configfile=*|--configfiles=*) file=${arg#*=} ;;
    -*) ;;
    *) [[ $prev == --configfile || $prev == --configfiles ]] && file=$arg ;;
  esac
  if [[ -n $file && ! -f $file ]]; then
    echo "error: config file $file (--configfile) does not exist" >&2
    exit 2
  fi
  [[ $arg == -* ]] && prev=$arg
done
bash scripts/bootstrap.sh
exec .venv/bin/snakemake --cores "${CORES:-2}" "$@"
