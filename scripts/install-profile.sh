#!/usr/bin/env bash
# Install profiles/slurm as the Snakemake profile `slurm` of this user, so that
#   snakemake --profile slurm --configfile config/paper.yaml
# works as typed (Snakemake looks up a profile name in the working directory,
# ${XDG_CONFIG_HOME:-~/.config}/snakemake and /etc/xdg/snakemake).
#
# The copy carries a marker file (.fedhpro-profile) holding the SHA-256 of the config.yaml it installed;
# a `slurm` profile without it is the user's own and is never touched (exit 3 with a message), and so is
# a symlink there that points nowhere. Ours is updated in place; a copy the user edited since is kept as
# config.yaml.edited-<time> first (one line says so); rerunning is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
src=profiles/slurm/config.yaml
dest=${XDG_CONFIG_HOME:-$HOME/.config}/snakemake/slurm
marker=.fedhpro-profile
if [[ -L $dest && ! -e $dest ]]; then
  echo "install-profile: $dest is a symlink to $(readlink "$dest"), which does not exist: left as it is; remove it or make its target, then rerun $0." >&2
  exit 3
fi
if [[ -e $dest && ! -f $dest/$marker ]]; then
  echo "install-profile: $dest exists and was not installed by fedhpro: left as it is." >&2
  echo "install-profile: use 'snakemake --profile $PWD/profiles/slurm', or move $dest aside and rerun $0." >&2
  exit 3
fi
if [[ -f $dest/config.yaml ]] && cmp -s "$src" "$dest/config.yaml"; then
  exit 0
fi
sha() { sha256sum "$1" | cut -d' ' -f1; }
if [[ -f $dest/config.yaml ]] && ! grep -qx "sha256 $(sha "$dest/config.yaml")" "$dest/$marker"; then
  # not what we installed: the user's edits (or a copy from before the marker held a checksum)
  backup=$dest/config.yaml.edited-$(date +%Y%m%dT%H%M%S)
  cp -p "$dest/config.yaml" "$backup"
  echo "install-profile: $dest/config.yaml had been edited: kept as $backup (compare: diff $backup $PWD/$src)" >&2
fi
mkdir -p "$dest"
cp "$src" "$dest/config.yaml.tmp" && mv -f "$dest/config.yaml.tmp" "$dest/config.yaml"
printf 'installed by %s/scripts/install-profile.sh from %s\nsha256 %s\n' "$PWD" "$src" "$(sha "$src")" >"$dest/$marker"
echo "install-profile: Snakemake profile 'slurm' installed in $dest" >&2
