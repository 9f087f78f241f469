"""The workflow's run table, computed in a child process so the Snakemake process never imports torch.

Validating a sweep needs the method, dataset and model registries (`fedhpro.config.from_dict`,
`fedhpro.data.plan_downloads`), and those import torch: ~0.6 GB resident in the process that
imports them. Snakemake's main process lives for the whole sweep on the submit host (a login node
with a few GB per user), so `workflow/rules/common.smk` calls `load_run_table`, which runs
``python -m fedhpro.runtable`` once: the child validates the config exactly as before
(`fedhpro.sweep.validate_workflow_config`, `plan_downloads`) and prints plain JSON (run ids, each
run's canonical config JSON and hash, the partitions, the download plan); the parent keeps only
that. The parent imports nothing but the standard library from this module (and, for `schema_error`,
jsonschema and PyYAML, which Snakemake has loaded already). Ctrl-C while the child runs is one line
(`RunTableInterrupted`), and so are the checks run before it (`schema_error`, `check_directories`).

The strings are the ones the in-process version produced (``RunConfig.canonical_json()``,
``config_hash()``, ``PartitionSpec.params()``), so Snakemake's params rerun trigger and every run
id are unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["RunRow", "PartitionRow", "RunTable", "RunTableError", "RunTableInterrupted", "load_run_table",
           "build_run_table", "check_directories", "schema_error"]


class RunTableError(ValueError):
    """The workflow config is invalid (the message names the key), or the run table could not be built."""


class RunTableInterrupted(Exception):
    """Ctrl-C while the child computed the run table (nothing was written; the same command starts over)."""

    def __init__(self) -> None:
        super().__init__("interrupted while loading the workflow config; rerun the same command")


@dataclass(frozen=True)
class RunRow:
    """One training run as the workflow sees it (the torch-free part of `fedhpro.sweep.RunSpec`)."""

    run_id: str
    partition_id: str
    kind: str
    dataset: str
    method: str
    variant: str
    config_json: str  # RunConfig.canonical_json(): the train rule's params and the job's input
    config_hash: str
    experiments: tuple[str, ...] = ()  # the experiments (tables and figures) that list this run


@dataclass(frozen=True)
class PartitionRow:
    """One client split: `params()` is `fedhpro.sweep.PartitionSpec.params()` (the partition rule's params)."""

    partition_id: str
    values: dict[str, Any]

    def params(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.values))  # a fresh copy


@dataclass(frozen=True)
class RunTable:
    runs: list[RunRow]
    partitions: dict[str, PartitionRow]
    downloads: dict[str, list[str]]  # dataset -> file names its download step fetches
    data_identity: dict[str, dict[str, Any]]  # dataset -> {files: {name: checksum}, fingerprint}: what the data is
    partition_content: dict[str, str] = field(default_factory=dict)  # partition id -> content fingerprint of data given by path


def build_run_table(config: Mapping[str, Any], data_root: str, pending: set[str]) -> dict[str, Any]:
    """The run table as JSON-ready data (runs in the child: imports torch through the registries)."""
    from fedhpro.data import DATASETS, plan_downloads
    from fedhpro.download import mirror_checksum
    from fedhpro.sweep import partitions_of, validate_workflow_config

    runs = validate_workflow_config(config)
    partitions = {pid: spec.params() for pid, spec in partitions_of(runs).items()}
    downloads = plan_downloads([(run.dataset, run.config.dataset_options) for run in runs], data_root,
                               config.get("mirrors") or {}, pending=pending,
                               warn=lambda message: print(f"fedhpro workflow: warning: {message}", file=sys.stderr))
    mirrors = config.get("mirrors") or {}
    cache_file = fingerprint_cache(config)
    identity = {}
    for dataset in sorted({r.dataset for r in runs}):
        mirror = mirrors.get(dataset) or {}
        by_name = {remote.filename: remote for remote in DATASETS[dataset].downloads}
        files = {name: mirror_checksum(by_name[name], mirror) for name in downloads.get(dataset, [])}
        identity[dataset] = {"files": {**files, **hand_placed_checksums(dataset, files, data_root, mirror, cache_file)},
                             "fingerprint": mirror.get("fingerprint")}
    content = partition_contents(runs, data_root, pending, cache_file=cache_file)
    return {"data_identity": identity, "partition_content": content, "runs": [{"run_id": r.run_id, "partition_id": r.partition_id, "kind": r.kind, "dataset": r.dataset,
                      "method": r.method, "variant": r.variant, "config_json": r.config.canonical_json(),
                      "config_hash": r.config.config_hash(), "experiments": list(r.experiments)} for r in runs],
            "partitions": partitions, "downloads": downloads}


FINGERPRINT_CACHE = ".cache/data-fingerprints.json"  # under the results root


def fingerprint_cache(config: Mapping[str, Any]) -> str:
    """Where the workflow keeps the content fingerprints of data given by path (`fedhpro.data.path_fingerprint`)."""
    return os.path.join(str(config.get("results") or "results"), FINGERPRINT_CACHE)


def hand_placed_checksums(dataset: str, files: Mapping[str, str | None], data_root: str, mirror: Mapping,
                          cache_file: str | None) -> dict[str, str]:
    """{file name: 'sha256:...'} of the files that have no checksum to verify them (none published, none in
    `mirrors:`) and that the workflow uses where they were placed by hand (`find_local_copies`): their bytes
    are then what the data is, so other files placed there rerun what used them (cached by file stats)."""
    from fedhpro.data import DATASETS, local_copy_checksum

    unverified = [name for name, checksum in files.items() if checksum is None]
    if not unverified:
        return {}
    spec = DATASETS[dataset]
    remotes = [r for r in spec.downloads if r.filename in unverified]
    local = spec.find_local_copies(data_root, remotes, mirror or None)
    return {name: local_copy_checksum(path, cache_file) for name, path in local.items()}


def partition_contents(runs, data_root: str, pending: set[str], *, cache_file: str | None) -> dict[str, str]:
    """{partition id: content fingerprint} for the partitions whose data is given by `dataset_options.path`.

    Such data has no download whose checksums say what it is, so the workflow reads what it is from the files
    (cached by file stats): the fingerprint goes into the partition rule's params, so other data put under the
    same path reruns the partitions and, through them, the runs, while moved or touched but equal data reruns
    nothing. A path that cannot be loaded is a ValueError naming the key (for a dataset under
    `pending_datasets`, a warning). Two paths of different content for one partition are a ValueError.
    """
    from fedhpro.data import path_fingerprint

    found: dict[str, str] = {}  # canonical loader options (path included) -> fingerprint
    out: dict[str, str] = {}
    paths: dict[str, str] = {}
    for run in runs:
        options = dict(run.config.dataset_options)
        if options.get("path") is None:
            continue
        key = json.dumps([run.dataset, options], sort_keys=True, default=str)
        if key not in found:
            try:
                found[key] = path_fingerprint(run.dataset, run.config.data_root or data_root, options, cache_file)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                message = (f"datasets.{run.dataset}.dataset_options.path: cannot load {options['path']}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
                if run.dataset not in pending:
                    raise ValueError(message) from None
                print(f"fedhpro workflow: warning: {message}", file=sys.stderr)
                found[key] = ""
        if not found[key]:
            continue
        if out.setdefault(run.partition_id, found[key]) != found[key]:
            raise ValueError(f"partition {run.partition_id}: its runs give data of different content "
                             f"({paths[run.partition_id]} and {options['path']}); give one dataset_options.path")
        paths.setdefault(run.partition_id, str(options["path"]))
    return out


def schema_error(config: Any, schema_path: str) -> str | None:
    """The one-line reason `config` fails the workflow's JSON schema, naming the key (None if it passes).

    snakemake.utils.validate reports a failure with the whole schema (~1,400 lines); this is jsonschema's
    best match instead, e.g. ``heterogenity: unknown key; accepted: results, data_root, ...`` or
    ``defaults.rounds: 'ten' is not of type 'integer'``.
    """
    import yaml
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    with open(schema_path) as fh:
        schema = yaml.safe_load(fh)
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is None:
        return None
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        accepted = list((error.schema.get("properties") or {}))
        unknown = sorted(k for k in error.instance if k not in accepted)
        if unknown:
            key = f"{path}.{unknown[0]}" if path else unknown[0]
            return f"{key}: unknown key" + (f"; accepted: {', '.join(accepted)}" if accepted else "")
    message = error.message
    shown = repr(error.instance)
    if len(shown) > 80 and shown in message:  # jsonschema quotes the whole value
        message = message.replace(shown, shown[:60] + "...")
    return f"{path or '(top level)'}: {' '.join(message.split())}"


def check_directories(config: Mapping[str, Any], keys: tuple[str, ...] = ("results", "data_root")) -> None:
    """RunTableError naming the key when a directory key (`results`, `data_root`) is, or lies under, a file:
    the workflow would otherwise fail later on '<file>/tables' with a traceback."""
    for key in keys:
        path = config.get(key)
        if not isinstance(path, str) or not path:
            continue
        here = path.rstrip("/") or "/"
        while here and not os.path.lexists(here):  # the nearest part that exists must be a directory
            parent = os.path.dirname(here)
            here = parent if parent != here else ""
        if here and not os.path.isdir(here):
            what = "is not a directory" if here == path.rstrip("/") else f"lies under {here}, which is not a directory"
            raise RunTableError(f"{key}: {path} {what}")


def _run_child(cmd: list[str], stdin: str, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `cmd` with `stdin`; (exit status, stdout). Its stderr is ours (its warnings reach the user).

    The child starts with SIGINT ignored (a disposition that survives exec; Python then installs no
    KeyboardInterrupt handler): a terminal's Ctrl-C goes to the whole process group, and the child, caught
    anywhere (even importing torch), would print a traceback. Here the parent alone gets the
    KeyboardInterrupt and kills the child, like subprocess.run on any exception.
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    if previous is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    with proc:
        try:
            stdout, _ = proc.communicate(stdin, timeout=timeout)
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, stdout


def load_run_table(config: Mapping[str, Any], data_root: str, *, package_root: str | None = None,
                   python: str = sys.executable, timeout: float = 600) -> RunTable:
    """Validate `config` and expand it in a child Python; raises RunTableError with its one-line message.

    package_root: a directory to put first on the child's PYTHONPATH (this checkout's fedhpro).
    Ctrl-C (SIGINT to the process group; the child ignores it and is killed) is RunTableInterrupted.
    """
    env = dict(os.environ)
    if package_root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    from fedhpro.sweep import pending_datasets_of  # no torch

    try:
        pending = sorted(pending_datasets_of(config))
    except ValueError as err:
        raise RunTableError(str(err)) from None
    request = {"config": config, "data_root": data_root, "pending": pending}
    try:
        status, stdout = _run_child([python, "-m", "fedhpro.runtable"], json.dumps(request, default=str), env,
                                    timeout)
    except KeyboardInterrupt:  # the child is killed and reaped
        raise RunTableInterrupted() from None
    except (OSError, subprocess.SubprocessError) as err:
        raise RunTableError(f"could not run {python} -m fedhpro.runtable: {err}") from None
    if status in (INTERRUPTED_STATUS, -signal.SIGINT):  # a SIGINT that reached the child only
        raise RunTableInterrupted()
    try:
        answer = json.loads(stdout or "null")
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise RunTableError(f"{python} -m fedhpro.runtable failed (exit {status}); see its output above")
    if "error" in answer:
        raise RunTableError(answer["error"])
    return RunTable(runs=[RunRow(**{**row, "experiments": tuple(row.get("experiments", ()))}) for row in answer["runs"]], partitions={pid: PartitionRow(pid, values) for pid, values in answer["partitions"].items()},
                    downloads=answer["downloads"], data_identity=answer["data_identity"],
                    partition_content=answer.get("partition_content") or {})


INTERRUPTED_STATUS = 130  # the child's exit status after Ctrl-C (the shell's 128 + SIGINT)


def main() -> int:
    """``python -m fedhpro.runtable``: request JSON on stdin, the run table (or {"error": ...}) on stdout.

    Run by `load_run_table`, it ignores SIGINT; run otherwise, Ctrl-C exits quietly with status 130."""
    try:
        request = json.load(sys.stdin)
        try:
            table = build_run_table(request["config"], request["data_root"], set(request["pending"]))
        except ValueError as err:  # ConfigError / SweepConfigError, and plan_downloads' one-line errors
            table = {"error": str(err)}
        json.dump(table, sys.stdout)
    except KeyboardInterrupt:
        return INTERRUPTED_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
