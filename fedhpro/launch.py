"""Execute one training run: in-process (``launcher: local``) or as a SLURM job via submitit.

Used by ``workflow/scripts/train.py`` (one Snakemake job per run). With ``launcher: submitit``
the Snakemake job runs on the submit host, submits the run with `submitit.AutoExecutor`
(``folder=<run_dir>/slurm``), waits for it, and succeeds when the run's ``metrics.parquet``
exists. Compute nodes need no Snakemake, only this package and its venv.

Preemption and time limits (DINO-style): the submitted callable is a `Trainer`, a
`submitit.helpers.Checkpointable`. On SIGUSR2 (sent by SLURM ``slurm_signal_delay_s`` before the
time limit, or by a preempting scheduler / ``scancel --signal=USR2``) submitit calls
`Trainer.checkpoint`, which returns a `DelayedSubmission` of the same trainer, and requeues the
job (same job id, ``SLURM_RESTART_COUNT`` + 1). `fedhpro.train.train` checkpoints the run into
its own directory every ``checkpoint_every`` rounds and resumes from ``checkpoint.pt``
automatically, so the requeued job continues from the last completed checkpoint and gives the
same numbers as an uninterrupted run.

Bookkeeping in the run directory: ``slurm_jobs.json`` lists every job submitted for the run
(job id, config hash, submission time, final state); ``config.json`` (written by `train`) holds
``slurm_job_id`` and ``slurm_restart_count`` of the attempt that wrote it. If the waiting process is
killed (SIGINT/SIGTERM) the job is cancelled; if it died without cleaning up (SIGKILL), a rerun
re-attaches to a job of the same config that is still pending or running instead of submitting
a second one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import submitit

from fedhpro.clientstore import CLIENT_STATES_DIR
from fedhpro.config import RunConfig, from_dict
from fedhpro.runio import CHECKPOINT, CONFIG, METRICS, atomic_write_text

__all__ = ["LaunchOptions", "LaunchError", "Trainer", "launch", "clear_stale_run", "read_jobs", "JOBS_FILE"]

JOBS_FILE = "slurm_jobs.json"
SUBMITIT_DIR = "slurm"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "PREEMPTED"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
TAIL_LINES = 40


class LaunchError(RuntimeError):
    """The training job failed; the message names the SLURM job id and ends with its log tails."""


@dataclass(frozen=True)
class LaunchOptions:
    """How to execute a run (the workflow config's ``slurm:`` section plus ``threads``)."""

    launcher: str = "local"  # local | submitit
    partition: str | None = None
    account: str | None = None
    gpus: int = 1
    cpus: int = 4
    mem_gb: float = 16
    time_min: int = 240
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    poll_seconds: float = 30.0
    additional: Mapping[str, Any] = field(default_factory=dict)
    threads: int = 1  # torch threads of an in-process (local) run
    cluster: str | None = None  # submitit cluster: None = auto (slurm when srun is on PATH), "local", "debug"

    @classmethod
    def from_config(cls, slurm: Mapping[str, Any] | None, threads: int = 1, **changes: Any) -> "LaunchOptions":
        from fedhpro.sweep import check_slurm

        values = check_slurm(slurm)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        return cls(**{**values, "threads": threads, **changes})


class Trainer(submitit.helpers.Checkpointable):
    """The callable a SLURM job runs: `fedhpro.train.train` on one run directory (resumable)."""

    def __init__(self, config: Mapping[str, Any], run_dir: str, partition_dir: str | None = None,
                 threads: int | None = None) -> None:
        self.config = dict(config)
        self.run_dir = str(run_dir)
        self.partition_dir = None if partition_dir is None else str(partition_dir)
        self.threads = threads

    def __call__(self) -> str:
        import torch

        from fedhpro.runio import CheckpointError
        from fedhpro.train import train

        if self.threads:
            torch.set_num_threads(int(self.threads))
        cfg = from_dict(self.config)
        try:
            train(cfg, self.run_dir, partition_dir=self.partition_dir)
        except CheckpointError as err:
            # a checkpoint torn by a kill between its two files: keep it aside and start the run over
            bad = Path(self.run_dir) / CHECKPOINT
            print(f"unusable checkpoint ({err}); moving it to {bad}.corrupt and starting over", flush=True)
            os.replace(bad, bad.with_name(CHECKPOINT + ".corrupt"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bad.with_name(CHECKPOINT + ".sha256"))
            train(cfg, self.run_dir, partition_dir=self.partition_dir)
        return str(Path(self.run_dir) / METRICS)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # train() has already saved its state in run_dir/checkpoint.pt (every `checkpoint_every`
        # rounds); the requeued job calls the same trainer, which resumes from there.
        print(f"checkpoint requested: requeueing {self.run_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(Trainer(self.config, self.run_dir, self.partition_dir,
                                                          self.threads))


# ------------------------------------------------------------------------------ run directory
def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / JOBS_FILE
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("jobs", []))


def _write_jobs(run_dir: Path, jobs: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / JOBS_FILE, json.dumps({"jobs": jobs}, indent=2, sort_keys=True) + "\n")


def clear_stale_run(cfg: RunConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> bool:
    """Remove what a run directory holds for a *different* config (its config changed); True if cleared.

    The workflow reruns a run when its resolved config changes (Snakemake's params trigger); the
    old checkpoint and config must go, or `train` would refuse the directory.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        return False
    try:
        old = json.loads(cfg_path.read_text()).get("config_hash")
    except (OSError, ValueError):
        old = None
    if old == cfg.config_hash():
        return False
    log(f"{run_dir}: config changed ({old} -> {cfg.config_hash()}); removing the old run's files")
    for name in (METRICS, CONFIG, CHECKPOINT, CHECKPOINT + ".sha256", CHECKPOINT + ".corrupt", JOBS_FILE):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    shutil.rmtree(run_dir / SUBMITIT_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / CLIENT_STATES_DIR, ignore_errors=True)
    return True


def _tail(text: str | None, n: int = TAIL_LINES) -> str:
    if not text:
        return "(empty)"
    return "\n".join(text.rstrip().splitlines()[-n:])


def _squeue_state(job_id: str) -> str | None:
    """The job's state from squeue (None if squeue does not list it or fails)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0].strip().upper() if out.returncode == 0 and lines else None


# ------------------------------------------------------------------------------ launching
def launch(cfg: RunConfig, run_dir: str | Path, partition_dir: str | Path | None = None,
           options: LaunchOptions | None = None, log: Callable[[str], None] = print) -> Path:
    """Execute the run and return its ``metrics.parquet`` path (raises LaunchError on failure)."""
    options = options or LaunchOptions()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    partition_dir = None if partition_dir is None else str(Path(partition_dir).resolve())
    metrics = run_dir / METRICS
    if options.launcher == "local":
        clear_stale_run(cfg, run_dir, log)
        Trainer(cfg.to_dict(), str(run_dir), partition_dir, options.threads)()
    elif options.launcher == "submitit":
        _submit_and_wait(cfg, run_dir, partition_dir, options, log)
    else:
        raise ValueError(f"unknown launcher {options.launcher!r}; accepted: local, submitit")
    if not metrics.exists():
        raise LaunchError(f"run {run_dir} ended without writing {METRICS}")
    return metrics


def _executor(run_dir: Path, cfg: RunConfig, options: LaunchOptions) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=run_dir / SUBMITIT_DIR, cluster=options.cluster,
                                     slurm_max_num_timeout=options.max_num_timeout)
    params: dict[str, Any] = {"name": f"fedhpro-{cfg.method}-{cfg.variant}", "timeout_min": options.time_min,
                              "mem_gb": options.mem_gb, "cpus_per_task": options.cpus, "tasks_per_node": 1,
                              "nodes": 1, "slurm_signal_delay_s": options.signal_delay_s}
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.account:
        params["slurm_account"] = options.account
    if options.gpus:
        params["slurm_gres"] = f"gpu:{options.gpus}"
    if options.additional:
        params["slurm_additional_parameters"] = dict(options.additional)
    executor.update_parameters(**params)
    return executor


def _reattach(cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> Any | None:
    """A still-active SLURM job of this config (after a killed Snakemake), or None; cancels stale ones."""
    jobs = read_jobs(run_dir)
    if not jobs or jobs[-1].get("cluster") != "slurm" or jobs[-1].get("final_state"):
        return None
    last = jobs[-1]
    state = _squeue_state(last["job_id"])
    if state not in ACTIVE_STATES:
        return None
    if last.get("config_hash") != cfg.config_hash():
        log(f"cancelling SLURM job {last['job_id']} of the run's previous config")
        subprocess.run(["scancel", str(last["job_id"])], check=False)
        return None
    log(f"re-attaching to SLURM job {last['job_id']} ({state}) of this run")
    return submitit.SlurmJob(folder=run_dir / SUBMITIT_DIR, job_id=str(last["job_id"]))


class _Stop(Exception):
    pass


def _submit_and_wait(cfg: RunConfig, run_dir: Path, partition_dir: str | None, options: LaunchOptions,
                     log: Callable[[str], None]) -> None:
    metrics = run_dir / METRICS
    job = _reattach(cfg, run_dir, log)
    if job is None:
        clear_stale_run(cfg, run_dir, log)
        if metrics.exists():
            return
    # gentle polling: submitit's watcher calls sacct at most every `poll_seconds` (sooner right after
    # submission); between calls only the result file is checked
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    SlurmJob.watcher = SlurmInfoWatcher(delay_s=max(1, int(options.poll_seconds)))
    jobs = read_jobs(run_dir)
    if job is None:
        executor = _executor(run_dir, cfg, options)
        job = executor.submit(Trainer(cfg.to_dict(), str(run_dir), partition_dir, options.cpus))
        jobs.append({"job_id": str(job.job_id), "cluster": executor.cluster, "config_hash": cfg.config_hash(),
                     "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "folder": str(run_dir / SUBMITIT_DIR)})
        _write_jobs(run_dir, jobs)
        log(f"submitted {run_dir} as {executor.cluster} job {job.job_id}")
    record = jobs[-1]

    stop = threading.Event()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        _wait(job, options, stop, cluster=record.get("cluster", "slurm"))
    except _Stop:
        log(f"interrupted: cancelling job {job.job_id}")
        with contextlib.suppress(Exception):
            job.cancel(check=False)
        record["final_state"] = "CANCELLED (by the waiting process)"
        _write_jobs(run_dir, jobs)
        raise LaunchError(f"interrupted while waiting for job {job.job_id}; the job was cancelled "
                          f"(the run resumes from its checkpoint next time)") from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

    error = None
    try:
        job.result()
    except Exception as err:  # FailedJobError / UncompletedJobError carry submitit's own diagnosis
        error = err
    state = _final_state(job, record.get("cluster", "slurm"))
    record["final_state"] = state
    record["result"] = "ok" if error is None and metrics.exists() else "failed"
    _write_jobs(run_dir, jobs)
    if error is not None or not metrics.exists():
        raise LaunchError(
            f"SLURM job {job.job_id} for run {run_dir} failed (state {state}): "
            f"{(str(error).splitlines() or ['no metrics written'])[0] if error else 'no ' + METRICS + ' written'}\n"
            f"--- stderr tail ({job.paths.stderr}) ---\n{_tail(job.stderr())}\n"
            f"--- stdout tail ({job.paths.stdout}) ---\n{_tail(job.stdout())}")
    log(f"job {job.job_id} finished ({state}); metrics in {metrics}")


def _final_state(job: Any, cluster: str, tries: int = 5) -> str:
    """The job's state once SLURM has recorded its end (the result file can appear a moment earlier)."""
    if cluster != "slurm":
        return job.state
    state = "UNKNOWN"
    for _ in range(tries):
        state = job.watcher.get_state(job.job_id, mode="force")
        if state.split()[0] in FINAL_STATES:
            break
        time.sleep(1)
    return state


def _wait(job: Any, options: LaunchOptions, stop: threading.Event, cluster: str) -> None:
    """Block until the job is over (result written, or SLURM reports a final state)."""
    poll = float(options.poll_seconds)
    last_queue_check = time.monotonic()
    missing = 0
    while True:
        if stop.is_set():
            raise _Stop()
        if job.done():
            return
        if cluster == "slurm" and time.monotonic() - last_queue_check >= poll:
            # safety net for clusters whose sacct is unavailable (submitit then reports UNKNOWN forever)
            last_queue_check = time.monotonic()
            state = _squeue_state(job.job_id)
            if state in FINAL_STATES:
                return
            missing = missing + 1 if state is None else 0
            if missing >= 3 and job.watcher.get_state(job.job_id, mode="standard") == "UNKNOWN":
                return
        stop.wait(min(1.0, poll))
