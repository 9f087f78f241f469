"""The workflow against the real local SLURM cluster (scripts/slurm-local.sh, started by the fixture).

* `snakemake --profile profiles/slurm` on a tiny config: every training run is a SLURM job
  submitted by fedhpro.launch through submitit; job ids are recorded and the tables are built.
* Preemption (slow, ~3 min because Slurm holds a requeued job ~120 s): a run submitted through
  `fedhpro.launch` gets SIGUSR2 after its first checkpoint, requeues itself (submitit
  Checkpointable), resumes from its checkpoint and ends with the same metrics as an uninterrupted
  local run.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from slurm_cluster import slurm_autostart, slurm_cluster  # noqa: F401  (fixtures)

from test_pipeline import copy_workflow, snakemake_cmd

pytestmark = pytest.mark.slurm


@pytest.mark.slow
def test_profile_slurm_runs_every_training_run_as_a_slurm_job(tmp_path, slurm_cluster):
    config = {
        "defaults": {"rounds": 2, "num_clients": 10, "batch_size": 32, "lr": 0.05, "device": "cpu"},
        "datasets": {"digits": {}},
        "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
        "methods": {"fedavg": {"default": {}}, "fedprox": {"default": {"mu": 0.01}}},
        "seeds": [0],
        "slurm": {"partition": slurm_cluster.partition, "account": slurm_cluster.account, "gpus": 1, "cpus": 1,
                  "mem_gb": 1, "time_min": 10, "poll_seconds": 2},
    }
    wf = copy_workflow(tmp_path, config)
    proc = subprocess.run(snakemake_cmd("--profile", "profiles/slurm"), cwd=wf, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dirs = sorted(p.parent for p in (wf / "results" / "runs").glob("**/metrics.parquet"))
    assert len(run_dirs) == 2
    job_ids = set()
    for run_dir in run_dirs:
        jobs = json.loads((run_dir / "slurm_jobs.json").read_text())["jobs"]
        assert len(jobs) == 1 and jobs[0]["job_id"].isdigit() and jobs[0]["cluster"] == "slurm"
        assert jobs[0]["result"] == "ok"
        info = json.loads((run_dir / "config.json").read_text())
        assert info["slurm_job_id"] == jobs[0]["job_id"]
        job_ids.add(jobs[0]["job_id"])
    assert len(job_ids) == 2
    for name in ("main", "ablation", "communication"):
        for ext in ("md", "tex", "csv"):
            assert (wf / "results" / "tables" / f"{name}.{ext}").is_file()
    assert list((wf / "results" / "figures").glob("*.png"))


@pytest.mark.slow
def test_preempted_run_requeues_and_resumes_to_identical_metrics(tmp_path, slurm_cluster):
    from fedhpro.config import from_dict
    from fedhpro.launch import LaunchOptions, launch
    from fedhpro.train import train

    cfg = from_dict({"method": "fedavg", "dataset": "digits", "rounds": 25, "num_clients": 10, "batch_size": 16,
                     "lr": 0.05, "local_epochs": 2, "device": "cpu", "seed": 3, "checkpoint_every": 1})
    run_dir = tmp_path / "slurm_run"
    options = LaunchOptions(launcher="submitit", partition=slurm_cluster.partition, account=slurm_cluster.account,
                            gpus=0, cpus=1, mem_gb=1, time_min=15, poll_seconds=2)
    outcome: dict = {}

    def waiter() -> None:
        try:
            outcome["metrics"] = launch(cfg, run_dir, None, options, log=lambda m: None)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoint.pt").exists():
        assert time.monotonic() < deadline, "the SLURM job wrote no checkpoint in time"
        assert thread.is_alive(), f"launch ended early: {outcome}"
        time.sleep(0.5)
    job_id = json.loads((run_dir / "slurm_jobs.json").read_text())["jobs"][0]["job_id"]
    assert not (run_dir / "metrics.parquet").exists(), "the run finished before it could be preempted"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    # the uninterrupted reference, computed while Slurm holds the requeued job (~120 s)
    reference = train(cfg, tmp_path / "local_run")

    thread.join(timeout=480)
    assert not thread.is_alive(), "the requeued job did not finish in time"
    assert "error" not in outcome, outcome.get("error")
    info = json.loads((run_dir / "config.json").read_text())
    assert info["slurm_job_id"] == job_id
    assert int(info["slurm_restart_count"] or 0) >= 1
    jobs = json.loads((run_dir / "slurm_jobs.json").read_text())["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id]  # requeued under the same id, never resubmitted
    log = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert "USR2" in log or "preempted" in log
    got = pd.read_parquet(run_dir / "metrics.parquet")
    columns = [c for c in reference.columns if not c.startswith("time_")]
    pd.testing.assert_frame_equal(got[columns].reset_index(drop=True), reference[columns].reset_index(drop=True))
    assert yaml.safe_dump(cfg.to_dict()) == yaml.safe_dump(info["config"])
