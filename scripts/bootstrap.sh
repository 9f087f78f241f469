#!/usr/bin/env bash
# Create (or reuse) the project venv in .venv with the pinned packages and the fedhpro package.
# Idempotent: reinstalls only when requirements.txt or pyproject.toml changed.
# Also installs the Snakemake profile `slurm` (scripts/install-profile.sh; a user's own profile of
# that name is kept), so `snakemake --profile slurm` works as typed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-profile.sh || echo "bootstrap: profile 'slurm' not installed (see above)" >&2
PY=${PYTHON:-python3}
stamp=.venv/.fedhpro-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
# What a `snakemake` process does before Snakemake reads its command line (fedhpro.snakestart: a Ctrl-C while
# it imports its modules and plugins is one line, not a 25-40 line traceback; a missing or invalid
# --configfile is one line naming it): the interpreter runs this .pth file first (site).
install_start_hook() {
  local site
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site/fedhpro-snakemake-interrupt.pth"  # its predecessor (Ctrl-C only)
  cmp -s scripts/snakemake-start.pth "$site/fedhpro-snakemake-start.pth" ||
    cp scripts/snakemake-start.pth "$site/fedhpro-snakemake-start.pth"
}
if [[ -x .venv/bin/python && -f $stamp && "$(cat $stamp)" == "$want" ]]; then
  install_start_hook
  exit 0
fi
echo "bootstrap: installing the venv in .venv (torch is large: a few minutes the first time)" >&2
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt 2> >(grep -v "^WARNING: Location" >&2)
# compat mode: a plain .pth path entry, so Snakemake's plugin discovery (pkgutil on sys.path) finds
# this checkout's executor plugin snakemake_executor_plugin_fedhpro (it does not see import hooks)
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat 2> >(grep -v "^WARNING: Location" >&2)
echo "$want" > "$stamp"
install_start_hook
