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
    (which stays on the login node for the whole sweep) never imports torch, and validates the config and
    computes the run table itself: no child Python is started for it."""
    assert _install(tmp_path / "config").returncode == 0
    marker = tmp_path / "modules.txt"
    children = tmp_path / "children.txt"
    code = ("import atexit, os, subprocess, sys\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write(' '.join(sorted(m for m in sys.modules "
            "if m in ('torch', 'snakemake_executor_plugin_fedhpro')))))\n"
            "started = subprocess.Popen.__init__\n"
            "def record(self, args, *a, **k):\n"
            f"    open({str(children)!r}, 'a').write(repr(args) + '\\n')\n"
            "    return started(self, args, *a, **k)\n"
            "subprocess.Popen.__init__ = record\n"
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
    started = children.read_text().splitlines() if children.exists() else []
    assert not [c for c in started if "python" in c or "fedhpro" in c], started  # (was: python -m fedhpro.runtable)


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


# ------------------------------------------------------------------ the executor without a cluster
class _Job:
    """What the executor reads of a Snakemake job of rule train."""

    def __init__(self, root: Path, i: int, dataset: str = "digits") -> None:
        from types import SimpleNamespace

        self.params = SimpleNamespace(run_config=f'{{"seed": {i}}}')
        self.wildcards = {"dataset": dataset, "method": "fedavg", "variant": "default", "seeds": f"s{i}"}
        self.output = [str(root / f"run{i}" / "metrics.parquet")]
        self.log = [str(root / f"run{i}.log")]
        self.input = SimpleNamespace()

    def is_group(self) -> bool:
        return False


def _executor(options: LaunchOptions, hold_s: float):
    from snakemake_executor_plugin_fedhpro import Executor

    executor = Executor.__new__(Executor)  # no Snakemake workflow: the submission path only
    executor.options = options
    executor.workflow_config_json = "{}"
    executor.init_submission_state(hold_s)
    executor.run_job_pre = lambda job: None
    executor._reattach = lambda runs: runs
    packs: list[int] = []
    executor._submit = lambda pack: packs.append(len(pack))
    return executor, packs


def test_packs_follow_pack_minutes_whatever_snakemake_hands_over_at_once(tmp_path):
    """Snakemake hands ready jobs over at most 100 per second: 200 one-minute runs with pack_minutes 30 were
    8 jobs (30 30 30 10 30 30 30 10), 201 were 9 (the last of a single run). The open pack now waits for the
    next hand-over."""
    import time

    options = LaunchOptions(pack_minutes=30, run_minutes=1)
    for n, expected in ((200, [30] * 6 + [20]), (201, [30] * 6 + [21]), (1, [1])):
        executor, packs = _executor(options, hold_s=2.0)  # 2 s: a margin for a loaded machine (pytest-xdist)
        jobs = [_Job(tmp_path, i) for i in range(n)]
        for start in range(0, n, 100):
            executor.run_jobs(jobs[start:start + 100])
        assert packs == expected[:-1]  # the open pack waits
        deadline = time.monotonic() + 20
        while packs != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert packs == expected, (n, packs)
    # an interrupt drops the open pack: never submitted after Snakemake cancelled its jobs
    executor, packs = _executor(options, hold_s=0.3)
    executor.run_jobs([_Job(tmp_path, 0)])
    executor.interrupted = True
    time.sleep(0.6)
    assert packs == []


def test_a_killed_snakemakes_lock_is_removed_only_when_it_is_gone(tmp_path):
    import json
    import signal

    from fedhpro.snakelock import OWNER_FILE, _start_time, remove_dead_lock

    locks = tmp_path / ".snakemake" / "locks"

    def lock_of(pid: int, **host: str) -> None:
        locks.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in ("0.input.lock", "0.output.lock"):
            (locks / name).write_text("results/x\n")
            st = (locks / name).stat()
            files[name] = [st.st_ino, st.st_mtime_ns]
        (locks / OWNER_FILE).write_text(json.dumps({"pid": pid, "start": _start_time(pid), "files": files, **host}))

    live = subprocess.Popen(["sleep", "60"])
    try:
        lock_of(live.pid)
        assert remove_dead_lock(str(tmp_path)) is None  # its owner runs: Snakemake's own lock error applies
        assert (locks / "0.input.lock").exists()
        live.send_signal(signal.SIGKILL)
        live.wait()
        (locks / "0.output.lock").unlink()
        (locks / "0.output.lock").write_text("results/y\n")  # another Snakemake's lock since: not ours to remove
        assert remove_dead_lock(str(tmp_path)) is None and (locks / "0.input.lock").exists()
        lock_of(live.pid)
        line = remove_dead_lock(str(tmp_path))
        assert line and f"pid {live.pid}" in line and "no longer running" in line and "\n" not in line
        assert sorted(p.name for p in locks.iterdir()) == []
        # written on another host (a compute node's Snakemake, a second login node): its pid says nothing here
        lock_of(live.pid, host="another-host")
        assert remove_dead_lock(str(tmp_path)) is None and (locks / "0.input.lock").exists()
    finally:
        live.kill()
        live.wait()


def test_a_failed_run_is_one_line_naming_job_error_and_logs(tmp_path, monkeypatch):
    from fedhpro.launch import RUN_ERROR_PREFIX, PackEntry, failure_report, interruption_cause

    log = tmp_path / "run.log"
    log.write_text("SLURM job 7 (restart 0): run r\nTraceback (most recent call last):\n  File x\n"
                   "RuntimeError: Found no NVIDIA driver\n" + RUN_ERROR_PREFIX + "RuntimeError: Found no NVIDIA driver\n")
    entry = PackEntry("{}", str(tmp_path / "r"), None, str(log))
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "7_0_log.err").write_text("Traceback (most recent call last):\n  File y\n"
                                                   "RuntimeError: 1 of 3 runs failed:\n")
    text = failure_report("7", "FAILED", entry, tmp_path / "jobs", 3)
    assert text == (f"run {tmp_path / 'r'} failed in SLURM job 7 (FAILED, 3 runs packed): RuntimeError: Found no "
                    f"NVIDIA driver (run log: {log}; job logs: {tmp_path / 'jobs'})")
    log.write_text("SLURM job 8 (restart 0): run r\n")  # killed by SLURM: no error of the run's own
    assert "(TIMEOUT): the job hit its time limit (slurm.time_min)" in failure_report("8", "TIMEOUT", entry,
                                                                                       tmp_path / "none")
    # SIGUSR2 is a preemption unless the time limit is near (submitit called every one of a short job "timed-out")
    assert interruption_cause(8 * 60, 90).startswith("preempted")
    assert interruption_cause(80, 90).startswith("near its time limit")
    from submitit.core.job_environment import SignalHandler

    from fedhpro import launch

    # what submitit asks in the job when SIGUSR2 arrives (it decides the word and the requeue budget)
    monkeypatch.setattr(SignalHandler, "has_timed_out", SignalHandler.has_timed_out)  # restored afterwards
    monkeypatch.setattr(SignalHandler, "_fedhpro_patched", False, raising=False)
    launch._name_preemptions_correctly(90)
    for left, timed_out in ((8 * 60, False), (80, True)):
        monkeypatch.setattr(launch, "slurm_time_left_s", lambda job_id=None, left=left: left)
        assert SignalHandler.has_timed_out(object()) is timed_out


def test_an_interrupt_cancels_by_id_and_by_the_invocations_job_name(tmp_path, monkeypatch):
    """The job whose sbatch was in flight at Ctrl-C is queued but its id never came back: the interrupt
    cancels the invocation's jobs by name too, and looks again after a moment for one that was late."""
    from fedhpro.launch import cancel_jobs, invocation_job_name

    calls = tmp_path / "calls"
    for tool, body in (("scancel", 'echo "scancel $*" >> CALLS'),
                       ("squeue", 'echo "squeue $*" >> CALLS; [ -e LATE ] && echo 42; touch LATE')):
        (tmp_path / tool).write_text("#!/bin/sh\ncd " + str(tmp_path) + "\n" + body.replace("CALLS", str(calls)) + "\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    name = invocation_job_name()
    assert name.startswith("fedhpro-") and name != invocation_job_name()
    assert cancel_jobs(["12", "11"], name, settle_s=0.1) == ["42"]
    lines = calls.read_text().splitlines()
    assert lines[0] == "scancel 11 12"
    assert any(line.startswith("scancel --user") and line.endswith(f"--name {name}") for line in lines)
    assert lines[-1] == "scancel 42"  # the late one, by id
