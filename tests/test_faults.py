"""Fault-injection suite (issue 7): every fault is injected for real, and every one must be survived.

All tests are marked `faults` (`pytest -m faults` runs just these). The long ones, and all kill
cases but four (each method and each fault point once), are also marked `slow`: the default run
leaves them out, CI runs them all. Each injected fault goes into the `fault_ledger`
(tests/faults_report.py), which ends the session with
`fault injection: N faults injected, N survived, 0 runs lost`.

1. SIGKILL of a training run (`python -m fedhpro.cli train --config C --out D --quiet --threads 1`,
   scikit-learn digits, 3 rounds, 4 clients) at the FEDHPRO_FAULT points (fedhpro/faults.py):
   mid-epoch (`batch@k`), mid-server-step (`server@k`), inside the checkpoint write
   (`checkpoint_write@k`: temp file complete, not yet renamed) and inside the Parquet write
   (`metrics_write@1`), for fedavg, fedhpro and fedproto in personalized mode. The k's are drawn
   by `random.Random("issue-7/<method>/<point>")`, one k per equal slice of the possible range, so
   the set is reproducible and independent of which tests are selected. Right after the kill every
   file of the run directory is absent or complete: the checkpoint of the round before the kill
   loads, config.json parses, no metrics.parquet; the only leftover is the temp file of a killed
   atomic write (`.<name>.*.tmp`, a name no reader opens). The same command without the fault
   removes that leftover (train() does so under the run lock), resumes from the checkpoint
   (recorded as `resumes[-1].resumed_from_round` in config.json) and ends with metrics
   bit-identical to an uninterrupted run (every column except time_*).
2. SIGKILL of Snakemake in the middle of a tiny local sweep (its whole process group, as a crashed
   login node or a killed batch allocation would), once one run is finished and another has a
   checkpoint. What a user types afterwards: the plain rerun is refused by Snakemake
   ("LockException ... Directory cannot be locked ... It can be removed with the --unlock
   argument"), so

       snakemake --unlock
       snakemake --cores N            # the same command as before

   `--rerun-incomplete` is not needed: the train rule's only output, metrics.parquet, is written
   atomically at the very end, so a killed job leaves no incomplete output (and profiles/default
   sets `rerun-incomplete: true` anyway). The finished run is not retrained (its metrics.parquet
   keeps its mtime), the other resumes from its checkpoint with the metrics of an uninterrupted
   run, and the tables are built. A second Snakemake started on the same directory while the first
   runs is stopped by Snakemake's lock. Preemption of SLURM jobs (SIGUSR2, requeue, resume) is
   tests/test_slurm_pipeline.py::test_preempted_packed_job_resumes_every_unfinished_run.
3. Downloads over loopback HTTP (tests/httpserver.py) cut off half-way or corrupted: resumed with a
   Range request and verified, or refused by checksum, or reported after the retries (and resumed
   by the next attempt); a file that did not verify is never extracted.
4. A full disk (a small tmpfs mounted by the test; skipped where mounting is not permitted): the
   checkpoint that does not fit ends the run with a one-line ENOSPC error naming the file (exit 2),
   the earlier checkpoint stays loadable, no temp file and no metrics.parquet are left; with space
   freed the same command resumes to identical metrics.
5. Concurrency: a second training process on the same run directory gets the lock error (exit 2)
   and the first finishes with the reference metrics; a second Snakemake is stopped by its lock (2).
6. A tampered or truncated checkpoint is refused with a one-line error (exit 2) and never loaded.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import errno
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import digits_run, numbers
from fedhpro.config import from_dict
from fedhpro.methods import fast_test_params
from fedhpro.runio import (CHECKPOINT, CONFIG, METRICS, METRICS_SCHEMA_VERSION, CheckpointError, RunLockedError,
                           atomic_write, load_checkpoint, read_metrics_meta, run_lock, write_metrics)

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
SEED = "issue-7"
ROUNDS = 3
BASE = digits_run(num_clients=4, seed=1, local_epochs=1, rounds=ROUNDS, device="cpu", checkpoint_every=1)
METHODS = {
    "fedavg": {"method": "fedavg"},
    "fedhpro": {"method": "fedhpro", "method_params": fast_test_params("fedhpro")},
    "fedproto": {"method": "fedproto", "eval_mode": "personalized"},
}
# (method, fault point, number of k's drawn)
PLAN = [("fedavg", "batch", 3), ("fedavg", "server", 1), ("fedavg", "checkpoint_write", 1),
        ("fedavg", "metrics_write", 1),
        ("fedhpro", "batch", 1), ("fedhpro", "server", 1), ("fedhpro", "checkpoint_write", 1),
        ("fedproto", "batch", 1), ("fedproto", "server", 1), ("fedproto", "checkpoint_write", 1),
        ("fedproto", "metrics_write", 1)]
CASES = [(method, point, i) for method, point, n in PLAN for i in range(n)]
TEMP = re.compile(r"^\.(checkpoint\.pt|metrics\.parquet|config\.json)\..+\.tmp$")  # atomic_write's temp files


def config_of(method: str) -> dict:
    return {**BASE, **copy.deepcopy(METHODS[method])}


def write_config(directory: Path, method: str) -> Path:
    path = directory / f"{method}.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_of(method)))
    return path


def cli_env(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FEDHPRO_FAULT"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if fault:
        env["FEDHPRO_FAULT"] = fault
    return env


def cli_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fedhpro.cli", "train", "--config", str(config), "--out", str(out), "--quiet",
            "--threads", "1"]


def cli_train(config: Path, out: Path, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(config, out), cwd=out.parent, env=cli_env(fault), capture_output=True, text=True,
                          timeout=timeout)


def assert_same_metrics(got: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert list(got.columns) == list(ref.columns)
    pd.testing.assert_frame_equal(numbers(got), numbers(ref), check_exact=True)


@dataclass
class DirState:
    """What a reader finds in a run directory: problems, leftover temp files, checkpoint round."""

    problems: list[str] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)
    checkpoint_round: int = 0  # 0: no checkpoint
    has_metrics: bool = False
    resumes: list[dict] = field(default_factory=list)


def inspect_run_dir(run_dir: Path) -> DirState:
    """Every file is either absent or complete: checkpoint loads, Parquet reads, config.json parses."""
    state = DirState()
    for p in sorted(run_dir.iterdir()):
        name = p.name
        if not p.is_file():
            if name not in ("slurm",):
                state.problems.append(f"unexpected non-file {name}")
            continue
        try:
            if name == CHECKPOINT:
                ckpt = load_checkpoint(run_dir)
                state.checkpoint_round = int(ckpt["round"])
                assert len(ckpt["rows"]) == state.checkpoint_round, "checkpoint rows do not match its round"
            elif name == METRICS:
                df = pd.read_parquet(p)
                version, cfg = read_metrics_meta(p)
                assert version == METRICS_SCHEMA_VERSION and cfg and len(df) > 0
                state.has_metrics = True
            elif name == "clients.parquet":  # per-client results: written just before metrics.parquet
                pd.read_parquet(p)
            elif name == CONFIG:
                info = json.loads(p.read_text())
                assert info["config_hash"] and info["config"]
                state.resumes = list(info.get("resumes", []))
            elif name == ".lock":
                pass
            elif TEMP.match(name):
                state.temps.append(name)
            else:
                state.problems.append(f"unexpected file {name}")
        except Exception as err:  # noqa: BLE001 - reported as a problem of that file
            state.problems.append(f"{name}: {type(err).__name__}: {err}")
    return state


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------ the ledger itself
def test_fault_ledger_counts_injected_survived_and_lost():
    from faults_report import FaultLedger

    ledger = FaultLedger()
    with ledger.fault("survived", runs=2) as fault:
        fault.injected()
    with ledger.fault("never fired"):  # not injected: not counted
        pass
    with pytest.raises(AssertionError):
        with ledger.fault("broke a run", runs=3) as fault:
            fault.injected()
            raise AssertionError("metrics differ")
    with pytest.raises(AssertionError):
        with ledger.fault("broke nothing", runs=3) as fault:
            fault.injected()
            fault.lost(0)
            raise AssertionError("message wording")
    assert (ledger.injected, ledger.survived, ledger.runs_lost) == (3, 1, 3)
    assert ledger.summary() == "fault injection: 3 faults injected, 1 survived, 3 runs lost"
    assert ledger.records[1].error == "AssertionError: metrics differ"


# ------------------------------------------------------------------------------ the kill campaign
@functools.lru_cache(maxsize=None)
def batches_per_round(method: str) -> int:
    """Optimiser steps per round (all clients train every round): the range of `batch@k`."""
    from fedhpro.train import build_context

    cfg = from_dict(config_of(method))
    ctx = build_context(cfg)
    steps = 0
    for client in ctx.clients:
        n = client.num_samples
        steps += sum(1 for s in range(0, n, cfg.batch_size) if not (min(cfg.batch_size, n - s) == 1 and n > 1))
    return steps * cfg.local_epochs


def draw_ks(method: str, point: str, n: int) -> list[int]:
    """n k's for `point@k`, one per equal slice of the range, from a generator seeded by name."""
    if point == "metrics_write":
        return [1] * n
    high = {"batch": lambda: ROUNDS * batches_per_round(method), "server": lambda: ROUNDS,
            "checkpoint_write": lambda: ROUNDS - 1}[point]()  # no checkpoint after the last round
    rng = random.Random(f"{SEED}/{method}/{point}")
    edges = [1 + (high * i) // n for i in range(n + 1)]
    return [rng.randint(edges[i], max(edges[i], edges[i + 1] - 1)) for i in range(n)]


def expected_checkpoint(method: str, point: str, k: int) -> int:
    """The round of the checkpoint a kill at `point@k` leaves (0: none yet)."""
    if point == "batch":
        return (k - 1) // batches_per_round(method)
    if point in ("server", "checkpoint_write"):
        return k - 1
    return ROUNDS - 1  # metrics_write: after the last round; the last checkpoint is round ROUNDS - 1


@dataclass
class KillOutcome:
    fault: str
    expected_round: int
    kill: subprocess.CompletedProcess
    after_kill: DirState
    leftover_round: int | None  # round held by a leftover checkpoint temp file (a kill inside the write)
    rerun: subprocess.CompletedProcess | None = None
    after_rerun: DirState | None = None
    metrics: pd.DataFrame | None = None


def run_case(root: Path, configs: dict[str, Path], case: tuple[str, str, int]) -> KillOutcome:
    method, point, i = case
    k = draw_ks(method, point, [n for m, p, n in PLAN if (m, p) == (method, point)][0])[i]
    fault = f"{point}@{k}"
    run_dir = root / f"{method}-{point}-{i}" / "run"
    run_dir.parent.mkdir(parents=True)
    kill = cli_train(configs[method], run_dir, fault=fault)
    after_kill = inspect_run_dir(run_dir) if run_dir.exists() else DirState(problems=["no run directory"])
    leftover_round = None
    for name in after_kill.temps:
        if name.startswith(f".{CHECKPOINT}."):  # the killed write's temp file: complete, never renamed
            probe = run_dir.parent / "probe"
            probe.mkdir(exist_ok=True)
            shutil.copy2(run_dir / name, probe / CHECKPOINT)
            leftover_round = int(load_checkpoint(probe)["round"])
    outcome = KillOutcome(fault, expected_checkpoint(method, point, k), kill, after_kill, leftover_round)
    if kill.returncode != -signal.SIGKILL:
        return outcome
    outcome.rerun = cli_train(configs[method], run_dir)
    outcome.after_rerun = inspect_run_dir(run_dir)
    if outcome.rerun.returncode == 0:
        outcome.metrics = pd.read_parquet(run_dir / METRICS)
    return outcome


@pytest.fixture(scope="module")
def pool():
    """Two worker threads for the training subprocesses (the CI machine has 2 cores)."""
    executor = cf.ThreadPoolExecutor(max_workers=2)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)  # an interrupted session does not start more runs


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def configs(campaign_dir) -> dict[str, Path]:
    return {method: write_config(campaign_dir / "configs", method) for method in METHODS}


class References:
    """Uninterrupted runs, one per method, trained on first demand in this process with one thread (the numbers
    of `fedhpro train --threads 1`, as tests/test_clientstore.py's reference; no interpreter start-up each),
    in the calling thread: only the tests' thread trains in-process, the pool only waits on subprocesses."""

    def __init__(self, root: Path, configs: dict[str, Path]) -> None:
        self.root, self.configs = root, configs
        self.done: dict[str, Path] = {}

    def run_dir(self, method: str) -> Path:
        if method not in self.done:
            from fedhpro.train import train

            out = self.root / method
            out.parent.mkdir(parents=True, exist_ok=True)
            train(from_dict(yaml.safe_load(self.configs[method].read_text())), out, threads=1, progress=False)
            self.done[method] = out
        return self.done[method]

    def metrics(self, method: str) -> pd.DataFrame:
        return pd.read_parquet(self.run_dir(method) / METRICS)


@pytest.fixture(scope="module")
def references(campaign_dir, configs) -> References:
    return References(campaign_dir / "reference", configs)


@pytest.fixture(scope="module", autouse=True)
def kill_campaign(request, pool, campaign_dir, configs, references) -> dict[tuple, cf.Future]:
    """The selected kill cases, started with the module and run two at a time in the background
    while the other tests of the module run; each kill test waits for its own case."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_sigkill_training_then_rerun"
                and item.module is request.module]
    cases = {case: pool.submit(run_case, campaign_dir / "kills", configs, case) for case in selected}
    for method in dict.fromkeys(method for method, _, _ in selected):  # while the pool runs the kill cases
        references.run_dir(method)
    return cases


# ------------------------------------------------------------------------------ Snakemake
SWEEP = {
    "defaults": {"rounds": 4, "num_clients": 4, "batch_size": 32, "lr": 0.05, "device": "cpu",
                 "checkpoint_every": 1},
    "datasets": {"digits": {}},
    "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
    "methods": {"fedavg": {"default": {}}, "fedprox": {"default": {"mu": 0.01}}},
    "seeds": [0],
    "threads": 1,
}


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"snakemake ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _wait_unlocked(run_dir: Path, timeout: float = 60) -> None:
    """Wait until no process holds the run lock (a SIGKILLed process takes a moment to be torn down)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with run_lock(run_dir):
                return
        except RunLockedError:
            assert time.monotonic() < deadline, f"{run_dir} is still locked {timeout}s after the kill"
            time.sleep(0.1)


@pytest.mark.slow
def test_snakemake_killed_mid_sweep_resumes_and_a_second_pipeline_is_locked_out(tmp_path, fault_ledger):
    from test_pipeline import copy_workflow, smk, snakemake_cmd

    from fedhpro.train import train

    wf = copy_workflow(tmp_path, SWEEP)
    runs = wf / "results" / "runs"
    log = open(tmp_path / "first.log", "w")

    def progress() -> tuple[list[Path], list[Path]]:
        finished = [p.parent for p in runs.glob("**/" + METRICS)]
        partial = [p.parent for p in runs.glob("**/" + CHECKPOINT) if not (p.parent / METRICS).exists()]
        return finished, partial

    first = subprocess.Popen(snakemake_cmd("--cores", "1"), cwd=wf, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # its own process group: the jobs die with it
    try:
        _wait_for(lambda: any(runs.glob("**/" + CONFIG)) and any((wf / ".snakemake" / "locks").glob("*")), first,
                  "the first training job")
        os.killpg(first.pid, signal.SIGSTOP)  # the first pipeline (and its job) holds its lock meanwhile
        try:
            with fault_ledger.fault("second snakemake on the same directory", runs=2) as fault:
                second = smk(wf, "--cores", "1", timeout=600)
                assert first.poll() is None, "the first pipeline ended before the second one could be checked"
                fault.injected()
                text = second.stdout + second.stderr
                assert second.returncode != 0 and "LockException" in text, text[-3000:]
                assert "Directory cannot be locked" in text, text[-3000:]
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        _wait_for(lambda: all(progress()), first, "one finished run and one checkpointed run")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
        log.close()
    with fault_ledger.fault("SIGKILL snakemake mid-sweep", runs=2) as fault:
        assert first.returncode == -signal.SIGKILL
        fault.injected()
        finished, partial = progress()
        assert finished and partial, f"the sweep finished before the kill: {finished} {partial}"
        mtimes = {p: (p / METRICS).stat().st_mtime_ns for p in finished}
        rounds = {}
        for p in partial:
            _wait_unlocked(p)  # the killed job is gone, no orphan goes on writing the run
            state = inspect_run_dir(p)
            assert state.problems == [] and not state.has_metrics, state
            rounds[p] = state.checkpoint_round
            assert rounds[p] > 0
        # what a user types: the same command again. The killed Snakemake's lock is removed (its process is
        # gone; one line says so), no `snakemake --unlock` first
        assert list((wf / ".snakemake" / "locks").glob("*.lock"))
        proc = smk(wf, "--cores", "1", timeout=900)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-3000:]
        assert re.search(r"^removed the lock left by Snakemake pid \d+, which is no longer running", text, re.M), \
            text[:3000]
        assert "Directory cannot be locked" not in text
        for p, mtime in mtimes.items():
            assert (p / METRICS).stat().st_mtime_ns == mtime, f"{p} was retrained"
        for p, r in rounds.items():
            state = inspect_run_dir(p)
            assert state.problems == [] and state.temps == [] and state.has_metrics, state
            assert [x["resumed_from_round"] for x in state.resumes] == [r], state.resumes
        for name in ("main", "ablation", "communication"):
            for ext in ("md", "tex", "csv"):
                assert (wf / "results" / "tables" / "main" / f"{name}.{ext}").stat().st_size > 0
        # the resumed run has the numbers of an uninterrupted one
        for p in partial:
            cfg = from_dict(json.loads((p / CONFIG).read_text())["config"])
            dataset, het = p.relative_to(runs).parts[:2]
            ref = train(cfg, tmp_path / "reference" / p.name, threads=1,
                        partition_dir=wf / "results" / "partitions" / dataset / het / f"ps{cfg.partition_seed}")
            assert_same_metrics(pd.read_parquet(p / METRICS), ref)


# ------------------------------------------------------------------------------ tampered checkpoints
@pytest.mark.slow
def test_tampered_or_truncated_checkpoint_is_refused_and_never_loaded(tmp_path, configs, fault_ledger,
                                                                      monkeypatch):
    base = tmp_path / "base"
    with fault_ledger.fault("SIGKILL fedavg at round_end@1") as fault:
        proc = cli_train(configs["fedavg"], base, fault="round_end@1")
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        fault.injected()
        state = inspect_run_dir(base)
        assert state.problems == [] and state.checkpoint_round == 1 and not state.has_metrics, state
    good = (base / CHECKPOINT).read_bytes()
    variants = {
        "tampered": good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0x01]) + good[len(good) // 2 + 1:],
        "truncated": good[:len(good) // 2],
        "truncated_header": good[:30],  # checked in-process only (below)
    }
    procs = {}
    for name, data in variants.items():
        shutil.copytree(base, tmp_path / name)
        (tmp_path / name / CHECKPOINT).write_bytes(data)
    for name in ("tampered", "truncated"):
        procs[name] = subprocess.Popen(cli_cmd(configs["fedavg"], tmp_path / name), cwd=tmp_path, env=cli_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        with fault_ledger.fault(f"{name} checkpoint") as fault:
            _, stderr = proc.communicate(timeout=600)
            fault.injected()
            assert proc.returncode == 2, stderr[-3000:]
            line = one_line_error(stderr)
            assert line.startswith(f"error: checkpoint {tmp_path / name / CHECKPOINT}")
            assert "corrupt or tampered" in line, line
            assert (tmp_path / name / CHECKPOINT).read_bytes() == variants[name]  # left for the user to inspect
            assert not (tmp_path / name / METRICS).exists()
    # never loaded: torch.load is not even called for a file whose hash does not match (patched where runio
    # reads it: its lazily bound torch, fedhpro.lazy)
    from fedhpro import runio

    calls = []
    real_load = runio.torch.load
    monkeypatch.setattr(runio.torch, "load", lambda *a, **kw: calls.append(1) or real_load(*a, **kw))
    for name in variants:
        with pytest.raises(CheckpointError, match="truncated" if name == "truncated_header" else "tampered"):
            load_checkpoint(tmp_path / name)
    assert calls == []
    assert load_checkpoint(base)["round"] == 1 and calls == [1]  # control: the intact one is loaded


# ------------------------------------------------------------------------------ concurrency
@pytest.mark.slow
def test_second_training_process_on_the_same_run_dir_is_locked_out(tmp_path, configs, references,
                                                                   fault_ledger):
    run = tmp_path / "run"
    stopped = False
    first = subprocess.Popen(cli_cmd(configs["fedavg"], run), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / CONFIG).exists():  # written under the run lock
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first process never started its run"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock while the second one tries
        stopped = True
        assert first.poll() is None
        config_before = (run / CONFIG).read_bytes()
        with fault_ledger.fault("second training process on one run dir") as fault:
            second = cli_train(configs["fedavg"], run)
            fault.injected()
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            line = one_line_error(second.stderr)
            assert line == (f"error: run directory {run} is in use by another process; "
                            "wait for it to finish or stop it first")
            assert (run / CONFIG).read_bytes() == config_before  # the second touched nothing
            os.kill(first.pid, signal.SIGCONT)
            stopped = False
            _, err = first.communicate(timeout=600)
            assert first.returncode == 0, err[-3000:]
            state = inspect_run_dir(run)
            assert state.problems == [] and state.temps == [] and state.has_metrics, state
            assert_same_metrics(pd.read_parquet(run / METRICS), references.metrics("fedavg"))
    finally:
        if first.poll() is None:
            if stopped:
                os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()


# ------------------------------------------------------------------------------ full disk
class Tmpfs:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    def mount(self, size: int) -> None:
        size = -(-size // 4096) * 4096
        if self.mounted:
            cmd = ["mount", "-o", f"remount,size={size}", str(self.path)]
        else:
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            if not self.mounted:
                pytest.skip(f"full-disk test needs a small tmpfs, but mounting is not permitted here: "
                            f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
            raise AssertionError(proc.stderr)
        self.mounted = True


@pytest.fixture
def tmpfs(tmp_path):
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("full-disk test needs root and `mount` to mount a small tmpfs")
    disk = Tmpfs(tmp_path / "disk")
    disk.path.mkdir()
    try:
        yield disk
    finally:
        if disk.mounted:
            subprocess.run(["umount", "-l", str(disk.path)], capture_output=True)


def test_atomic_writer_on_a_full_disk_keeps_the_old_file_and_no_temp(tmpfs, fault_ledger):
    tmpfs.mount(64 * 1024)
    target = tmpfs.path / "blob.bin"
    atomic_write(target, b"old" * 1000)
    with fault_ledger.fault("ENOSPC in atomic_write") as fault:
        with pytest.raises(OSError) as err:
            atomic_write(target, os.urandom(256 * 1024))
        fault.injected()
        assert err.value.errno == errno.ENOSPC
        assert str(target) in str(err.value) and "No space left on device" in str(err.value)
        assert target.read_bytes() == b"old" * 1000
        assert sorted(p.name for p in tmpfs.path.iterdir()) == ["blob.bin"]
    # the Parquet write: no partial metrics.parquet, no temp file
    rows = [{"round": r, "test_acc": random.random(), "run_id": os.urandom(16).hex()} for r in range(20000)]
    with fault_ledger.fault("ENOSPC in write_metrics") as fault:
        with pytest.raises(OSError) as err:
            write_metrics(tmpfs.path / METRICS, rows, {"method": "fedavg"})
        fault.injected()
        assert err.value.errno == errno.ENOSPC and METRICS in str(err.value)
        assert sorted(p.name for p in tmpfs.path.iterdir()) == ["blob.bin"]


@pytest.mark.slow
def test_full_disk_during_checkpoint_write_then_resume(tmpfs, configs, references, fault_ledger):
    ref_dir = references.run_dir("fedavg")
    size = (ref_dir / CHECKPOINT).stat().st_size
    tmpfs.mount(size * 3 // 2 + 64 * 1024)  # room for one checkpoint, not for a second one beside it
    run = tmpfs.path / "run"
    with fault_ledger.fault("full disk during the checkpoint write") as fault:
        proc = cli_train(configs["fedavg"], run)
        fault.injected()
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        line = one_line_error(proc.stderr)
        assert "No space left on device" in line and str(run / CHECKPOINT) in line, line
        state = inspect_run_dir(run)
        assert state.problems == [], state.problems
        assert state.temps == [], "the atomic writer left its temp file on ENOSPC"
        assert state.checkpoint_round == 1 and not state.has_metrics
        tmpfs.mount(size * 4 + 256 * 1024)  # space freed
        again = cli_train(configs["fedavg"], run)
        assert again.returncode == 0, again.stderr[-3000:]
        state = inspect_run_dir(run)
        assert state.problems == [] and state.temps == [] and state.has_metrics
        assert [r["resumed_from_round"] for r in state.resumes] == [1]
        assert_same_metrics(pd.read_parquet(run / METRICS), pd.read_parquet(ref_dir / METRICS))


# ------------------------------------------------------------------------------ downloads
def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_cut_off_or_corrupted_is_never_extracted(tmp_path, fault_ledger, server):
    from fedhpro.download import ChecksumError, DownloadError, RemoteFile, is_complete, prepare, safe_extract

    members = {f"toy/part{i}.bin": random.Random(i).randbytes(60_000) for i in range(4)}
    archive = _tar_gz(members)
    remote = RemoteFile("http://127.0.0.1:9/unreachable/toy.tar.gz", "toy.tar.gz",
                        md5=hashlib.md5(archive).hexdigest())

    def download_and_extract(root: Path, base_url: str) -> Path:
        """What a dataset step does: fetch (verified) first, extract only what verified."""
        raw = prepare([remote], root, "toy", mirror={"*": base_url}, retries=2, backoff=0)
        safe_extract(raw / remote.filename, root / "toy" / "extracted")
        return root / "toy" / "extracted"

    def nothing_extracted(root: Path) -> None:
        raw = root / "toy" / "raw"
        assert not (raw / remote.filename).exists()
        assert not (root / "toy" / "extracted").exists()
        assert not any(p.name.startswith(".tmp-") for p in (root / "toy").iterdir())

    srv = server  # tests/conftest.py
    # cut off half-way once: resumed with a Range request, verified, then extracted
    srv.add("/a/toy.tar.gz", archive, plan=["truncate"])
    with fault_ledger.fault("download cut off half-way") as fault:
        out = download_and_extract(tmp_path / "a", srv.url("/a/"))
        seen = srv.requests_for("/a/toy.tar.gz")
        assert [r.mode for r in seen] == ["truncate", "ok"]
        fault.injected()
        assert seen[1].headers["Range"] == f"bytes={len(archive) // 2}-"
        assert is_complete(out) and all((out / n).read_bytes() == d for n, d in members.items())

    # corrupted in transit (one flipped byte, same length): refused by the checksum, not extracted
    bad = bytearray(archive)
    bad[len(bad) // 3] ^= 0x40
    srv.add("/b/toy.tar.gz", bytes(bad))
    with fault_ledger.fault("download corrupted") as fault:
        with pytest.raises(ChecksumError) as err:
            download_and_extract(tmp_path / "b", srv.url("/b/"))
        fault.injected()
        assert remote.md5 in str(err.value) and remote.filename in str(err.value)
        nothing_extracted(tmp_path / "b")
        assert not (tmp_path / "b" / "toy" / "raw" / (remote.filename + ".part")).exists()

    # cut off on every attempt: reported after the retries, not extracted; the next attempt resumes
    srv.add("/c/toy.tar.gz", archive, default="truncate")
    with fault_ledger.fault("download cut off on every attempt") as fault:
        with pytest.raises(DownloadError, match="after 3 attempts"):
            download_and_extract(tmp_path / "c", srv.url("/c/"))
        fault.injected()
        nothing_extracted(tmp_path / "c")
        srv.add("/c/toy.tar.gz", archive)  # the network is back
        out = download_and_extract(tmp_path / "c", srv.url("/c/"))
        assert "Range" in srv.requests_for("/c/toy.tar.gz")[-1].headers
        assert is_complete(out) and all((out / n).read_bytes() == d for n, d in members.items())


# ------------------------------------------------------------------------------ SIGKILL of training runs
# (last in the file: the cases run in the background from the start of the module, these tests collect them)
# Four kills (each method and each fault point once) stay in the default suite; the others are `slow`.
QUICK_CASES = {("fedavg", "batch", 0), ("fedavg", "metrics_write", 0), ("fedhpro", "server", 0),
               ("fedproto", "checkpoint_write", 0)}


@pytest.mark.parametrize("case", [c if c in QUICK_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
                         ids=[f"{m}-{p}-{i}" for m, p, i in CASES])
def test_sigkill_training_then_rerun(case, kill_campaign, references, fault_ledger):
    method, point, _ = case
    out = kill_campaign[case].result(timeout=1800)
    with fault_ledger.fault(f"SIGKILL {method} at {out.fault}", runs=1) as fault:
        assert out.kill.returncode == -signal.SIGKILL, (
            f"{out.fault} did not kill the run (exit {out.kill.returncode}): {out.kill.stderr[-2000:]}")
        fault.injected()
        # right after the kill: nothing torn, nothing that looks complete but is not
        state = out.after_kill
        assert state.problems == [], state.problems
        assert not state.has_metrics, "a killed run left a metrics.parquet"
        assert state.checkpoint_round == out.expected_round, (state.checkpoint_round, out.expected_round)
        if point == "checkpoint_write":
            assert len(state.temps) == 1 and state.temps[0].startswith(f".{CHECKPOINT}."), state.temps
            assert out.leftover_round == out.expected_round + 1  # killed between fsync and rename
        elif point == "metrics_write":
            assert len(state.temps) == 1 and state.temps[0].startswith(f".{METRICS}."), state.temps
        else:
            assert state.temps == []
        # the same command again: resumes, cleans the leftover, ends bit-identical
        assert out.rerun.returncode == 0, out.rerun.stdout[-2000:] + out.rerun.stderr[-3000:]
        after = out.after_rerun
        assert after.problems == [] and after.temps == [] and after.has_metrics, after
        if out.expected_round:
            assert [r["resumed_from_round"] for r in after.resumes] == [out.expected_round], after.resumes
        else:
            assert after.resumes == []  # nothing to resume from: started over
        assert_same_metrics(out.metrics, references.metrics(method))
