"""Snakemake executor `fedhpro`: training runs as SLURM jobs through submitit, from one light process.

Used by the `slurm` profile (``snakemake --profile slurm``; profiles/slurm/config.yaml). Snakemake
discovers this package by its name (``snakemake_executor_plugin_*`` on sys.path). Every rule but
`train` is a local rule and runs on the submit host as usual; this executor handles the `train`
jobs (the jobs with a ``run_config`` param):

* submission: the ready runs are grouped by `fedhpro.launch.LaunchOptions.plan_packs` (runs
  expected to take less than ``slurm.pack_minutes`` share a job, executed one after another;
  the others get a job each) and each group is submitted with submitit as a
  `fedhpro.launch.RunPack` (Checkpointable: SIGUSR2 -> requeue with the same job id -> the
  unfinished runs resume from their checkpoints, finished ones are skipped). Compute nodes need
  no Snakemake; the job ids are recorded in every run's ``slurm_jobs.json``;
* status: one scheduler query per ``seconds-between-status-checks`` for all jobs of the sweep
  (`fedhpro.launch.query_states`: one ``sacct -j id1,id2,...``, or one ``squeue --me`` without
  accounting). A run succeeds as soon as its ``metrics.parquet`` exists (even while the rest of
  its pack still runs); a job that ends without it fails the run with the job id, state and the
  tails of the run's log and the job's stderr;
* packing across hand-overs: Snakemake hands ready jobs over in batches (at most 100 per second by
  default); the last, not yet full pack of a batch waits `HOLD_S` for the next batch, so packs follow
  ``pack_minutes`` whatever the batches are;
* interruption (Ctrl-C): one ``scancel`` for all jobs, and one by job name: every job of one invocation is
  named ``fedhpro-<tag>`` (`fedhpro.launch.invocation_job_name`), which catches the job whose ``sbatch`` was in
  flight (queued, id never seen). After a killed Snakemake, a rerun re-attaches to a job of the same run
  config that is still pending or running; the killed Snakemake's lock is removed first
  (`fedhpro.snakelock.remove_dead_lock`, at workflow load: only the lock files that process wrote, on this host,
  and only when it is gone).

The process never imports torch: the plugin uses only `fedhpro.launch`'s light part, and the
workflow's run table (`fedhpro.runtable`) reads declarations that import torch lazily. Importing this module
does nothing but define the plugin (Snakemake imports every installed executor plugin in every call): what
runs before Snakemake reads its command line is `fedhpro.snakestart` (a .pth file), and a killed
Snakemake's lock is removed by the workflow at load (`fedhpro.snakelock`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, AsyncGenerator, List

import submitit

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings

from fedhpro.launch import (ACTIVE_STATES, LaunchOptions, PackEntry, cancel_jobs, config_sha, failure_report,
                            invocation_job_name, is_final, query_states, read_jobs, submit_pack, update_job)
from fedhpro.sweep import SweepConfigError

common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,  # run directories, logs and submitit's folder live on a shared file system
    job_deploy_sources=False,
    pass_default_storage_provider_args=False,
    pass_default_resources_args=False,
    pass_envvar_declarations_to_cmd=False,
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=5,
)


HOLD_S = 3.0  # an open pack waits this long after a hand-over for the next one (Snakemake: 100 jobs / 1 s)
INTERRUPTED_LINE = "interrupted: cancelled {n} SLURM job(s) of this run ({name}); rerun the same command to resume"


class Executor(RemoteExecutor):
    def __post_init__(self) -> None:
        config = getattr(self.workflow, "config", None) or {}
        # sent with every run: the node resolves the run's data location from it (not in the rerun trigger)
        self.workflow_config_json = json.dumps(config, default=str)
        try:
            self.options = LaunchOptions.from_config(config.get("slurm"))
        except SweepConfigError as err:
            raise WorkflowError(f"invalid workflow config: {err}") from None
        results = str(config.get("results", "results")).rstrip("/")
        # submitit's folder, one per SLURM job: pickled callable, result, stdout/stderr
        self.jobs_folder = os.path.abspath(os.path.join(results, "logs", "slurm", "%j"))
        self.submitit_jobs: dict[str, Any] = {}  # job id -> submitit job (non-SLURM clusters: polled locally)
        timespan = getattr(getattr(self.workflow, "scheduling_settings", None), "max_jobs_per_timespan", None)
        self.init_submission_state(max(HOLD_S, float(getattr(timespan, "timespan", 0) or 0) + 2.0))

    def init_submission_state(self, hold_s: float) -> None:
        self.job_name = invocation_job_name()  # every job of this invocation: cancel by name on an interrupt
        self.known_ids: set[str] = set()  # every SLURM job submitted or re-attached (active_jobs is emptied
        # while a status check runs, so an interrupt then would see none of them)
        self.submit_lock = threading.RLock()
        self.open_pack: list[tuple[JobExecutorInterface, PackEntry]] = []  # waiting for the next hand-over
        self.open_timer: threading.Timer | None = None
        self.interrupted = False
        self.hold_s = hold_s

    # ------------------------------------------------------------------ submission
    def run_job(self, job: JobExecutorInterface) -> None:
        self.run_jobs([job])

    def run_jobs(self, jobs: List[JobExecutorInterface]) -> None:
        runs: list[tuple[JobExecutorInterface, PackEntry]] = []
        for job in jobs:
            self.run_job_pre(job)
            config_json = None if job.is_group() else getattr(job.params, "run_config", None)
            if not isinstance(config_json, str):
                self.report_job_error(SubmittedJobInfo(job), msg=(
                    f"the fedhpro executor runs only training runs (rule train) on SLURM; rule {job.rule.name} "
                    "must be a local rule (localrules:) of the workflow. "))
                continue
            log = os.path.abspath(job.log[0]) if job.log else None
            partition = getattr(job.input, "partition", None)
            entry = PackEntry(config_json=config_json, run_dir=os.path.abspath(os.path.dirname(job.output[0])),
                              partition_dir=os.path.abspath(os.path.dirname(partition)) if partition else None,
                              log=log, workflow_config=self.workflow_config_json,
                              wildcards=tuple(sorted((k, str(v)) for k, v in dict(job.wildcards).items())))
            runs.append((job, entry))
        runs = self._reattach(runs)
        with self.submit_lock:
            if self.open_timer is not None:
                self.open_timer.cancel()
            packs = self.options.plan_packs([((job, entry), job.wildcards.get("dataset", ""))
                                             for job, entry in self.open_pack + runs])
            self.open_pack = []
            if packs and self._can_grow(packs[-1]):
                self.open_pack = packs.pop()  # the next hand-over may fill it
            for pack in packs:
                self._submit(pack)
            if self.open_pack:
                self.open_timer = threading.Timer(self.hold_s, self._flush_open_pack)
                self.open_timer.daemon = True
                self.open_timer.start()

    def _can_grow(self, pack: list[tuple[JobExecutorInterface, PackEntry]]) -> bool:
        """A pack of short runs with room for one more run of its kind."""
        if not self.options.pack_minutes:
            return False
        minutes = [self.options.expected_minutes(job.wildcards.get("dataset", "")) for job, _ in pack]
        if any(m is None or m >= self.options.pack_minutes for m in minutes):
            return False
        return sum(minutes) + min(minutes) <= self.options.pack_budget_minutes

    def _flush_open_pack(self) -> None:
        with self.submit_lock:
            pack, self.open_pack, self.open_timer = self.open_pack, [], None
            if pack and not self.interrupted:
                self._submit(pack)

    def _submit(self, pack: list[tuple[JobExecutorInterface, PackEntry]]) -> None:
        entries = [entry for _, entry in pack]
        for entry in entries:
            if entry.log:  # a fresh log per attempt; the job appends the run's output
                os.makedirs(os.path.dirname(entry.log), exist_ok=True)
                with open(entry.log, "w") as fh:
                    fh.write(f"submitted {time.strftime('%Y-%m-%dT%H:%M:%S')} by the fedhpro executor "
                             f"({len(entries)} run(s) in one job)\n")
        first = pack[0][0]
        comment = (f"fedhpro pack of {len(pack)} runs" if len(pack) > 1 else
                   f"fedhpro {first.wildcards.get('method', 'run')}/{first.wildcards.get('variant', '')}")
        try:
            sub = submit_pack(entries, self.options, self.jobs_folder, self.job_name, comment)
        except Exception as err:  # noqa: BLE001 - sbatch refused (partition, account, ...): fail these runs
            reason = " ".join(str(err).split())[-500:]
            for job, _ in pack:
                self.report_job_error(SubmittedJobInfo(job), msg=f"submission failed: {reason}\n")
            return
        job_id = str(sub.job_id)
        folder = str(sub.paths.folder)
        if not isinstance(sub, submitit.SlurmJob):  # e.g. submitit's local executor where srun is missing
            self.submitit_jobs[job_id] = sub
        else:
            self.known_ids.add(job_id)
        for job, entry in pack:
            if entry.log:
                with open(entry.log, "a") as fh:
                    fh.write(f"SLURM job {job_id}; job logs in {folder}\n")
            self.report_job_submission(SubmittedJobInfo(job, external_jobid=job_id, aux={
                "entry": entry, "folder": folder, "pack_size": len(pack), "metrics": os.path.abspath(job.output[0])}))
        self.logger.info(f"submitted {len(pack)} run(s) as job {job_id}")

    def _reattach(self, runs: list[tuple[JobExecutorInterface, PackEntry]]
                  ) -> list[tuple[JobExecutorInterface, PackEntry]]:
        """Runs whose job (same config) is still pending/running after a killed Snakemake are watched, not
        resubmitted; a live job of a changed config is cancelled. Returns the runs left to submit."""
        last = {}
        for job, entry in runs:
            jobs = read_jobs(entry.run_dir)
            if jobs and jobs[-1].get("cluster") == "slurm" and not jobs[-1].get("final_state"):
                last[id(job)] = jobs[-1]
        if not last:
            return runs
        states = query_states([record["job_id"] for record in last.values()])
        to_submit, stale = [], set()
        for job, entry in runs:
            record = last.get(id(job))
            state = states.get(record["job_id"], "") if record else ""
            if state not in ACTIVE_STATES:
                to_submit.append((job, entry))
            elif record.get("config_sha") != config_sha(entry.config_json):
                stale.add(record["job_id"])
                to_submit.append((job, entry))
            else:
                self.logger.info(f"re-attaching {entry.run_dir} to SLURM job {record['job_id']} ({state})")
                self.known_ids.add(str(record["job_id"]))
                self.report_job_submission(SubmittedJobInfo(job, external_jobid=record["job_id"], aux={
                    "entry": entry, "folder": record.get("folder", ""), "pack_size": record.get("pack_size", 1),
                    "metrics": os.path.abspath(job.output[0])}))
        if stale:
            self.logger.info(f"cancelling SLURM jobs of changed run configs: {' '.join(sorted(stale))}")
            subprocess.run(["scancel", *sorted(stale)], check=False, capture_output=True)
        return to_submit

    # ------------------------------------------------------------------ status
    async def check_active_jobs(self, active_jobs: List[SubmittedJobInfo]
                                ) -> AsyncGenerator[SubmittedJobInfo, None]:
        slurm_ids = sorted({info.external_jobid for info in active_jobs if info.external_jobid not in self.submitit_jobs
                            and not os.path.exists(info.aux["metrics"])})
        states: dict[str, str] = {}
        if slurm_ids:
            async with self.status_rate_limiter:
                states = query_states(slurm_ids)  # ONE scheduler call for every job in flight
        for info in active_jobs:
            job_id, aux = info.external_jobid, info.aux
            entry: PackEntry = aux["entry"]
            if os.path.exists(aux["metrics"]):
                state = states.get(job_id, "")
                if is_final(state):
                    self.known_ids.discard(job_id)
                update_job(entry.run_dir, job_id, result="ok", **({"final_state": state} if is_final(state) else {}))
                self.report_job_success(info)
                continue
            if job_id in self.submitit_jobs:
                sub = self.submitit_jobs[job_id]
                state = sub.state.split()[0].upper() if sub.done() else "RUNNING"
                final = sub.done()
            else:
                state = states.get(job_id, "UNKNOWN")
                final = is_final(state)
            if not final:
                aux.pop("final_since", None)
                yield info
                continue
            # the metrics of a finished job may show up late on a shared file system
            since = aux.setdefault("final_since", time.monotonic())
            if state == "COMPLETED" and time.monotonic() - since < self.workflow.execution_settings.latency_wait:
                yield info
                continue
            self.known_ids.discard(job_id)
            update_job(entry.run_dir, job_id, result="failed", final_state=state)
            self.report_job_error(info, msg=failure_report(job_id, state, entry, aux["folder"], aux["pack_size"])
                                  + "\n")

    def cancel_jobs(self, active_jobs: List[SubmittedJobInfo]) -> None:
        """Snakemake interrupted (Ctrl-C): cancel every job this invocation submitted or re-attached (by id), and
        by job name the one whose sbatch the interrupt cut off; one line says so."""
        self.interrupted = True
        with self.submit_lock:
            if self.open_timer is not None:
                self.open_timer.cancel()
            self.open_pack = []
        ids = sorted({info.external_jobid for info in active_jobs if info.external_jobid} | self.known_ids)
        slurm_ids = [job_id for job_id in ids if job_id not in self.submitit_jobs]
        by_name = cancel_jobs(slurm_ids, self.job_name)
        for job_id in ids:
            if job_id in self.submitit_jobs:
                self.submitit_jobs[job_id].cancel(check=False)
        for info in active_jobs:
            update_job(info.aux["entry"].run_dir, info.external_jobid,
                       final_state="CANCELLED (Snakemake interrupted)")
        print(INTERRUPTED_LINE.format(n=len(set(ids) | set(by_name)), name=self.job_name), file=sys.stderr,
              flush=True)
        quiet_final_workflow_error()


def quiet_final_workflow_error() -> None:
    """After an interrupt, Snakemake ends with ``WorkflowError: At least one job did not complete
    successfully.``; the executor has said in one line what happened, so that record is dropped."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "At least one job did not complete successfully" not in str(record.getMessage())

    logging.getLogger("snakemake.logging").addFilter(Drop())
