"""The workflow against the real local SLURM cluster (scripts/slurm-local.sh, started by the fixture).

* `snakemake --profile slurm` as typed (the profile installed by scripts/install-profile.sh into a
  temporary XDG config home) on a tiny sweep: the executor fedhpro packs the short runs into one
  SLURM job (submitit), records the job id in every run, a run that fails on the node fails with
  its job id and log tail while the others of its job finish; the next invocation builds the tables
  without resubmitting anything.
* Preemption of a packed job (slow, ~3 min because Slurm holds a requeued job ~120 s): SIGUSR2 while
  its second run is mid-way; the job requeues itself (submitit Checkpointable), skips the finished
  run, resumes the interrupted one from its checkpoint to the same metrics as an uninterrupted
  local run, and runs the one it had not started.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from slurm_cluster import slurm_autostart, slurm_cluster, wait_for_job  # noqa: F401  (fixtures)

from test_pipeline import REPO, copy_workflow, snakemake_cmd

pytestmark = pytest.mark.slurm


def _profile_env(tmp_path: Path) -> dict[str, str]:
    """Environment with the `slurm` profile installed in a temporary XDG config home, as bootstrap does."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install-profile.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_profile_slurm_packs_runs_records_jobs_and_reports_a_failed_run(tmp_path, slurm_cluster):
    config = {
        "defaults": {"rounds": 2, "num_clients": 10, "batch_size": 32, "lr": 0.05, "device": "cpu"},
        "datasets": {"digits": {}},
        "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
        # fedavg/gpu asks for CUDA, which the (fake-GPU) node does not have: it fails at run time
        "methods": {"fedavg": {"default": {}, "gpu": {"config": {"device": "cuda"}}},
                    "fedprox": {"default": {"mu": 0.01}}},
        "seeds": [0],
        "slurm": {"partition": slurm_cluster.partition, "account": slurm_cluster.account, "gpus": 1, "cpus": 1,
                  "mem_gb": 1, "time_min": 10, "run_minutes": 1, "pack_minutes": 5},
    }
    wf = copy_workflow(tmp_path, config)
    env = _profile_env(tmp_path)
    cmd = snakemake_cmd("--profile", "slurm", "--seconds-between-status-checks", "2")
    proc = subprocess.run(cmd, cwd=wf, env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    runs = wf / "results" / "runs" / "digits" / "dirichlet-a0p5-n10"
    ok = [runs / "fedavg" / "default" / "ps0_s0", runs / "fedprox" / "default" / "ps0_s0"]
    bad = runs / "fedavg" / "gpu" / "ps0_s0"
    records = {run: json.loads((run / "slurm_jobs.json").read_text())["jobs"] for run in ok + [bad]}
    job_ids = {jobs[-1]["job_id"] for jobs in records.values()}
    assert len(job_ids) == 1, records  # the three short runs shared one SLURM job
    job_id = job_ids.pop()
    assert job_id.isdigit() and all(jobs[-1]["pack_size"] == 3 for jobs in records.values())
    for run in ok:  # the failure of one run did not stop the others of its job
        assert (run / "metrics.parquet").is_file()
        assert records[run][-1]["result"] == "ok"
        assert json.loads((run / "config.json").read_text())["slurm_job_id"] == job_id
    assert not (bad / "metrics.parquet").exists() and records[bad][-1]["result"] == "failed"
    # one line: the job, its state, the run's own error and where the detail is; the tracebacks stay in the logs
    (line,) = [line for line in text.splitlines() if f"failed in SLURM job {job_id} (FAILED, 3 runs packed): " in line]
    assert f"run {bad.resolve()} failed" in line and "CUDA" in line and "(run log: " in line, line
    assert "Traceback" not in text and "run log tail" not in text, text[-4000:]
    assert "Traceback" in (wf / "results" / "logs" / "train" / "digits" / "dirichlet-a0p5-n10" / "fedavg" / "gpu"
                           / "ps0_s0.log").read_text()

    # without the failing variant the sweep completes: tables and figures, no new SLURM job
    config["methods"]["fedavg"].pop("gpu")
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run(cmd, cwd=wf, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "rule train" not in proc.stdout + proc.stderr
    for run in ok:
        assert [j["job_id"] for j in json.loads((run / "slurm_jobs.json").read_text())["jobs"]] == [job_id]
    for name in ("main", "ablation", "communication"):
        for ext in ("md", "tex", "csv"):
            assert (wf / "results" / "tables" / "main" / f"{name}.{ext}").is_file()
    assert list((wf / "results" / "figures" / "main").glob("*.png"))


@pytest.mark.slow
def test_preempted_packed_job_resumes_every_unfinished_run(tmp_path, slurm_cluster):
    from fedhpro.config import from_dict
    from fedhpro.launch import LaunchOptions, PackEntry, query_states, submit_pack
    from fedhpro.train import train

    base = {"method": "fedavg", "dataset": "digits", "num_clients": 10, "batch_size": 16, "lr": 0.05,
            "device": "cpu", "checkpoint_every": 1}
    configs = {"done": from_dict({**base, "rounds": 2, "seed": 1}),          # finished before the preemption
               "cut": from_dict({**base, "rounds": 25, "local_epochs": 2, "seed": 3}),  # preempted mid-way
               "todo": from_dict({**base, "rounds": 2, "seed": 5})}          # not started yet
    runs = {name: tmp_path / "runs" / name for name in configs}
    entries = [PackEntry(configs[name].canonical_json(), str(runs[name]), None, str(tmp_path / f"{name}.log"))
               for name in configs]
    # a 10-minute limit: submitit's own guess called every SIGUSR2 of such a job "timed-out"
    options = LaunchOptions(partition=slurm_cluster.partition, account=slurm_cluster.account, gpus=0, cpus=1,
                            mem_gb=1, time_min=10)
    job = submit_pack(entries, options, tmp_path / "jobs" / "%j", "fedhpro-pack3")
    job_id = str(job.job_id)
    deadline = time.monotonic() + 240
    while not (runs["done"] / "metrics.parquet").exists() or not (runs["cut"] / "checkpoint.pt").exists():
        assert time.monotonic() < deadline, "the packed job did not reach its second run in time"
        assert query_states([job_id]).get(job_id, "PENDING") in ("PENDING", "RUNNING"), "the job ended early"
        time.sleep(0.5)
    assert not (runs["cut"] / "metrics.parquet").exists(), "the run finished before it could be preempted"
    done_mtime = (runs["done"] / "metrics.parquet").stat().st_mtime_ns
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    # the uninterrupted reference, computed while Slurm holds the requeued job (~120 s), with the packed
    # job's thread count (CPU results are bit-identical for one thread count only)
    saved_threads = torch.get_num_threads()
    try:
        reference = train(configs["cut"], tmp_path / "local_run", threads=options.threads)
    finally:
        torch.set_num_threads(saved_threads)

    assert wait_for_job(job_id, timeout=480) == "COMPLETED"
    assert (runs["done"] / "metrics.parquet").stat().st_mtime_ns == done_mtime  # not rerun
    assert (tmp_path / "done.log").read_text().count("run ") == 1
    info = json.loads((runs["cut"] / "config.json").read_text())
    assert {a["threads"] for a in info["attempts"]} == {options.threads}
    last = info["attempts"][-1]  # config.json keeps the first attempt's provenance and appends each attempt
    assert last["slurm_job_id"] == job_id and int(last["slurm_restart_count"] or 0) >= 1
    assert info["resumes"] and info["resumes"][-1]["resumed_from_round"] >= 1  # from its checkpoint
    assert (runs["todo"] / "metrics.parquet").is_file()
    for run in runs.values():  # requeued under the same id, never resubmitted
        assert [j["job_id"] for j in json.loads((run / "slurm_jobs.json").read_text())["jobs"]] == [job_id]
    log = (tmp_path / "jobs" / job_id / f"{job_id}_0_log.err").read_text()
    assert "this job is preempted" in log and "timed-out" not in log and "timed out" not in log, log[-3000:]
    assert f"SLURM job {job_id}: preempted (" in (tmp_path / "cut.log").read_text()  # one line in the run's log
    got = pd.read_parquet(runs["cut"] / "metrics.parquet")
    columns = [c for c in reference.columns if not c.startswith("time_")]
    pd.testing.assert_frame_equal(got[columns].reset_index(drop=True), reference[columns].reset_index(drop=True))
    assert yaml.safe_dump(configs["cut"].provenance_dict()) == yaml.safe_dump(info["config"])


# ------------------------------------------------------------------ interrupts at N = 200 (node drained)
SLOW_SBATCH = """#!/bin/sh
# the real sbatch, then 0.3 s before its answer reaches the caller: a Ctrl-C then lands on a job that SLURM
# has queued but whose id the executor never sees
out=$({real} "$@") || exit $?
echo "queued $out" >> {log}
sleep 0.3
echo "$out"
"""


def _tiny_sweep(n: int, cluster, **slurm) -> dict:
    return {"defaults": {"rounds": 1, "num_clients": 2, "local_epochs": 1, "device": "cpu"},
            "datasets": {"digits": {}}, "heterogeneity": [{"partition": "iid"}],
            "methods": {"fedavg": {"default": {}}}, "seeds": list(range(n)), "reporting": {"rule": "final"},
            "slurm": {"partition": cluster.partition, "account": cluster.account, "gpus": 0, "cpus": 1,
                      "mem_gb": 0.5, "time_min": 10, **slurm}}


def _my_queue() -> list[str]:
    import getpass

    return subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], capture_output=True,
                          text=True).stdout.split()


def _wait(condition, what: str, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"snakemake ended before {what}: {proc.out_path.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)


@pytest.fixture
def drained(slurm_cluster):
    """The node drained (jobs stay PENDING), the queue empty before and after."""
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()[0]
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=test"], check=True)
    try:
        yield node
    finally:
        import getpass

        subprocess.run(["scancel", "-u", getpass.getuser()], check=False)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)


@pytest.mark.slow
def test_interrupts_at_n200_leave_no_job_packs_follow_the_budget_and_a_killed_snakemake_reruns_as_typed(
        tmp_path, drained, slurm_cluster):
    """Issue 23, at N = 200 with sbatch slowed to 0.3 s: Ctrl-C in the middle of the submission burst (the
    job of the sbatch in flight was left PENDING); packs cut at Snakemake's 100-jobs-per-second hand-over
    (201 runs were 9 jobs); the rerun after a killed Snakemake stopped with Snakemake's lock error."""
    import shutil
    import signal

    from test_pipeline import _default_sigint

    env = _profile_env(tmp_path)
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SLOW_SBATCH.format(real=shutil.which("sbatch"), log=calls))
    (bin_dir / "sbatch").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def start(wf: Path) -> subprocess.Popen:
        # its output to a file: 200 jobs' lines fill a pipe nobody reads until the end, and Snakemake blocks
        out = open(wf / "snakemake.out", "w")
        proc = subprocess.Popen(snakemake_cmd("--profile", "slurm"), cwd=wf, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_default_sigint)
        proc.out_path = wf / "snakemake.out"
        out.close()
        return proc

    def queued() -> list[str]:
        return calls.read_text().split("queued ")[1:] if calls.exists() else []

    def ctrl_c(proc: subprocess.Popen) -> str:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        return proc.out_path.read_text()

    # 1. Ctrl-C while the 21st sbatch's answer is on its way (200 runs, a job each)
    wf = copy_workflow(tmp_path / "burst", _tiny_sweep(200, slurm_cluster, pack_minutes=0))
    proc = start(wf)
    _wait(lambda: len(queued()) >= 21, "21 submissions", 600, proc)
    text = ctrl_c(proc)
    assert proc.returncode != 0
    lines = [line for line in text.splitlines() if line.startswith("interrupted: cancelled")]
    assert len(lines) == 1 and "SLURM job(s) of this run (fedhpro-" in lines[0], text[-3000:]
    assert "Traceback" not in text and "WorkflowError" not in text and "did not complete" not in text, text[-3000:]
    _wait(lambda: not _my_queue(), "empty queue after Ctrl-C mid-burst", 30)

    # 2. packs of 30 one-minute runs whatever the hand-overs: 201 runs are 7 jobs (6 x 30 + 21), not 9
    calls.unlink()
    wf = copy_workflow(tmp_path / "packs", _tiny_sweep(201, slurm_cluster, pack_minutes=30, run_minutes=1))
    proc = start(wf)
    _wait(lambda: len(queued()) >= 7, "7 packed jobs", 600, proc)
    time.sleep(10)  # nothing more comes
    ids = [line.split()[-1] for line in queued()]  # "Submitted batch job N"
    assert len(ids) == 7, ids
    runs = sorted((wf / "results" / "runs").glob("**/slurm_jobs.json"))
    sizes = sorted(json.loads(path.read_text())["jobs"][-1]["pack_size"] for path in runs)
    assert len(runs) == 201 and sorted(set(sizes)) == [21, 30], sizes

    # 3. Snakemake killed (SIGKILL: no cleanup, its lock stays); the README's command again re-attaches to the
    #    7 jobs without a new sbatch and without Snakemake's lock error
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert list((wf / ".snakemake" / "locks").glob("*.lock"))
    assert sorted(_my_queue()) == sorted(ids)
    proc = start(wf)
    _wait(lambda: proc.out_path.read_text().count("re-attaching") >= 201, "re-attached runs", 600, proc)
    assert len(queued()) == 7  # no new sbatch
    text = ctrl_c(proc)  # 4. Ctrl-C after submission: every re-attached job is cancelled
    assert "LockException" not in text and "Directory cannot be locked" not in text, text[-3000:]
    assert "removed the lock left by Snakemake pid" in text, text[:2000]
    assert "Traceback" not in text and "WorkflowError" not in text, text[-3000:]
    assert [line for line in text.splitlines() if line.startswith("interrupted: cancelled 7 SLURM job(s)")]
    _wait(lambda: not _my_queue(), "empty queue after Ctrl-C of the rerun", 30)
