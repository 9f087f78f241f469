"""Train one federated run from a `RunConfig` into a run directory, resumably.

Run directory:
- `config.json`: the resolved config, its hash, the first attempt's git SHA, package versions, host and SLURM
  ids, the torch thread count and the data's content fingerprint; `attempts` gets one record per attempt
  (git SHA, host, versions, threads, start/end, outcome, SLURM ids, resumed_from_round, the execution keys it
  ran with: `fedhpro.config.EXECUTION_KEYS`, which are not part of the run's hash) and `resumes` one
  per resume from a checkpoint (`resumed_from_round`, time, SLURM ids);
- `checkpoint.pt` (SHA-256 header over its payload): every `checkpoint_every` rounds, the engine state (models,
  method state, client states, sampler RNG, torch RNG) and the metrics so far;
- `client_states/` (`client_store: disk` only): one file per client state, the checkpoint names which
  (`fedhpro.clientstore`);
- `clients.parquet`: per evaluated round and client, accuracy, correct count and local test size
  (`fedhpro.runio.CLIENT_COLUMNS`; zero rows when no client holds a local test split), written atomically
  just before metrics.parquet with the same identity metadata, its rows so far kept in the checkpoint;
- `metrics.parquet`: written once, atomically, when the run ends (finished or diverged), so its
  existence means the run is complete; its metadata holds the config hash, threads and data fingerprint,
  checked against config.json whenever the run is called again.

Calling `train` again on the same directory resumes from the checkpoint (bit-identical numbers on
CPU), returns at once if the run is already complete, and refuses a directory that holds a
different run (another config hash), so nothing computed is ever overwritten. Execution keys may differ
between calls: a finished run is returned as computed, a resume uses the new values (docs/run-identity.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedhpro.clientstore import CLIENT_STATES_DIR
from fedhpro.config import ConfigError, RunConfig, check_runnable
from fedhpro.data import DATASETS, ArrayData, fingerprint, load_dataset
from fedhpro.diagnostics import DIAGNOSTIC_COLUMNS
from fedhpro.faults import fault_point
from fedhpro.engine import ClientData, Context, Diverged, Engine, RoundResult, check_compile, check_precision
from fedhpro.methods import METHODS, make_params
from fedhpro.models import build_model
from fedhpro.runio import (CHECKPOINT, CLIENTS, CONFIG, METRICS, atomic_write_text, attempt_info,
                           check_metrics_belong, client_rows_of, load_checkpoint, read_json_file, read_run_info,
                           remove_stale_temps, run_info, run_lock, save_checkpoint, write_client_results,
                           write_metrics)

ID_COLUMNS = ("run_id", "method", "variant", "eval_mode", "dataset", "partition", "alpha", "classes_per_client",
              "imbalance_ratio", "num_clients", "partition_seed", "seed", "model")

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("config key 'device': 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def run_partition_identity(cfg: RunConfig, data_fingerprint: str) -> dict:
    """The partition identity (`fedhpro.partition.IDENTITY_KEYS`) a run with this config needs."""
    from fedhpro.partition import identity_of

    return identity_of(cfg, data_fingerprint)


def check_long_tail(cfg: RunConfig, labels: np.ndarray) -> None:
    """Refuse an imbalance ratio whose long-tail selection leaves a class of the data with no sample."""
    from fedhpro.partition import long_tail_counts

    if cfg.imbalance_ratio <= 1 or cfg.partition == "domains" or labels.size == 0:  # domains: no long tail
        return
    sizes = np.bincount(labels)
    kept = long_tail_counts(sizes.tolist(), cfg.imbalance_ratio)
    emptied = [c for c, (n, k) in enumerate(zip(sizes, kept)) if n > 0 and k == 0]
    if emptied:
        raise ConfigError(f"config key 'imbalance_ratio' ({cfg.imbalance_ratio:g}) leaves class(es) "
                          f"{', '.join(map(str, emptied))} of dataset {cfg.dataset!r} with no training sample "
                          f"({len(labels)} samples, {len(sizes)} classes); use a smaller imbalance_ratio")


def client_partition(cfg: RunConfig, labels: np.ndarray, partition_dir: Path | None,
                     domains: np.ndarray | None = None, data_fingerprint: str | None = None) -> list[np.ndarray]:
    """Each client's training indices: from a saved partition (checked to be this run's: every key that
    determines the split and the data's fingerprint must match) or computed from the config."""
    from fedhpro import partition

    if partition_dir is not None:
        partition_dir = Path(partition_dir)
        meta_path = partition_dir / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"partition {partition_dir} has no meta.json (not a saved partition); make it with "
                              "`fedhpro partition ... --out DIR`")
        meta = read_json_file(meta_path, "partition record")
        if data_fingerprint is None:
            raise ValueError("a saved partition is checked against the data's fingerprint; pass data_fingerprint")
        try:
            partition.check_identity(partition_dir, meta, run_partition_identity(cfg, data_fingerprint))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return partition.load_partition(partition_dir, num_samples=len(labels))
    check_long_tail(cfg, labels)
    return partition.split_for(cfg, labels, domains)  # the scheme's declared split (fedhpro.partition.SCHEMES)


def build_context(cfg: RunConfig, partition_dir: Path | None = None, data: ArrayData | None = None,
                  data_fingerprint: str | None = None) -> Context:
    check_runnable(cfg)  # a RunConfig built without `from_dict` (dataclasses.replace) is asked here too
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    check_compile(cfg.compile, device)
    spec = DATASETS[cfg.dataset]
    data = data or load_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    if partition_dir is not None and data_fingerprint is None:
        data_fingerprint = fingerprint(data)
    labels = data.train_y.numpy()
    domains = data.train_domain.numpy() if data.train_domain is not None else None
    parts = client_partition(cfg, labels, partition_dir, domains, data_fingerprint)
    if len(parts) != cfg.num_clients:
        raise ConfigError(f"partition has {len(parts)} clients, config key 'num_clients' says {cfg.num_clients}")
    clients = []
    frac = cfg.effective_local_test_fraction
    # a scheme's own local test sets (nway: FedProto's, drawn from the test split), else held out of the client's data
    from fedhpro.partition import SCHEMES

    local_tests = SCHEMES[cfg.partition].local_tests
    scheme_tests = local_tests(cfg, data.test_y.numpy(), data.num_classes) if local_tests else None
    for cid, idx in enumerate(parts):
        idx = np.asarray(idx, dtype=np.int64)
        test_idx = idx[:0]
        if frac > 0 and len(idx) > 1:
            perm = np.random.default_rng([cfg.partition_seed, cid]).permutation(idx)
            n_test = max(1, int(round(frac * len(idx))))
            idx, test_idx = np.sort(perm[n_test:]), np.sort(perm[:n_test])
        if len(idx) == 0:
            raise ConfigError(f"client {cid} received no training samples; lower 'num_clients' or change the partition")
        t_idx, e_idx = torch.from_numpy(idx), torch.from_numpy(test_idx)
        y = data.train_y[t_idx]
        test_x, test_y = data.train_x[e_idx], data.train_y[e_idx]
        if scheme_tests is not None:
            e_idx = torch.from_numpy(scheme_tests[cid])
            test_x, test_y = data.test_x[e_idx], data.test_y[e_idx]
        clients.append(ClientData(
            cid=cid, x=data.train_x[t_idx].to(device), y=y.to(device), test_x=test_x.to(device),
            test_y=test_y.to(device), class_counts=torch.bincount(y, minlength=data.num_classes),
            domain=int(data.train_domain[t_idx[0]]) if data.train_domain is not None else None))
    model_name = spec.default_model if cfg.model == "auto" else cfg.model
    names = list(cfg.client_models) or [model_name]
    model_names = [names[cid % len(names)] for cid in range(cfg.num_clients)]
    in_channels = int(data.train_x.shape[1]) if data.train_x.dim() == 4 else 0
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1) if data.mean is not None else None
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1) if data.std is not None else None
    feature_dim = cfg.feature_dim
    if feature_dim is None and len(set(model_names)) > 1:
        feature_dim = 512  # heterogeneous backbones are projected to one shared d (HtFLlib uses 512)
    factory = lambda name: build_model(name, num_classes=data.num_classes, in_channels=in_channels,  # noqa: E731
                                       feature_dim=feature_dim, **data.model_kwargs)
    augment = spec.default_augment if cfg.augment == "auto" else cfg.augment
    ctx = Context(cfg=cfg, params=make_params(cfg.method, cfg.method_params), device=device,
                  num_classes=data.num_classes, in_channels=in_channels, mean=mean, std=std, augment=augment,
                  clients=clients, test_x=data.test_x.to(device), test_y=data.test_y.to(device),
                  model_names=model_names, test_domain=data.test_domain.to(device) if data.test_domain is not None
                  else None, domain_names=data.domain_names, _model_factory=factory)
    ctx.feature_dim = factory(model_names[0]).feature_dim
    ctx.install_model_wrapper(METHODS[cfg.method])  # the method's model hook (MOON's head, GFPL's dual classifier)
    return ctx


def weight_aggregation(cfg: RunConfig) -> str:
    """How the shared weights were formed: what the method declares (`Method.weight_aggregation`, for a method
    with a choice of it: FedHPro's last_client, fedavg, last_client_head, fedavg_head, retrained_head), else
    fedavg in global mode and none in personalized mode (none shared)."""
    declared = METHODS[cfg.method].weight_aggregation
    label = declared(cfg) if declared is not None else None
    if label is not None:
        return label
    return "fedavg" if cfg.eval_mode == "global" else "none"


def result_row(cfg: RunConfig, res: RoundResult, status: str, domain_names: tuple[str, ...] = ()) -> dict:
    model = cfg.model if not cfg.client_models else "+".join(cfg.client_models)
    row = {"run_id": cfg.config_hash(), "method": cfg.method, "variant": cfg.variant, "eval_mode": cfg.eval_mode,
           "dataset": cfg.dataset, "partition": cfg.partition,
           "alpha": float("nan") if cfg.alpha is None else cfg.alpha,
           # partition 'nway': FedProto's n (mean classes per client) is this column, so its tables tell n apart
           "classes_per_client": cfg.ways if cfg.partition == "nway" else
           -1 if cfg.classes_per_client is None else cfg.classes_per_client,
           "imbalance_ratio": cfg.imbalance_ratio, "num_clients": cfg.num_clients,
           "partition_seed": cfg.partition_seed, "seed": cfg.seed, "model": model,
           "aggregation": weight_aggregation(cfg), "round": res.round, "status": status, "train_loss": res.train_loss,
           "test_acc": res.test_acc,
           "test_loss": res.test_loss, "client_acc_mean": res.client_acc_mean, "client_acc_std": res.client_acc_std,
           "client_acc_weighted": res.client_acc_weighted,
           **{column: getattr(res, column) for column in DIAGNOSTIC_COLUMNS},
           "bytes_up": int(res.bytes_up), "bytes_down": int(res.bytes_down), "time_local": res.time_local,
           "time_server": res.time_server, "time_eval": res.time_eval, "time_io": 0.0}
    for key, acc in res.domain_acc.items():
        name = domain_names[int(key)] if domain_names else key
        row[f"domain_acc_{name}"] = acc
    return row


def stale_revision(stored: dict, cfg: RunConfig, out_dir: Path) -> None:
    """Raise a ConfigError saying why, when `out_dir` holds this config computed by an earlier behaviour
    revision of its method (records without a revision predate revisions: revision 0)."""
    from fedhpro.config import EXECUTION_KEYS, REVISION_KEY, check_revision

    def identity(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in (REVISION_KEY,) + EXECUTION_KEYS}

    same = identity(stored) == identity(cfg.to_dict())
    if same and isinstance(stored.get("method"), str):
        check_revision(cfg.method, stored.get(REVISION_KEY, 0), where=f"run directory {out_dir}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def execution_of(config: dict) -> dict:
    """The execution keys (`fedhpro.config.EXECUTION_KEYS`) of a recorded config: how the run was executed."""
    from fedhpro.config import EXECUTION_KEYS

    return {k: config[k] for k in EXECUTION_KEYS if k in config}


def note_other_execution(cfg: RunConfig, info: dict, out_dir: Path) -> None:
    """A finished run asked for again with other execution keys: it is returned as computed (they change no
    number), and config.json keeps the values it was computed with; say so where the difference shows in the
    results (diagnostics that were not computed)."""
    recorded = execution_of(info.get("config") or {})
    changed = {k: v for k, v in execution_of(cfg.to_dict()).items() if k in recorded and recorded[k] != v}
    if not changed:
        return
    what = ", ".join(f"{k}: {recorded[k]!r} (asked: {v!r})" for k, v in changed.items())
    log.info("run %s finished with %s; these change no number, so it is not rerun", out_dir, what)
    if changed.get("diagnostics") or ("diagnostics_every" in changed and recorded.get("diagnostics", True)):
        log.warning("run %s: its prototype diagnostics were computed with %s, not as asked; the tables say "
                    "'not computed' where they are missing (delete the run directory to compute them)", out_dir, what)


def open_run_record(cfg: RunConfig, out_dir: Path, info: dict | None, *, threads: int, data_fingerprint: str,
                    resume_round: int | None) -> dict:
    """config.json for this attempt: the original record kept, one `attempts` entry appended.

    A new run gets the resolved config, its hash, the first attempt's provenance (git SHA, versions, host,
    SLURM ids) at top level, `threads` and `data_fingerprint`. Every attempt (first, resume, restart) appends
    {git_sha, host, versions, threads, started, ended, outcome, slurm ids, resumed_from_round}; a resume
    also appends to `resumes`. Refused (ConfigError): a resume under another thread count or other data.
    """
    attempt = attempt_info(threads, resumed_from_round=resume_round, data_fingerprint=data_fingerprint,
                           execution=execution_of(cfg.to_dict()))
    if info is not None:  # the execution keys may differ between attempts (not hashed): the latest ones
        info["config"] = {**(info.get("config") or {}), **attempt["execution"]}  # wrote the results
    if info is None:
        info = run_info(cfg.provenance_dict(), cfg.config_hash())
        info.update(started=attempt["started"], threads=threads, data_fingerprint=data_fingerprint, attempts=[],
                    resumes=[])
    elif resume_round is not None:
        recorded = info.get("threads")
        if recorded is not None and recorded != threads:
            raise ConfigError(f"run directory {out_dir} was trained with {recorded} thread(s) and would resume "
                              f"with {threads}; CPU results are bit-identical only for one thread count: resume "
                              f"with --threads {recorded} (or delete {out_dir / CHECKPOINT} to start over)")
        recorded = info.get("data_fingerprint")
        if recorded is not None and recorded != data_fingerprint:
            raise ConfigError(f"run directory {out_dir} was trained on other data (fingerprint {recorded}, the data "
                              f"now loaded has {data_fingerprint}); restore that data, or delete "
                              f"{out_dir / CHECKPOINT} to start over on this data")
    else:  # a restart from scratch (no checkpoint yet): this attempt's settings are the run's
        info.update(threads=threads, data_fingerprint=data_fingerprint)
    info.setdefault("attempts", []).append(attempt)
    if resume_round is not None:
        info.setdefault("resumes", []).append({
            "resumed_from_round": resume_round, "at": attempt["started"], "slurm_job_id": attempt["slurm_job_id"],
            "slurm_restart_count": attempt["slurm_restart_count"]})
    atomic_write_text(out_dir / CONFIG, json.dumps(info, indent=2, sort_keys=True, default=str))
    return info


SUPERSEDED_DIR = "superseded"  # checkpoints of earlier data, kept: <run dir>/superseded/<fingerprint>/


def set_aside_for_other_data(out_dir: Path, info: dict, data_fingerprint: str) -> Path:
    """Move the checkpoint (and the client states it names) of a run trained on other data into
    `out_dir/superseded/<that data's fingerprint>/`, and record it in `info["superseded"]`; the run then starts
    over on `data_fingerprint`. Nothing is deleted: the earlier data's state stays readable there."""
    old = str(info.get("data_fingerprint"))
    target = out_dir / SUPERSEDED_DIR / old.replace("sha256:", "")[:16]
    target.mkdir(parents=True, exist_ok=True)
    for name in (CHECKPOINT, CHECKPOINT + ".sha256", CLIENT_STATES_DIR):
        if (out_dir / name).exists():
            if (target / name).is_dir():
                shutil.rmtree(target / name)
            os.replace(out_dir / name, target / name)
    info.setdefault("superseded", []).append({"at": _now(), "data_fingerprint": old, "now": data_fingerprint,
                                              "moved_to": str(target.relative_to(out_dir))})
    log.warning("run %s: the data changed (%s -> %s); its checkpoint is in %s and the run starts over",
                out_dir, old, data_fingerprint, target)
    return target


def close_attempt(out_dir: Path, info: dict, outcome: str) -> None:
    """Record the end time and outcome of this attempt (the last `attempts` entry) in config.json."""
    info["attempts"][-1].update(ended=_now(), outcome=outcome)
    atomic_write_text(out_dir / CONFIG, json.dumps(info, indent=2, sort_keys=True, default=str))


def train(cfg: RunConfig, out_dir: str | Path, *, partition_dir: str | Path | None = None, progress: bool = False,
          stop_after_round: int | None = None, threads: int | None = None,
          restart_on_other_data: bool = False) -> pd.DataFrame:
    """Run (or resume, or return) the run in `out_dir`; returns its per-round metrics.

    `threads` sets torch's CPU threads (default: the current setting). CPU results are bit-identical
    for a fixed thread count, so the count is recorded in config.json and the metrics, and a resume under
    another count is refused. A finished run is returned as is, after checking that its metrics.parquet
    belongs to this run (config hash in its metadata) and without touching its provenance.

    A checkpoint made on other data (another content fingerprint) is refused, unless `restart_on_other_data`
    (the workflow's jobs: the workflow reran the run because its data changed): then the checkpoint is moved
    aside (`set_aside_for_other_data`) and the run starts over on the data now loaded.
    """
    out_dir = Path(out_dir)
    check_runnable(cfg)  # before the run directory is touched
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    with run_lock(out_dir):
        metrics_path = out_dir / METRICS
        remove_stale_temps(out_dir)  # left by a process killed inside an atomic write
        info = read_run_info(out_dir)
        if info is not None and info.get("config_hash") != cfg.config_hash():
            stale_revision(info.get("config") or {}, cfg, out_dir)
            raise ConfigError(f"run directory {out_dir} holds a different run (config hash "
                              f"{info.get('config_hash')}, this config {cfg.config_hash()}); "
                              "choose another --out or delete it")
        if metrics_path.exists():
            check_metrics_belong(out_dir, info if info is not None else {"config_hash": cfg.config_hash()})
            if info is not None:
                note_other_execution(cfg, info, out_dir)
            return pd.read_parquet(metrics_path)
        (out_dir / CLIENTS).unlink(missing_ok=True)  # left by a process killed before metrics.parquet: incomplete
        data = load_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
        data_fp = fingerprint(data)
        ctx = build_context(cfg, Path(partition_dir) if partition_dir else None, data=data, data_fingerprint=data_fp)
        checkpoint = load_checkpoint(out_dir)
        if checkpoint is not None and checkpoint["config_hash"] != cfg.config_hash():
            raise ConfigError(f"checkpoint in {out_dir} belongs to another config; delete it or use another --out")
        if (checkpoint is not None and restart_on_other_data and info is not None
                and info.get("data_fingerprint") not in (None, data_fp)):
            set_aside_for_other_data(out_dir, info, data_fp)
            checkpoint = None
        info = open_run_record(cfg, out_dir, info, threads=threads, data_fingerprint=data_fp,
                               resume_round=None if checkpoint is None else int(checkpoint["round"]))
        outcome = "failed"
        try:
            df, outcome = _train_loop(cfg, ctx, out_dir, checkpoint, stop_after_round, progress,
                                      identity={"config_hash": cfg.config_hash(), "run_id": cfg.config_hash(),
                                                "threads": threads, "data_fingerprint": data_fp})
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        except BaseException as err:
            outcome = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            raise
        finally:
            with contextlib.suppress(OSError):
                close_attempt(out_dir, info, outcome)
        return df


def start_engine(ctx: Context, out_dir: Path | None, checkpoint: dict | None = None) -> tuple[Engine, list[dict], int]:
    """The run's engine as `train` starts it: torch seeded with the run's seed, the engine built (`client_store:
    disk` keeps client states under `out_dir/client_states`, in a temporary directory when `out_dir` is None),
    then reset (a run from round 1) or loaded from `checkpoint`. Returns (engine, the metrics rows so far, the
    first round to run). The benchmarks (`fedhpro.bench`) build their engines with it too."""
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    engine = Engine(ctx, METHODS[cfg.method], client_dir=None if out_dir is None else out_dir / CLIENT_STATES_DIR)
    if checkpoint is None:
        engine.client_states.reset()  # client_store disk: files of an attempt that never checkpointed
        return engine, [], 1
    engine.load_state_dict(checkpoint["engine"])
    engine.client_rows = list(checkpoint["client_rows"]) if "client_rows" in checkpoint else None
    return engine, list(checkpoint["rows"]), int(checkpoint["round"]) + 1


def write_checkpoint(engine: Engine, out_dir: Path, rows: list[dict], round_idx: int) -> float:
    """Checkpoint after round `round_idx` (engine state and the metrics rows so far) in `out_dir`, then drop the
    client-state files it no longer names (`client_store: disk`); returns the seconds it took."""
    t0 = time.perf_counter()
    save_checkpoint(out_dir, {"round": round_idx, "config_hash": engine.cfg.config_hash(), "rows": rows,
                              "client_rows": engine.client_rows, "engine": engine.state_dict()})
    engine.client_states.commit()
    return time.perf_counter() - t0


def record_round(engine: Engine, round_idx: int, rows: list[dict], out_dir: Path) -> RoundResult:
    """One round exactly as `train` runs it: the engine's round, its metrics row appended to `rows` (status
    "running"), and when one is due (every `checkpoint_every` rounds, not after the last) a checkpoint in
    `out_dir` whose write time goes into the row's `time_io`. Raises `Diverged` as the engine does. The
    benchmarks (`fedhpro.bench`) time this same step."""
    cfg = engine.cfg
    res = engine.run_round(round_idx)
    rows.append(result_row(cfg, res, "running", engine.ctx.domain_names))
    if engine.client_rows is not None:
        engine.client_rows.extend(client_rows_of(cfg.config_hash(), round_idx, res.client_results))
    if round_idx % cfg.checkpoint_every == 0 and round_idx < cfg.rounds:
        rows[-1]["time_io"] = write_checkpoint(engine, out_dir, rows, round_idx)
    return res


def _train_loop(cfg: RunConfig, ctx: Context, out_dir: Path, checkpoint: dict | None, stop_after_round: int | None,
                progress: bool, identity: dict) -> tuple[pd.DataFrame, str]:
    metrics_path = out_dir / METRICS
    engine, rows, start = start_engine(ctx, out_dir, checkpoint)
    status = "finished"
    bar = _progress(range(start, cfg.rounds + 1), cfg, start, progress)
    for r in bar:
        try:
            res = record_round(engine, r, rows, out_dir)
        except Diverged as err:
            status = "diverged"
            res = RoundResult(round=r, selected=[], train_loss=float("nan"))
            rows.append(result_row(cfg, res, status, ctx.domain_names))
            print(f"run diverged in round {r}: {err}")
            break
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(acc=f"{res.test_acc if res.test_acc == res.test_acc else res.client_acc_mean:.4f}")
        fault_point("round_end")
        if stop_after_round is not None and r >= stop_after_round and r < cfg.rounds:
            return pd.DataFrame(rows), "stopped"
    for row in rows:
        row["status"] = status
    clients_path = out_dir / CLIENTS
    if engine.client_rows is not None:  # before metrics.parquet, whose existence marks the run complete
        write_client_results(clients_path, engine.client_rows, cfg.provenance_dict(), identity)
    else:
        clients_path.unlink(missing_ok=True)
        log.warning("run %s resumed from a checkpoint that predates per-client results: no %s", out_dir, CLIENTS)
    write_metrics(metrics_path, rows, cfg.provenance_dict(), identity)
    engine.client_states.commit()  # disk: keep each client's final state only (the run will not resume)
    return pd.read_parquet(metrics_path), status


def _progress(it, cfg: RunConfig, start: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=cfg.rounds, initial=start - 1, desc=f"{cfg.method}/{cfg.dataset}", unit="round")
