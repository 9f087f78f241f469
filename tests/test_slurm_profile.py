"""The `slurm` profile without a cluster: installing it where Snakemake looks (never over a user's own
profile), `snakemake --profile slurm -n` as typed, a Snakemake process without torch, and how runs
are packed into jobs. The cluster runs are in test_slurm_pipeline.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedhpro.launch import LaunchOptions
from fedhpro.sweep import SweepConfigError, check_slurm
from test_pipeline import copy_workflow

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install-profile.sh"
PYTHON = REPO / ".venv" / "bin" / "python"


def _install(config_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    return subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, env=env, timeout=60)


def test_install_profile_installs_updates_and_never_clobbers_a_users_profile(tmp_path):
    home = tmp_path / "config"
    dest = home / "snakemake" / "slurm"
    assert _install(home).returncode == 0
    assert (dest / "config.yaml").read_text() == (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    assert (dest / ".fedhpro-profile").is_file()
    (dest / "config.yaml").write_text("executor: fedhpro\n")  # an older copy of ours: updated
    assert _install(home).returncode == 0
    assert (dest / "config.yaml").read_text() == (REPO / "profiles" / "slurm" / "config.yaml").read_text()

    theirs = tmp_path / "other" / "snakemake" / "slurm"
    theirs.mkdir(parents=True)
    (theirs / "config.yaml").write_text("executor: slurm\njobs: 7\n")
    proc = _install(tmp_path / "other")
    assert proc.returncode == 3
    assert "not installed by fedhpro" in proc.stderr and str(theirs) in proc.stderr
    assert (theirs / "config.yaml").read_text() == "executor: slurm\njobs: 7\n"
    assert sorted(p.name for p in theirs.iterdir()) == ["config.yaml"]


def test_install_profile_keeps_a_users_edits_and_names_a_dangling_symlink(tmp_path):
    home = tmp_path / "config"
    dest = home / "snakemake" / "slurm"
    shipped = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    assert _install(home).returncode == 0
    (dest / "config.yaml").write_text(shipped.replace("jobs: 1000", "jobs: 50"))  # the user's edit
    (dest / ".fedhpro-profile").write_text((dest / ".fedhpro-profile").read_text().replace("sha256 ", "sha256 0"))
    proc = _install(home)  # the marker's checksum no longer matches the file: edited since the install
    assert proc.returncode == 0, proc.stderr
    (backup,) = dest.glob("config.yaml.edited-*")
    assert "jobs: 50" in backup.read_text() and (dest / "config.yaml").read_text() == shipped
    assert f"had been edited: kept as {backup}" in proc.stderr.splitlines()[0], proc.stderr
    # an unedited copy of ours that is out of date: updated, no backup
    (dest / "config.yaml").write_text("executor: fedhpro\n")
    marker = (dest / ".fedhpro-profile").read_text()
    import hashlib

    (dest / ".fedhpro-profile").write_text(marker.split("sha256 ")[0] + "sha256 "
                                           + hashlib.sha256(b"executor: fedhpro\n").hexdigest() + "\n")
    proc = _install(home)
    assert proc.returncode == 0 and "edited" not in proc.stderr, proc.stderr
    assert len(list(dest.glob("config.yaml.edited-*"))) == 1 and (dest / "config.yaml").read_text() == shipped

    broken = tmp_path / "broken" / "snakemake"
    broken.mkdir(parents=True)
    (broken / "slurm").symlink_to(tmp_path / "nowhere")
    proc = _install(tmp_path / "broken")
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "symlink to" in proc.stderr and "does not exist" in proc.stderr, \
        proc.stderr
    assert (broken / "slurm").is_symlink() and not (tmp_path / "nowhere").exists()


def test_profile_slurm_dry_run_as_typed_without_torch_in_snakemake(tmp_path):
    """`snakemake --profile slurm -n` from the checkout after the install; the Snakemake process
    (which stays on the login node for the whole sweep) never imports torch."""
    assert _install(tmp_path / "config").returncode == 0
    marker = tmp_path / "modules.txt"
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write(' '.join(sorted(m for m in sys.modules "
            "if m in ('torch', 'snakemake_executor_plugin_fedhpro')))))\n"
            "sys.argv = ['snakemake', '--profile', 'slurm', '-n']\n"
            "from snakemake.cli import main\nmain()\n")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # a copy of the checkout's workflow: the checkout's own results/ (e.g. the pipeline's) must not matter
    wf = copy_workflow(tmp_path, yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    proc = subprocess.run([str(PYTHON if PYTHON.exists() else sys.executable), "-c", code], cwd=wf, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rule train" in proc.stdout + proc.stderr  # it planned the training runs
    loaded = marker.read_text().split()
    assert "snakemake_executor_plugin_fedhpro" in loaded  # the profile's executor was found and loaded
    assert "torch" not in loaded  # (pandas is imported by Snakemake and its SLURM plugin anyway)


def test_short_runs_are_packed_into_jobs_of_the_budget():
    options = LaunchOptions(pack_minutes=10, run_minutes={"digits": 3, "default": 20})
    runs = [(f"d{i}", "digits") for i in range(7)] + [("c0", "cifar10")]
    assert options.plan_packs(runs) == [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["c0"], ["d6"]]
    # unknown duration (run_minutes null) or packing off: a job per run
    assert LaunchOptions(pack_minutes=10).plan_packs(runs[:3]) == [["d0"], ["d1"], ["d2"]]
    assert LaunchOptions(pack_minutes=0, run_minutes=1).plan_packs(runs[:2]) == [["d0"], ["d1"]]
    assert LaunchOptions.from_config({"pack_minutes": 5, "run_minutes": 1}).plan_packs(runs[:6]) == [
        ["d0", "d1", "d2", "d3", "d4"], ["d5"]]


@pytest.mark.parametrize("slurm, key", [({"pack_minutes": -1}, "slurm.pack_minutes"),
                                        ({"run_minutes": 0}, "slurm.run_minutes"),
                                        ({"run_minutes": {"digits": "fast"}}, "slurm.run_minutes.digits")])
def test_packing_keys_are_validated(slurm, key):
    with pytest.raises(SweepConfigError) as info:
        check_slurm(slurm)
    assert str(info.value).startswith(f"{key}:")
