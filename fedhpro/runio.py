"""Run-directory I/O: atomic writes, hashed checkpoints, Parquet metrics, run info, a writer lock.

Everything a run writes goes through `atomic_write` (temp file in the same
directory, fsync, rename), so a crash at any instant leaves either the old file
or the new one, never a torn file that looks complete. The renamed file gets the mode a
plain `open(path, "w")` would give it (0666 minus the umask), not mkstemp's 0600, so a
shared results directory stays readable by collaborators. Checkpoints carry a
SHA-256 sidecar written after them; a checkpoint whose bytes do not match is
refused with a clear message instead of being loaded, and loading always uses
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedhpro.faults import fault_point
from fedhpro.lazy import lazy_module

torch = lazy_module("torch")

METRICS_SCHEMA_VERSION = 1
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.parquet"
CLIENTS = "clients.parquet"  # per-client results of a finished run (`write_client_results`)
CONFIG = "config.json"


class CheckpointError(RuntimeError):
    pass


class RunLockedError(RuntimeError):
    pass


def atomic_write(path: str | Path, data: bytes, fault: str | None = None) -> None:
    atomic_stream(path, lambda f: f.write(data), fault)


def atomic_savez(path: str | Path, arrays: dict) -> None:
    """`np.savez` streamed to a temp sibling, then renamed: a cache file is never half-written."""
    import numpy as np

    atomic_stream(path, lambda f: np.savez(f, **arrays))


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def atomic_stream(path: str | Path, write, fault: str | None = None) -> None:
    """Call `write(file)` on a temp file in the same directory, fsync, then rename over `path`.

    The file gets the umask-derived mode of a plain write (mkstemp's temp files are 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, plain_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno and not err.filename:  # e.g. ENOSPC: name the file
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete temp files of the run's own atomic writes left by a killed process; call under `run_lock`."""
    stale = [p for name in (CHECKPOINT, METRICS, CLIENTS, CONFIG) for p in run_dir.glob(f".{name}.*.tmp")
             if p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text.encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------ run info
def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("fedhpro", "torch", "torchvision", "numpy", "pandas", "pyarrow", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def run_info(config_dict: dict, config_hash: str) -> dict[str, Any]:
    return {"config": config_dict, "config_hash": config_hash, "git_sha": git_sha(),
            "versions": package_versions(), "host": platform.node(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}


def attempt_info(threads: int, **extra: Any) -> dict[str, Any]:
    """Provenance of one attempt at a run (appended to config.json's `attempts`): code, host, threads, SLURM."""
    return {"git_sha": git_sha(), "host": platform.node(), "versions": package_versions(), "threads": threads,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ended": None, "outcome": None,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), **extra}


def read_json_file(path: Path, what: str = "file") -> Any:
    """A JSON file's value; ValueError naming the file when it cannot be read as JSON."""
    try:
        return json.loads(Path(path).read_text())
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a file; delete or restore it") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not valid JSON (not text); delete or restore it") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); delete or restore it") from None


def read_run_info(run_dir: Path) -> dict | None:
    """config.json of a run directory (None if absent); ValueError naming the file if it is not a run record."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        return None
    info = read_json_file(path, "run record")
    if not isinstance(info, dict) or not isinstance(info.get("config_hash"), str):
        raise ValueError(f"run record {path} is not a fedhpro config.json (expected an object with a "
                         f"config_hash, got {type(info).__name__}); delete the run directory or choose another --out")
    return info


# ------------------------------------------------------------------------ checkpoints
_CKPT_MAGIC = b"FEDHPRO-CHECKPOINT-1\n"


def save_hashed(path: Path, obj: Any, fault: str | None = None) -> None:
    """One atomic file: a magic line, the SHA-256 of the payload, then the torch payload.

    Hash and payload travel together, so a crash leaves the previous complete file, and any
    change to the bytes afterwards is detected on load.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    atomic_write(path, _CKPT_MAGIC + sha256_bytes(payload).encode() + b"\n" + payload, fault=fault)


def load_hashed(path: Path) -> Any:
    """Load a `save_hashed` file (weights_only); CheckpointError if it is truncated, altered or unsafe."""
    data = path.read_bytes()
    header_end = len(_CKPT_MAGIC) + 65
    if not data.startswith(_CKPT_MAGIC) or len(data) < header_end:
        raise CheckpointError(f"checkpoint {path} is not a fedhpro checkpoint or is truncated; delete it to restart "
                              "the run from scratch")
    expected = data[len(_CKPT_MAGIC):header_end - 1].decode(errors="replace")
    payload = data[header_end:]
    actual = sha256_bytes(payload)
    if expected != actual:
        raise CheckpointError(f"checkpoint {path} is corrupt or tampered with (sha256 {actual}, expected "
                              f"{expected}); delete it to restart the run from scratch")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file cannot be trusted
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {err}") from None


def save_checkpoint(run_dir: Path, state: dict) -> None:
    save_hashed(run_dir / CHECKPOINT, state, fault="checkpoint_write")


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / CHECKPOINT
    return load_hashed(path) if path.exists() else None


# ------------------------------------------------------------------------ metrics
def write_metrics(path: Path, rows: list[dict], run_config: dict, identity: dict | None = None) -> None:
    """One typed row per round, run identifiers as columns, config in the Parquet metadata.

    identity: e.g. {"config_hash": ..., "threads": ..., "data_fingerprint": ...}, stored as
    `fedhpro.<key>` metadata so a metrics file can be checked against its run's config.json.
    """
    df = pd.DataFrame(rows)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"fedhpro.config"] = json.dumps(run_config, sort_keys=True).encode()
    meta[b"fedhpro.schema_version"] = str(METRICS_SCHEMA_VERSION).encode()
    for key, value in (identity or {}).items():
        meta[f"fedhpro.{key}".encode()] = str(value).encode()
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue().to_pybytes(), fault="metrics_write")


def is_pipeline_metrics(path: Path) -> bool:
    """Whether a Parquet file was written by this pipeline (`write_metrics`: `fedhpro.*` schema metadata)."""
    return any(k.startswith(b"fedhpro.") for k in (pq.read_schema(path).metadata or {}))


def read_metrics_meta(path: Path) -> tuple[int, dict]:
    meta = pq.read_schema(path).metadata or {}
    version = int(meta.get(b"fedhpro.schema_version", b"0"))
    config = json.loads(meta.get(b"fedhpro.config", b"{}"))
    return version, config


def metrics_identity(path: Path) -> dict[str, str]:
    """The `fedhpro.*` identity metadata of a metrics file (config_hash, threads, data_fingerprint, ...)."""
    meta = pq.read_schema(path).metadata or {}
    skip = {b"fedhpro.config", b"fedhpro.schema_version"}
    return {k.decode()[len("fedhpro."):]: v.decode() for k, v in meta.items()
            if k.startswith(b"fedhpro.") and k not in skip}


def metrics_config_hash(path: Path) -> str | None:
    """The config hash a metrics file was written for: its metadata, else its `run_id` column (older files)."""
    ident = metrics_identity(path)
    if "config_hash" in ident:
        return ident["config_hash"]
    ids = pq.read_table(path, columns=["run_id"]).column("run_id").to_pylist() if "run_id" in \
        pq.read_schema(path).names else []
    return ids[0] if ids and len(set(ids)) == 1 else None


IDENTITY_CHECKED = ("config_hash", "data_fingerprint", "threads")  # metrics metadata that must match config.json


def metrics_mismatch(path: Path, info: dict) -> str | None:
    """Why the metrics file `path` does not belong to the run record `info` (config.json), or None: its config
    hash, data fingerprint and thread count (where both sides record them) must be config.json's. Raises
    whatever reading the file raises."""
    ident = metrics_identity(path)
    found = {"config_hash": metrics_config_hash(path), "data_fingerprint": ident.get("data_fingerprint"),
             "threads": ident.get("threads")}
    for key in IDENTITY_CHECKED:
        mine, theirs = found[key], info.get(key)
        if key != "config_hash" and (mine is None or theirs is None):
            continue  # files written before the key was recorded
        if str(mine) != str(theirs):
            return f"{key} {mine}, but {Path(path).parent / CONFIG} says {theirs}"
    return None


def check_metrics_belong(run_dir: Path, info: dict) -> None:
    """Refuse a metrics.parquet that belongs to another run than the record `info` (config.json): another
    config hash, data fingerprint or thread count (`metrics_mismatch`)."""
    path = Path(run_dir) / METRICS
    try:
        reason = metrics_mismatch(path, info)
    except Exception as err:  # noqa: BLE001 - an unreadable file cannot be trusted either
        raise ValueError(f"metrics file {path} cannot be read ({err}); delete it to recompute the run") from None
    if reason:
        raise ValueError(f"metrics file {path} belongs to another run ({reason}); delete it to recompute the run, "
                         "or restore the right file")


# ------------------------------------------------------------------------ per-client results
# clients.parquet: one row per evaluated round and client with a local test split. The columns and their types
# are a contract (the per-client figures read them); a file with zero rows has the same schema.
CLIENT_COLUMNS = (("run_id", pa.string()), ("round", pa.int64()), ("client", pa.int64()),
                  ("client_acc", pa.float64()), ("client_test_size", pa.int64()), ("client_correct", pa.int64()))
CLIENT_SCHEMA = pa.schema([pa.field(name, kind) for name, kind in CLIENT_COLUMNS])


def client_rows_of(run_id: str, round_idx: int, results: list[tuple[int, int, int]]) -> list[dict]:
    """clients.parquet rows of one evaluated round from (client, correct, size) triples (accuracy 0..1)."""
    return [{"run_id": run_id, "round": int(round_idx), "client": int(cid), "client_acc": correct / size,
             "client_test_size": int(size), "client_correct": int(correct)} for cid, correct, size in results]


def write_client_results(path: Path, rows: list[dict], run_config: dict, identity: dict | None = None) -> None:
    """Write clients.parquet atomically: `CLIENT_SCHEMA` columns, the run's config and identity as metadata
    (as `write_metrics` does, so `read_client_results` checks it against config.json)."""
    table = pa.Table.from_pylist(rows, schema=CLIENT_SCHEMA)
    meta = {b"fedhpro.config": json.dumps(run_config, sort_keys=True).encode(),
            b"fedhpro.schema_version": str(METRICS_SCHEMA_VERSION).encode()}
    for key, value in (identity or {}).items():
        meta[f"fedhpro.{key}".encode()] = str(value).encode()
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue().to_pybytes())  # no fault point: `metrics_write` stays the metrics file's


def read_client_results(run_dir: str | Path) -> pd.DataFrame:
    """The per-client results of a finished run (`CLIENT_COLUMNS`), checked to belong to it: metrics.parquet
    must exist (the run is complete) and the file's config hash, data fingerprint and threads must be
    config.json's. ValueError (one line, naming the file) otherwise."""
    run_dir = Path(run_dir)
    path = run_dir / CLIENTS
    if not (run_dir / METRICS).is_file():
        raise ValueError(f"run {run_dir} has not finished (no {METRICS}); per-client results exist only for "
                         "finished runs")
    if not path.is_file():
        raise ValueError(f"per-client results {path} not found (run finished before they were stored?); "
                         "delete the run directory and re-run it")
    info = read_run_info(run_dir)
    if info is None:
        raise ValueError(f"per-client results {path} have no run record {run_dir / CONFIG} to check them against")
    try:
        reason = metrics_mismatch(path, info)
        df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - an unreadable file cannot be trusted
        raise ValueError(f"per-client results {path} cannot be read ({err}); delete the run directory and "
                         "re-run it") from None
    if reason:
        raise ValueError(f"per-client results {path} belong to another run ({reason}); delete the run "
                         "directory and re-run it")
    if list(df.columns) != [name for name, _ in CLIENT_COLUMNS]:
        raise ValueError(f"per-client results {path} have columns {list(df.columns)}, expected "
                         f"{[name for name, _ in CLIENT_COLUMNS]}")
    return df


# ------------------------------------------------------------------------ lock
@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive writer lock on a run directory; a second writer gets a clear error at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    except PermissionError:
        # a read-only run directory (e.g. a finished run made read-only): nothing can be written into it, so
        # locking the existing lock file for reading is enough; a write would fail naming its file
        try:
            fd = os.open(run_dir / ".lock", os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"run directory {run_dir} is in use by another process; "
                                 "wait for it to finish or stop it first") from None
        yield
    finally:
        os.close(fd)
