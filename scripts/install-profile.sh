#!/usr/bin/env bash
# Install profiles/slurm as the Snakemake profile `slurm` of this user, so that
#   snakemake --profile slurm --configfile config/paper.yaml
# works as typed (Snakemake looks up a profile name in the working directory,
# ${XDG_CONFIG_HOME:-~/.config}/snakemake and /etc/xdg/snakemake).
#
# The copy carries a marker file (.fedhpro-profile); a `slurm` profile without it is the user's own
# and is never touched (exit 3 with a message). Ours is updated in place; rerunning is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
src=profiles/slurm/config.yaml
dest=${XDG_CONFIG_HOME:-$HOME/.config}/snakemake/slurm
marker=.fedhpro-profile
if [[ -e $dest && ! -f $dest/$marker ]]; then
  echo "install-profile: $dest exists and was not installed by fedhpro: left as it is." >&2
  echo "install-profile: use 'snakemake --profile $PWD/profiles/slurm', or move $dest aside and rerun $0." >&2
  exit 3
fi
if [[ -f $dest/config.yaml ]] && cmp -s "$src" "$dest/config.yaml"; then
  exit 0
fi
mkdir -p "$dest"
cp "$src" "$dest/config.yaml.tmp" && mv -f "$dest/config.yaml.tmp" "$dest/config.yaml"
printf 'installed by %s/scripts/install-profile.sh from %s\n' "$PWD" "$src" >"$dest/$marker"
echo "install-profile: Snakemake profile 'slurm' installed in $dest" >&2
