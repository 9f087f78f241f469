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
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import submitit

# Imported by the Snakemake process on the submit host (snakemake_executor_plugin_fedhpro), so only
# light modules at the top: fedhpro.runio / clientstore / train import torch, pandas and pyarrow
# and are imported where a job (or an in-process run) needs them.
from fedhpro.config import RunConfig, from_dict
from fedhpro.sections import Slurm
from fedhpro.sweep import SLURM_DEFAULTS, check_slurm

__all__ = ["LaunchOptions", "LaunchError", "Trainer", "RunPack", "PackEntry", "launch", "clear_stale_run", "read_jobs",
           "record_job", "update_job", "config_sha", "submit_pack", "query_states", "is_final",
           "failure_report", "interruption_cause", "cancel_jobs", "invocation_job_name", "JOBS_FILE"]

JOBS_FILE = "slurm_jobs.json"
SUBMITIT_DIR = "slurm"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "PREEMPTED"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
TAIL_LINES = 40


class LaunchError(RuntimeError):
    """The training job failed; the message names the SLURM job id and ends with its log tails."""


@dataclass(frozen=True, kw_only=True)
class LaunchOptions(Slurm):
    """How to execute a run: the workflow config's ``slurm:`` section (its keys, defaults and checks declared
    once, in `fedhpro.sections.Slurm`) plus ``threads`` and the submitit cluster."""

    threads: int = 1  # torch threads of an in-process (local) run
    cluster: str | None = None  # submitit cluster: None = auto (slurm when srun is on PATH), "local", "debug"

    def expected_minutes(self, dataset: str) -> float | None:
        """The expected minutes of one run on `dataset` (`run_minutes`), None if unknown."""
        if isinstance(self.run_minutes, Mapping):
            return self.run_minutes.get(dataset, self.run_minutes.get("default"))
        return self.run_minutes

    @property
    def pack_budget_minutes(self) -> float:
        """Expected work of one packed job: pack_minutes of wall time, runs_per_gpu runs at a time."""
        return self.pack_minutes * self.runs_per_gpu

    def plan_packs(self, runs: list[tuple[Any, str]]) -> list[list[Any]]:
        """Group (item, dataset) pairs into jobs: runs expected to take less than `pack_minutes` are
        packed, in order, into jobs of at most `pack_minutes` of expected work; the others get a job
        each. (`run_minutes` unknown for a dataset: its runs are never packed.)"""
        packs: list[list[Any]] = []
        open_pack: list[Any] = []
        open_minutes = 0.0
        budget = self.pack_budget_minutes
        for item, dataset in runs:
            minutes = self.expected_minutes(dataset)
            if minutes is None or not self.pack_minutes or minutes >= self.pack_minutes:
                packs.append([item])
                continue
            if open_pack and open_minutes + minutes > budget:
                packs.append(open_pack)
                open_pack, open_minutes = [], 0.0
            open_pack.append(item)
            open_minutes += minutes
        if open_pack:
            packs.append(open_pack)
        return packs

    @classmethod
    def from_config(cls, slurm: Mapping[str, Any] | None, threads: int = 1, **changes: Any) -> "LaunchOptions":
        values = check_slurm(slurm)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        return cls(**{**values, "threads": threads, **changes})


class Trainer(submitit.helpers.Checkpointable):
    """The callable a workflow job runs (locally or in SLURM): `fedhpro.train.train` on one run directory
    (resumable). The workflow reruns a run whose data changed (its partition's params hold the data's
    identity), so a checkpoint of other data is set aside and the run starts over (`restart_on_other_data`)."""

    def __init__(self, config: Mapping[str, Any], run_dir: str, partition_dir: str | None = None,
                 threads: int | None = None) -> None:
        self.config = dict(config)
        self.run_dir = str(run_dir)
        self.partition_dir = None if partition_dir is None else str(partition_dir)
        self.threads = threads

    def __call__(self) -> str:
        import torch

        from fedhpro.runio import CHECKPOINT, METRICS, CheckpointError
        from fedhpro.train import train

        if self.threads:
            torch.set_num_threads(int(self.threads))
        cfg = from_dict(self.config)
        try:
            train(cfg, self.run_dir, partition_dir=self.partition_dir, restart_on_other_data=True)
        except CheckpointError as err:
            # a checkpoint torn by a kill between its two files: keep it aside and start the run over
            bad = Path(self.run_dir) / CHECKPOINT
            print(f"unusable checkpoint ({err}); moving it to {bad}.corrupt and starting over", flush=True)
            os.replace(bad, bad.with_name(CHECKPOINT + ".corrupt"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bad.with_name(CHECKPOINT + ".sha256"))
            train(cfg, self.run_dir, partition_dir=self.partition_dir, restart_on_other_data=True)
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
    # written by the submit host's Snakemake process too, which must not import fedhpro.runio (torch):
    # the same temp-file + os.replace as runio.atomic_write_text, without its fault points
    path = Path(run_dir) / JOBS_FILE
    tmp = path.with_name(f".{JOBS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"jobs": jobs}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def record_job(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Append a submitted job's record (job id, cluster, config hash, ...) to the run's slurm_jobs.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_jobs(run_dir, read_jobs(run_dir) + [dict(record)])


def update_job(run_dir: str | Path, job_id: str, **changes: Any) -> None:
    """Set fields (final_state, result) of the run's record of job `job_id`."""
    jobs = read_jobs(run_dir)
    for record in jobs:
        if record.get("job_id") == str(job_id):
            record.update(changes)
    if jobs:
        _write_jobs(Path(run_dir), jobs)


def clear_stale_run(cfg: RunConfig | str, run_dir: str | Path, log: Callable[[str], None] = print, *,
                    keep_jobs: bool = False) -> bool:
    """Remove what a run directory holds for a *different* config (its config changed); True if cleared.

    cfg: the run's config or its config hash. The workflow reruns a run when its resolved config
    changes (Snakemake's params trigger); the old checkpoint and config must go, or `train` would
    refuse the directory. keep_jobs: keep slurm_jobs.json's records of this config (a job clearing
    its own run directory) and drop only the others.
    """
    from fedhpro.clientstore import CLIENT_STATES_DIR
    from fedhpro.runio import CHECKPOINT, CONFIG, METRICS

    new = cfg if isinstance(cfg, str) else cfg.config_hash()
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        return False
    try:
        old = json.loads(cfg_path.read_text()).get("config_hash")
    except (OSError, ValueError):
        old = None
    if old == new:
        return False
    log(f"{run_dir}: config changed ({old} -> {new}); removing the old run's files")
    for name in (METRICS, CONFIG, CHECKPOINT, CHECKPOINT + ".sha256", CHECKPOINT + ".corrupt",
                 *(() if keep_jobs else (JOBS_FILE,))):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    if keep_jobs:
        _write_jobs(run_dir, [job for job in read_jobs(run_dir) if job.get("config_hash") in (new, None)])
    else:
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
    from fedhpro.runio import METRICS

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


def _executor(folder: Path, name: str, options: LaunchOptions) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster,
                                     slurm_max_num_timeout=options.max_num_timeout)
    params: dict[str, Any] = {"name": name, "timeout_min": options.time_min,
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
    from fedhpro.runio import METRICS

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
        executor = _executor(run_dir / SUBMITIT_DIR, f"fedhpro-{cfg.method}-{cfg.variant}", options)
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


# ------------------------------------------------------------------------------ packed jobs (executor plugin)
# snakemake_executor_plugin_fedhpro submits each group of training runs as one SLURM job through
# submitit (a job holds one run, or several short runs executed one after another) and polls every
# job of the sweep with one scheduler query per interval (`query_states`).
@dataclass(frozen=True)
class PackEntry:
    """One run of a packed job: everything the compute node needs, as plain strings."""

    config_json: str  # RunConfig.canonical_json() (the train rule's params)
    run_dir: str
    partition_dir: str | None
    log: str | None  # the run's log file (the train rule's `log:`); None = the job's own stdout
    # The workflow config and the job's wildcards: config_json (the rerun trigger) holds no data location
    # (data_root, dataset_options.path), so the node resolves the full config from them, as the train script does.
    workflow_config: str | None = None
    wildcards: tuple[tuple[str, str], ...] = ()


def run_config_of(entry: PackEntry) -> dict[str, Any]:
    """The run's full config (data location included) on the compute node: resolved from the workflow config
    and wildcards when the executor sent them, and checked against the canonical config Snakemake scheduled."""
    config = json.loads(entry.config_json)
    if entry.workflow_config is None:
        return config
    from fedhpro.sweep import workflow_run

    cfg = workflow_run(json.loads(entry.workflow_config), dict(entry.wildcards)).config
    if cfg.canonical_json() != from_dict(config).canonical_json():
        raise RuntimeError("the workflow config changed since the job was scheduled; run snakemake again")
    return cfg.to_dict()


class RunPack(submitit.helpers.Checkpointable):
    """The callable of a SLURM job: its runs one after another, each resumable from its checkpoint.

    A finished run (its metrics.parquet exists) is skipped, so after a preemption or time-limit
    requeue (SIGUSR2: `checkpoint` returns the same pack) the job finishes the runs it had not
    finished, the interrupted one from its checkpoint.pt. A failing run does not stop the others:
    its traceback goes to its log, and the job fails at the end naming it.
    """

    def __init__(self, entries: list[PackEntry], threads: int | None = None,
                 signal_delay_s: float | None = None, *, runs_per_gpu: int = 1) -> None:
        self.entries = list(entries)
        self.threads = threads
        self.signal_delay_s = signal_delay_s  # SIGUSR2 this long before the time limit (slurm.signal_delay_s)
        self.runs_per_gpu = max(1, int(runs_per_gpu))

    def __call__(self) -> list[str]:
        from fedhpro.runio import METRICS

        _name_preemptions_correctly(self._delay())
        todo = [e for e in self.entries if not (Path(e.run_dir) / METRICS).exists()]
        n = getattr(self, "runs_per_gpu", 1)  # (a job pickled before the option existed has none)
        if n == 1:
            failed = [f for f in (run_entry(e, self.threads) for e in todo) if f]
        else:  # also for a last unfinished run: its thread count must stay the one it started with
            failed = run_entries_concurrently(todo, self.threads, n)
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(self.entries)} runs failed:\n" + "\n".join(failed))
        return [str(Path(entry.run_dir) / METRICS) for entry in self.entries]

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        print(f"SLURM job {os.environ.get('SLURM_JOB_ID')}: {interruption_cause(None, self._delay())}: requeueing "
              f"{len(self.entries)} runs (finished ones are skipped, the interrupted one resumes from its checkpoint)",
              flush=True)
        return submitit.helpers.DelayedSubmission(RunPack(self.entries, self.threads, self._delay(),
                                                          runs_per_gpu=getattr(self, "runs_per_gpu", 1)))

    def _delay(self) -> float:
        delay = getattr(self, "signal_delay_s", None)  # packs pickled before the attribute existed
        return float(SLURM_DEFAULTS["signal_delay_s"] if delay is None else delay)


def run_entry(entry: PackEntry, threads: int | None, memory_fraction: float | None = None) -> str | None:
    """Train one run of a pack (resuming from its checkpoint) with its output in its log; its failure as a line
    (the traceback stays in the log), else None. `memory_fraction`: this process's share of the GPU's memory."""
    with _run_log(entry.log) as log:
        try:
            print(f"SLURM job {os.environ.get('SLURM_JOB_ID')} (restart "
                  f"{os.environ.get('SLURM_RESTART_COUNT', '0')}): run {entry.run_dir}", flush=True)
            if memory_fraction is not None:
                import torch

                if torch.cuda.is_available():  # one run cannot take the memory of the others sharing the GPU
                    torch.cuda.set_per_process_memory_fraction(memory_fraction)
            config = run_config_of(entry)
            config_hash = from_dict(config).config_hash()  # the submit host has no torch to compute it
            clear_stale_run(config_hash, entry.run_dir, keep_jobs=True)
            if os.environ.get("SLURM_JOB_ID"):
                update_job(entry.run_dir, os.environ["SLURM_JOB_ID"], config_hash=config_hash)
            Trainer(config, entry.run_dir, entry.partition_dir, threads)()
        except Exception as err:  # noqa: BLE001 - reported in the run's log and at the end
            import traceback

            traceback.print_exc()
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            print(f"{RUN_ERROR_PREFIX}{reason}", flush=True)  # the line the executor's report quotes
            return f"{entry.run_dir}: {reason}"
        finally:
            log.flush()
    return None


def run_entries_concurrently(entries: list[PackEntry], threads: int | None, runs_per_gpu: int) -> list[str]:
    """`runs_per_gpu` runs at a time, each in a fresh process (its own CUDA context, torch threads and RNG, so
    its numbers are those of the run alone with that thread count), with cpus // runs_per_gpu threads and
    1/runs_per_gpu of the GPU's memory each. A preempted job is killed whole by SLURM and requeued; every
    unfinished run then resumes from its own checkpoint."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    per_run = None if threads is None else max(1, threads // runs_per_gpu)
    with ProcessPoolExecutor(max_workers=runs_per_gpu, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_entry, entries, [per_run] * len(entries), [1.0 / runs_per_gpu] * len(entries)))
    return [f for f in results if f]


def slurm_time_left_s(job_id: str | None = None) -> float | None:
    """Seconds until the SLURM job's end time (its time limit), from squeue; None if unknown."""
    import datetime

    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%e"], capture_output=True, text=True,
                             timeout=30)
        end = datetime.datetime.fromisoformat(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return (end - datetime.datetime.now()).total_seconds()


def interruption_cause(time_left_s: float | None, signal_delay_s: float) -> str:
    """Why a job got SIGUSR2: its time limit is near (SLURM sends it `signal_delay_s` before the end) or it
    was preempted (or signalled by hand, e.g. ``scancel --signal=USR2``)."""
    left = slurm_time_left_s() if time_left_s is None else time_left_s
    if left is None:
        return "SIGUSR2 (preempted or near its time limit)"
    if _near_time_limit(left, signal_delay_s):
        return f"near its time limit ({left:.0f} s left, SIGUSR2)"
    return f"preempted ({left / 60:.0f} min before its time limit, SIGUSR2)"


def _near_time_limit(time_left_s: float, signal_delay_s: float) -> bool:
    # SLURM signals `signal_delay_s` before the end; a minute of slack for a slow signal handler
    return time_left_s <= signal_delay_s + 60


def _name_preemptions_correctly(signal_delay_s: float) -> None:
    """submitit guesses "timed-out" vs "preempted" from the wall time alone (80% of the limit, or the limit
    minus 10 min): every SIGUSR2 of a job with a limit under 10 min is "timed-out", and each one spends one
    of its `max_num_timeout` requeues. Ask SLURM how much time is left instead."""
    from submitit.core import job_environment

    handler = job_environment.SignalHandler
    if getattr(handler, "_fedhpro_patched", False):
        return
    guess = handler.has_timed_out

    def has_timed_out(self: Any) -> bool:
        left = slurm_time_left_s()
        if left is None:
            return guess(self)
        return _near_time_limit(left, signal_delay_s)

    handler.has_timed_out = has_timed_out
    handler._fedhpro_patched = True


@contextlib.contextmanager
def _run_log(path: str | None):
    """stdout and stderr appended to the run's log file (a no-op when it has none)."""
    if path is None:
        yield sys.stdout
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield log


def submit_pack(entries: list[PackEntry], options: LaunchOptions, folder: str | Path, name: str,
                comment: str | None = None) -> Any:
    """Submit the runs as one job (submitit, one sbatch); record its id in every run's slurm_jobs.json.

    name: the SLURM job name. The executor gives every job of one Snakemake invocation the same name
    (`invocation_job_name`), so that an interrupt can cancel by name the job whose sbatch was in flight
    (its id never reached us). comment: what the job holds (shown by ``squeue -o %k``)."""
    executor = _executor(Path(folder), name, options)
    if comment:
        executor.update_parameters(slurm_comment=comment)
    job = executor.submit(RunPack(entries, options.cpus, options.signal_delay_s, runs_per_gpu=options.runs_per_gpu))
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S")
    for entry in entries:
        record_job(entry.run_dir, {"job_id": str(job.job_id), "cluster": executor.cluster, "submitted": submitted,
                                   "config_sha": config_sha(entry.config_json),
                                   "folder": str(job.paths.folder), "pack_size": len(entries)})
    return job


def invocation_job_name() -> str:
    """The SLURM job name of every job one Snakemake invocation submits: ``fedhpro-`` and a random tag.
    An interrupt cancels by this name too (`cancel_jobs`), which catches a job whose sbatch was in flight:
    SLURM queued it, but its id never reached the executor (nor any run's slurm_jobs.json)."""
    return f"fedhpro-{os.urandom(4).hex()}"


def _user() -> str:
    import getpass

    return getpass.getuser()


def _squeue_ids(name: str) -> list[str]:
    try:
        out = subprocess.run(["squeue", "-h", "--user", _user(), "--name", name, "-o", "%i"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def cancel_jobs(job_ids: list[str], name: str | None = None, settle_s: float = 1.0) -> list[str]:
    """Cancel the jobs by id and, with `name`, every job of this user with that job name (one scancel each).
    An sbatch cut off by the interrupt may have reached the controller a moment before it died: after
    `settle_s` the queue is asked once more for jobs of that name. Returns the ids seen by name."""
    if shutil.which("scancel") is None:
        return []  # not a SLURM host (submitit's local executor): nothing queued
    if job_ids:
        subprocess.run(["scancel", *sorted(set(job_ids))], check=False, capture_output=True, timeout=120)
    if not name:
        return []
    seen = _squeue_ids(name)
    subprocess.run(["scancel", "--user", _user(), "--name", name], check=False, capture_output=True, timeout=120)
    time.sleep(settle_s)
    late = _squeue_ids(name)
    if late:
        subprocess.run(["scancel", *late], check=False, capture_output=True, timeout=120)
    return sorted(set(seen) | set(late))


def config_sha(config_json: str) -> str:
    """Identity of a submitted run config text (a re-attached job must run the same config)."""
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def query_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> SLURM state (first word, e.g. PENDING, COMPLETED) for many jobs in one scheduler call.

    One `sacct` over all ids (allocations only, the latest attempt of a requeued job); where
    accounting is not available, one `squeue` of the user's jobs, where a job that left the queue
    is reported as "GONE". Jobs missing from the answer are left out (e.g. sacct's short lag
    right after submission).
    """
    if not job_ids:
        return {}
    ids = ",".join(sorted(set(job_ids), key=lambda j: (len(j), j)))
    try:
        proc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State", "-j", ids],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        proc = None
    states: dict[str, str] = {}
    if proc is not None and proc.returncode == 0:
        for line in proc.stdout.splitlines():
            job_id, _, state = line.partition("|")
            if state:
                states[job_id.strip()] = state.split()[0].upper()
        return states
    try:
        proc = subprocess.run(["squeue", "--me", "-h", "-t", "all", "-o", "%i|%T"], capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return {}
    if proc.returncode != 0:
        return {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = state.strip().upper()
    return {job_id: states.get(job_id, "GONE") for job_id in set(job_ids)}


def is_final(state: str) -> bool:
    return state in FINAL_STATES or state == "GONE"


def failure_report(job_id: str, state: str, entry: PackEntry, folder: str | Path, pack_size: int = 1) -> str:
    """One line for a run whose job ended without its metrics: the job id and state, the run's error (the
    last line the run wrote to its log, `RUN_ERROR_PREFIX`) and where the detail is (run log, job logs)."""
    folder = Path(folder)
    reason = _run_error(entry.log) or _job_error(folder / f"{job_id}_0_log.err") or _STATE_REASONS.get(
        state, "no error recorded by the run")
    where = f"run log: {entry.log}; job logs: {folder}" if entry.log else f"job logs: {folder}"
    packed = f", {pack_size} runs packed" if pack_size > 1 else ""
    return f"run {entry.run_dir} failed in SLURM job {job_id} ({state}{packed}): {reason} ({where})"


RUN_ERROR_PREFIX = "run failed: "
_STATE_REASONS = {"TIMEOUT": "the job hit its time limit (slurm.time_min) and was not requeued",
                  "OUT_OF_MEMORY": "the job ran out of memory (slurm.mem_gb)",
                  "CANCELLED": "the job was cancelled", "NODE_FAIL": "its node failed",
                  "GONE": "the job left the queue without a result", "PREEMPTED": "the job was preempted"}


def _run_error(log: str | None) -> str | None:
    lines = [line for line in (_read(log) or "").splitlines() if line.startswith(RUN_ERROR_PREFIX)] if log else []
    return lines[-1][len(RUN_ERROR_PREFIX):] if lines else None


def _job_error(stderr: Path) -> str | None:
    """The last exception line of the job's stderr (submitit's traceback of a job that failed before or
    outside its runs, e.g. an import error on the node)."""
    lines = [line.strip() for line in (_read(stderr) or "").splitlines()
             if line[:1].isalpha() and ("Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0])]
    return " ".join(lines[-1].split())[:300] if lines else None


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None
