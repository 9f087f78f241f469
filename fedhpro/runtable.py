"""The workflow's run table: the config validated and expanded, in Snakemake's own process, without torch.

`workflow/rules/common.smk` calls `load_run_table` once at workflow load: it validates the config
(`fedhpro.sweep.validate_workflow_config`: every run's `RunConfig` through `fedhpro.config.from_dict`), and
computes each run's canonical config JSON and hash, the partitions, the download plan
(`fedhpro.data.plan_downloads`) and what the data is (checksums, fingerprints). The method, dataset and model
declarations it reads import torch lazily (`fedhpro.lazy`): Snakemake's main process lives for the whole
sweep on the submit host (a login node with a few GB per user) and never pays torch's ~0.6 GB
(tests/test_torch_free.py). The one exception: data given by `dataset_options.path` is loaded once to be
fingerprinted (then cached by file stats). Ctrl-C while it runs is one line (`RunTableInterrupted`), and so
are the checks run before it (`schema_error`, `check_directories`).

The strings are ``RunConfig.canonical_json()``, ``config_hash()`` and ``PartitionSpec.params()``, so
Snakemake's params rerun trigger and every run id are what the sweep computes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["RunRow", "PartitionRow", "RunTable", "RunTableError", "RunTableInterrupted", "load_run_table",
           "build_run_table", "check_directories", "schema_error"]


class RunTableError(ValueError):
    """The workflow config is invalid (the message names the key), or the run table could not be built."""


class RunTableInterrupted(Exception):
    """Ctrl-C while the run table was computed (nothing was written; the same command starts over)."""

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


def build_run_table(config: Mapping[str, Any], data_root: str, pending: set[str]) -> RunTable:
    """The run table of a workflow config (already checked against the schema, its defaults filled in).

    ValueError (ConfigError, SweepConfigError, the download plan's) with a one-line message naming the key."""
    from fedhpro.data import DATASETS, plan_downloads
    from fedhpro.download import mirror_checksum
    from fedhpro.sweep import partitions_of, validate_workflow_config

    runs = validate_workflow_config(config)
    partitions = {pid: PartitionRow(pid, spec.params()) for pid, spec in partitions_of(runs).items()}
    mirrors = config.get("mirrors") or {}
    downloads = plan_downloads([(run.dataset, run.config.dataset_options) for run in runs], data_root, mirrors,
                               pending=pending,
                               warn=lambda message: print(f"fedhpro workflow: warning: {message}", file=sys.stderr))
    cache_file = fingerprint_cache(config)
    identity = {}
    for dataset in sorted({r.dataset for r in runs}):
        mirror = mirrors.get(dataset) or {}
        by_name = {remote.filename: remote for remote in DATASETS[dataset].downloads}
        files = {name: mirror_checksum(by_name[name], mirror) for name in downloads.get(dataset, [])}
        identity[dataset] = {"files": {**files, **hand_placed_checksums(dataset, files, data_root, mirror, cache_file)},
                             "fingerprint": mirror.get("fingerprint")}
    content = partition_contents(runs, data_root, pending, cache_file=cache_file)
    rows = [RunRow(run_id=r.run_id, partition_id=r.partition_id, kind=r.kind, dataset=r.dataset, method=r.method,
                   variant=r.variant, config_json=r.config.canonical_json(), config_hash=r.config.config_hash(),
                   experiments=tuple(r.experiments)) for r in runs]
    return RunTable(runs=rows, partitions=partitions, downloads=downloads, data_identity=identity,
                    partition_content=content)


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


def load_run_table(config: Mapping[str, Any], data_root: str) -> RunTable:
    """Validate `config` and expand it into the run table, in this process; RunTableError carries the one-line
    message naming the key, RunTableInterrupted a Ctrl-C (nothing was written: the same command starts over)."""
    from fedhpro.sweep import pending_datasets_of

    try:
        return build_run_table(config, data_root, pending_datasets_of(config))
    except ValueError as err:  # ConfigError / SweepConfigError, and plan_downloads' one-line errors
        raise RunTableError(str(err)) from None
    except KeyboardInterrupt:
        raise RunTableInterrupted() from None
