"""Expand the workflow config (``config/config.yaml``) into concrete, validated runs.

Pure Python (no Snakemake import): the Snakemake workflow (`workflow/rules/common.smk`)
calls `validate_workflow_config` once at parse time and builds its run table from the
returned `RunSpec` list; the tests call the same functions directly.

Workflow config layout (every key documented in ``workflow/schemas/config.schema.yaml``)::

    results: results                 # output root
    data_root: data
    reporting: {rule: last_k, last_k: 3}
    defaults: {rounds: 10, ...}      # any RunConfig key except the sweep axes
    datasets:                        # registered datasets -> RunConfig overrides (+ optional
      digits: {}                     #   `heterogeneity: [...]` / `methods: [...]` for that dataset)
    pending_datasets: {}             # same shape; skipped with a warning until registered
    heterogeneity:                   # partition settings (keys: partition, alpha, classes_per_client,
      - {partition: dirichlet, alpha: 0.5}   #   imbalance_ratio, num_clients, clients_per_domain)
    methods:                         # method -> variant -> method_params (+ `config: {RunConfig overrides}`)
      fedprox: {default: {mu: 0.01}}
    grids:                           # method -> param -> values: extra variants on top of `default`
      fedprox: {mu: [0.001, 0.1]}    #   (a key `config.lr` sweeps a RunConfig key)
    ablations: {methods: [fedhpro], base_variant: default, datasets: [digits],
                heterogeneity: [0], variants: {no_hpcl: {hpcl: false}}}
    seeds: [0, 1]
    partition_seeds: [0]
    threads: 1
    slurm: {launcher: local, partition: gpu, account: null, gpus: 1, cpus: 4, mem_gb: 16, ...}
    mirrors: {}                      # dataset -> fedhpro.download mirror mapping

Identifiers are built from the *resolved* RunConfig, so they are stable, readable and
wildcard-safe (letters, digits, ``_ . -``; numbers encoded with `encode_value`: ``0.5 -> 0p5``,
``1e-05 -> 1em05``, ``-2 -> m2``):

* heterogeneity id ``het``: ``dirichlet-a0p5-n10``, ``creff-a0p2-rho100-n10``, ``pathological-k2-n10``,
  ``iid-n10``, ``domains-n10`` (every setting that changes the split is in it, so two different
  settings never share a partition);
* partition id: ``{dataset}/{het}/ps{partition_seed}`` -> ``<results>/partitions/<partition id>/``;
* run id: ``{dataset}/{het}/{method}/{variant}/ps{partition_seed}_s{seed}`` -> ``<results>/runs/<run id>/``
  (both defined once, in `fedhpro.layout`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

import yaml

from fedhpro import layout
from fedhpro.config import LOCATION_OPTIONS, ConfigError, RunConfig, from_dict, load_yaml_text
from fedhpro.params import FLOAT_RE

__all__ = ["RunSpec", "PartitionSpec", "ExperimentSpec", "SweepConfigError", "expand_sweep", "experiments_of",
           "runs_by_experiment", "pending_datasets_of", "validate_workflow_config",
           "check_supported", "check_config_files", "yaml12_numbers", "workflow_run",
           "encode_value", "het_id", "partitions_of", "WILDCARD_PATTERNS", "LAUNCHERS", "REPORTING_RULES"]

LAUNCHERS = ("local", "submitit")
REPORTING_RULES = ("final", "last_k", "best")
NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")  # dataset / method names
VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# regexes of the Snakemake wildcards (no '/' anywhere, so path components never shift)
WILDCARD_PATTERNS = {"dataset": r"[A-Za-z0-9_.]+", "het": r"[A-Za-z0-9_.-]+", "method": r"[A-Za-z0-9_.]+",
                     "variant": r"[A-Za-z0-9_.-]+", "pseed": r"[0-9]+", "seed": r"[0-9]+",
                     "experiment": r"[A-Za-z0-9][A-Za-z0-9_.-]*"}

PARTITION_KEYS = ("partition", "alpha", "classes_per_client", "imbalance_ratio", "num_clients", "clients_per_domain",
                  "ways", "shots", "stdev", "train_shots_max", "test_shots")
# keys the sweep itself sets: not allowed in defaults / dataset overrides / variant `config`
AXIS_KEYS = ("method", "variant", "method_params", "dataset", "seed", "partition_seed", "data_root")
TOP_KEYS = ("results", "data_root", "reporting", "defaults", "datasets", "pending_datasets", "heterogeneity",
            "methods", "grids", "ablations", "seeds", "partition_seeds", "threads", "slurm", "mirrors",
            "experiments", "published", "reproduction_report", "report_partial")
ABLATION_KEYS = ("methods", "base_variant", "datasets", "heterogeneity", "seeds", "partition_seeds", "variants")
# The one declaration of the `slurm:` section's keys and defaults: fedhpro.launch.LaunchOptions takes its
# defaults from here; the JSON schema's defaults and the shipped configs are tested against it
# (tests/test_sweep_slurm.py).
SLURM_DEFAULTS: dict[str, Any] = {"launcher": "local", "partition": None, "account": None, "gpus": 1, "cpus": 4,
                                  "mem_gb": 16, "time_min": 240, "signal_delay_s": 120, "max_num_timeout": 3,
                                  "poll_seconds": 30, "additional": {}, "pack_minutes": 30, "run_minutes": None,
                                  "runs_per_gpu": 1}


class SweepConfigError(ConfigError):
    """The workflow config is invalid; the message names the key path (e.g. ``methods.fedprox.default``)."""


# ------------------------------------------------------------------------------------------ ids
def encode_value(value: Any) -> str:
    """A deterministic, wildcard-safe text for a config value (``0.5 -> 0p5``, ``-1e-05 -> m1em05``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value).replace("-", "m")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepConfigError(f"cannot encode the non-finite number {value!r} in an id")
        text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
        return text.lower().replace("-", "m").replace("+", "").replace(".", "p")
    if isinstance(value, str):
        text = re.sub(r"[^A-Za-z0-9_.]+", "_", value).strip("_")
        if not text:
            raise SweepConfigError(f"cannot encode {value!r} in an id")
        return text
    raise SweepConfigError(f"cannot encode {value!r} (a {type(value).__name__}) in an id; use a number, "
                           "string or boolean")


def het_id(cfg: RunConfig) -> str:
    """The heterogeneity id of a resolved config: every field that changes the client split."""
    parts = [cfg.partition]
    if cfg.partition in ("creff", "dirichlet"):
        parts.append(f"a{encode_value(cfg.alpha)}")
    if cfg.partition == "pathological":
        parts.append(f"k{encode_value(cfg.classes_per_client)}")
    if cfg.partition == "domains" and cfg.clients_per_domain is not None:
        parts.append(f"cpd{encode_value(cfg.clients_per_domain)}")
    if cfg.partition == "nway":  # FedProto n-way k-shot: ways, shots, stdev (+ the strides where not default)
        parts += [f"w{encode_value(cfg.ways)}", f"k{encode_value(cfg.shots)}", f"sd{encode_value(cfg.stdev)}"]
        if cfg.train_shots_max != 110:
            parts.append(f"tsm{encode_value(cfg.train_shots_max)}")
        if cfg.test_shots is not None:
            parts.append(f"ts{encode_value(cfg.test_shots)}")
    if cfg.imbalance_ratio != 1.0:
        parts.append(f"rho{encode_value(cfg.imbalance_ratio)}")
    parts.append(f"n{cfg.num_clients}")
    return "-".join(parts)


# ------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class PartitionSpec:
    """One client split: the arguments of `fedhpro.partition.partition_labels` and its directory id.

    Where the data lives (data_root, dataset_options.path) is not part of it: moving the data changes no
    partition (the partition job records the data's content fingerprint instead, and runs check it).
    """

    partition_id: str
    dataset: str
    scheme: str
    num_clients: int
    seed: int
    alpha: float | None
    classes_per_client: int | None
    imbalance_ratio: float
    clients_per_domain: int | None
    dataset_options: str = "{}"  # canonical JSON of the loader options (they can change the data)
    nway: str = ""  # partition 'nway': canonical JSON of its keys (ways, shots, stdev, ...); "" otherwise

    def params(self) -> dict[str, Any]:
        # `nway` only where set, so the params (Snakemake's rerun trigger) of other partitions are unchanged
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "partition_id"
               and not (f.name == "nway" and not self.nway)}
        out["dataset_options"] = json.loads(self.dataset_options)
        return out


@dataclass(frozen=True)
class RunSpec:
    """One training run: where it lives, which split it uses, and its full validated RunConfig."""

    run_id: str  # {dataset}/{het}/{method}/{variant}/ps{partition_seed}_s{seed}
    partition_id: str  # {dataset}/{het}/ps{partition_seed}
    kind: str  # "main" or "ablation"
    dataset: str
    het: str
    method: str
    variant: str
    partition_seed: int
    seed: int
    config: RunConfig = field(compare=False)
    config_hash: str = ""
    source: str = ""  # the config key path the run came from (for messages)
    experiments: tuple[str, ...] = ()  # the experiments whose tables and figures include this run

    @property
    def wildcards(self) -> dict[str, str]:
        return {"dataset": self.dataset, "het": self.het, "method": self.method, "variant": self.variant,
                "pseed": str(self.partition_seed), "seed": str(self.seed)}

    def partition(self) -> PartitionSpec:
        c = self.config
        return PartitionSpec(partition_id=self.partition_id, dataset=c.dataset, scheme=c.partition,
                             num_clients=c.num_clients, seed=c.partition_seed,
                             alpha=c.alpha if c.partition in ("creff", "dirichlet") else None,
                             classes_per_client=c.classes_per_client if c.partition == "pathological" else None,
                             imbalance_ratio=c.imbalance_ratio,
                             clients_per_domain=c.clients_per_domain if c.partition == "domains" else None,
                             nway=json.dumps({k: getattr(c, k) for k in ("ways", "shots", "stdev", "train_shots_max",
                                                                         "test_shots")}, sort_keys=True)
                             if c.partition == "nway" else "",
                             dataset_options=json.dumps({k: v for k, v in dict(c.dataset_options).items()
                                                         if k not in LOCATION_OPTIONS}, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------ checks
def _err(path: str, message: str) -> SweepConfigError:
    return SweepConfigError(f"{path}: {message}" if path else message)


def _mapping(value: Any, path: str, *, allow_none: bool = True) -> dict:
    if value is None and allow_none:
        return {}
    if not isinstance(value, Mapping):
        raise _err(path, f"must be a mapping, got {value!r}")
    return dict(value)


def _int_list(value: Any, path: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _err(path, f"must be a non-empty list of integers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
            raise _err(path, f"must hold integers in [0, 2**32), got {v!r}")
    if len(set(value)) != len(value):
        raise _err(path, f"has duplicates: {list(value)!r}")
    return list(value)


def _check_name(name: Any, path: str, regex: re.Pattern = NAME_RE) -> str:
    if not isinstance(name, str) or not regex.match(name):
        raise _err(path, f"name {name!r} must match {regex.pattern} (letters, digits, '_', '.'"
                   f"{', -' if regex is VARIANT_RE else ''}) so it can be a path component")
    return name


def _check_overrides(overrides: Mapping, path: str, *, forbid: tuple[str, ...] = AXIS_KEYS) -> dict:
    known = {f.name for f in fields(RunConfig)}
    for key in overrides:
        if key in forbid:
            raise _err(f"{path}.{key}", f"config key {key!r} is set by the sweep itself; "
                       + {"seed": "use the top-level 'seeds' list", "partition_seed": "use 'partition_seeds'",
                          "method": "use 'methods'", "variant": "use 'methods'", "method_params": "use 'methods'",
                          "dataset": "use 'datasets'", "data_root": "use the top-level 'data_root'"}[key])
        if key not in known:
            raise _err(f"{path}.{key}", f"unknown config key {key!r}; accepted keys: {', '.join(sorted(known))}")
    return dict(overrides)


def check_slurm(value: Any) -> dict[str, Any]:
    """The `slurm:` section with defaults filled in; raises SweepConfigError naming the key."""
    slurm = _mapping(value, "slurm")
    unknown = sorted(set(slurm) - set(SLURM_DEFAULTS))
    if unknown:
        raise _err(f"slurm.{unknown[0]}", f"unknown key; accepted: {', '.join(SLURM_DEFAULTS)}")
    out = {**SLURM_DEFAULTS, **slurm}
    if out["launcher"] not in LAUNCHERS:
        raise _err("slurm.launcher", f"unknown value {out['launcher']!r}; accepted: {', '.join(LAUNCHERS)}")
    for key in ("partition", "account"):
        if out[key] is not None and (not isinstance(out[key], str) or not out[key]):
            raise _err(f"slurm.{key}", f"must be a non-empty string or null, got {out[key]!r}")
    for key, low in (("gpus", 0), ("cpus", 1), ("time_min", 1), ("signal_delay_s", 0), ("max_num_timeout", 0),
                     ("runs_per_gpu", 1)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise _err(f"slurm.{key}", f"must be an integer >= {low}, got {v!r}")
    for key in ("mem_gb", "poll_seconds"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise _err(f"slurm.{key}", f"must be a number > 0, got {v!r}")
    out["additional"] = _mapping(out["additional"], "slurm.additional")
    v = out["pack_minutes"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise _err("slurm.pack_minutes", f"must be a number >= 0, got {v!r}")
    per_dataset = out["run_minutes"] if isinstance(out["run_minutes"], Mapping) else {"": out["run_minutes"]}
    for name, v in per_dataset.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise _err(f"slurm.run_minutes{'.' + name if name else ''}", f"must be a number > 0 or null, got {v!r}")
    return out


def check_workflow_keys(config: Mapping) -> None:
    """Check the workflow-level keys (everything that is not a RunConfig value)."""
    if not isinstance(config, Mapping):
        raise SweepConfigError("the workflow config must be a mapping")
    unknown = sorted(set(config) - set(TOP_KEYS))
    if unknown:
        raise _err(unknown[0], f"unknown workflow config key; accepted: {', '.join(TOP_KEYS)}")
    for key in ("results", "data_root"):
        if key in config and (not isinstance(config[key], str) or not config[key]):
            raise _err(key, f"must be a non-empty path, got {config[key]!r}")
    rep = _mapping(config.get("reporting"), "reporting")
    unknown = sorted(set(rep) - {"rule", "last_k"})
    if unknown:
        raise _err(f"reporting.{unknown[0]}", "unknown key; accepted: rule, last_k")
    if rep.get("rule", "last_k") not in REPORTING_RULES:
        raise _err("reporting.rule", f"unknown value {rep.get('rule')!r}; accepted: {', '.join(REPORTING_RULES)}")
    last_k = rep.get("last_k", 3)
    if isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1:
        raise _err("reporting.last_k", f"must be an integer >= 1, got {last_k!r}")
    threads = config.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise _err("threads", f"must be an integer >= 1, got {threads!r}")
    check_slurm(config.get("slurm"))
    mirrors = _mapping(config.get("mirrors"), "mirrors")
    for name, entry in mirrors.items():
        _mapping(entry, f"mirrors.{name}")


# ------------------------------------------------------------------------------------------ expansion
def _warn_stderr(message: str) -> None:
    print(f"fedhpro.sweep: warning: {message}", file=sys.stderr)


def _variant_params(spec: Any, path: str) -> tuple[dict, dict]:
    """(method_params, RunConfig overrides) of a variant mapping."""
    spec = _mapping(spec, path)
    overrides = _check_overrides(_mapping(spec.pop("config", None), f"{path}.config"), f"{path}.config")
    return spec, overrides


def _grid_variants(method: str, grid: Any, base: tuple[dict, dict]) -> dict[str, tuple[dict, dict, str]]:
    path = f"grids.{method}"
    grid = _mapping(grid, path)
    if not grid:
        return {}
    keys, value_lists = [], []
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise _err(f"{path}.{key}", f"must be a non-empty list of values, got {values!r}")
        keys.append(key)
        value_lists.append(list(values))
    out: dict[str, tuple[dict, dict, str]] = {}
    for combo in itertools.product(*value_lists):
        params, overrides = dict(base[0]), dict(base[1])
        names = []
        for key, value in zip(keys, combo):
            if key.startswith("config."):
                name = key[len("config."):]
                _check_overrides({name: value}, path)
                overrides[name] = value
            else:
                name = key
                params[key] = value
            names.append(f"{encode_value(name)}-{encode_value(value)}")
        out["_".join(names)] = (params, overrides, path)
    return out


def _dataset_table(config: Mapping, warn: Callable[[str], None]) -> dict[str, tuple[dict, str]]:
    from fedhpro.data import DATASETS

    table: dict[str, tuple[dict, str]] = {}
    datasets = _mapping(config.get("datasets"), "datasets")
    if not datasets and not config.get("pending_datasets"):
        raise _err("datasets", "must name at least one dataset")
    for name, entry in datasets.items():
        _check_name(name, f"datasets.{name}")
        if name not in DATASETS:
            raise _err(f"datasets.{name}", f"unknown dataset {name!r} (no loader registered); registered: "
                       f"{', '.join(sorted(DATASETS))}. List datasets whose loader is not written yet "
                       "under 'pending_datasets'")
        table[name] = (_mapping(entry, f"datasets.{name}"), f"datasets.{name}")
    pending = _mapping(config.get("pending_datasets"), "pending_datasets")
    for name, entry in pending.items():
        _check_name(name, f"pending_datasets.{name}")
        if name in table:
            raise _err(f"pending_datasets.{name}", "also listed under 'datasets'")
        if name not in DATASETS:
            warn(f"skipping pending dataset {name!r}: no loader registered yet (registered: "
                 f"{', '.join(sorted(DATASETS))})")
            continue
        table[name] = (_mapping(entry, f"pending_datasets.{name}"), f"pending_datasets.{name}")
    return table


def _het_list(value: Any, path: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _err(path, f"must be a non-empty list of partition settings, got {value!r}")
    out = []
    for i, entry in enumerate(value):
        entry = _mapping(entry, f"{path}[{i}]", allow_none=False)
        for key in entry:
            if key not in PARTITION_KEYS:
                raise _err(f"{path}[{i}].{key}", f"not a partition setting; accepted: {', '.join(PARTITION_KEYS)}")
        out.append(entry)
    return out


def check_supported(cfg: RunConfig) -> None:
    """What only a job would find out, asked of the engine and method up front (ConfigError naming the key):
    `engine: batched` with a method, mode or setting it does not reproduce; personalized evaluation with no
    local test split."""
    from fedhpro.train import check_run

    check_run(cfg)
    if cfg.engine == "batched":
        from fedhpro.batched import check_batchable as batched_supports
        from fedhpro.methods import METHODS

        names = list(cfg.client_models) or [cfg.model]
        batched_supports(cfg, METHODS[cfg.method].Client, [names[i % len(names)] for i in range(cfg.num_clients)])


def yaml12_numbers(value: Any) -> Any:
    """`value` with strings that are YAML 1.2 / JSON numbers (`1e-3`, read as strings by YAML 1.1 parsers such
    as the one Snakemake loads --configfile with) turned into floats, in mapping values and lists."""
    if isinstance(value, str) and "_" not in value and any(c in value for c in "eE") and FLOAT_RE.match(value):
        return float(value)
    if isinstance(value, Mapping):
        return {k: yaml12_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [yaml12_numbers(v) for v in value]
    return value


def check_config_files(paths) -> None:
    """Parse workflow config files strictly: invalid YAML or a duplicate key (which Snakemake's loader resolves
    silently, last one wins) is a SweepConfigError naming the file and line; a missing file names it too."""
    for path in paths:
        try:
            text = open(path).read()
        except OSError as err:
            raise SweepConfigError(f"config file {path!r} cannot be read: {err.strerror or err}") from None
        try:
            ours = load_yaml_text(text, f"config file {str(path)!r}")
        except ConfigError as err:
            raise SweepConfigError(str(err)) from None
        try:
            snakemakes = yaml12_numbers(yaml.safe_load(text))  # what Snakemake's YAML 1.1 loader makes of it
        except yaml.YAMLError:
            continue
        where = _yaml11_difference(ours, snakemakes)
        if where is not None:
            key, mine, theirs = where
            raise SweepConfigError(f"config file {str(path)!r}: key {key!r}: {mine!r} is read as {theirs!r} by "
                                   f"Snakemake's YAML 1.1 loader but as {mine!r} by YAML 1.2 (as config files and "
                                   "--set are read); write it unambiguously (true/false, 1000, a quoted string)")


def _yaml11_difference(ours: Any, theirs: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first (key, YAML 1.2 value, YAML 1.1 value) where the two readings of one file differ, or None."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for k in ours:
            if k in theirs:
                found = _yaml11_difference(ours[k], theirs[k], f"{key}.{k}" if key else str(k))
                if found:
                    return found
        return None
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            found = _yaml11_difference(a, b, f"{key}[{i}]")
            if found:
                return found
        return None
    same = type(ours) is type(theirs) and (ours == theirs or ours != ours)  # NaN equals itself here
    return None if same else (key or "(top level)", ours, theirs)


def _warn_infeasible(runs: list[RunSpec], config: Mapping, warn: Callable[[str], None]) -> None:
    """Warnings for settings that run but report less than they seem to: last_k beyond the evaluated rounds,
    a long tail that would empty classes (the partition job then refuses it)."""
    from fedhpro.data import DATASETS

    rep = dict(config.get("reporting") or {})
    if rep.get("rule", "last_k") == "last_k" and runs:
        last_k = rep.get("last_k", 3)
        short = min(runs, key=lambda r: r.config.rounds // r.config.eval_every)
        evaluated = short.config.rounds // short.config.eval_every
        if evaluated < last_k:
            warn(f"reporting.last_k: {last_k}, but run {short.run_id} is evaluated in only {evaluated} round(s); "
                 f"its table entries would average fewer rounds than the caption's 'last {last_k} rounds'")
    seen = set()
    for run in runs:
        c = run.config
        spec = DATASETS[c.dataset]
        key = (c.dataset, c.imbalance_ratio)
        if key in seen or c.imbalance_ratio <= 1 or not spec.train_size or not spec.num_classes:
            continue
        seen.add(key)
        if int(spec.train_size / spec.num_classes / c.imbalance_ratio) == 0:
            warn(f"{run.source}: imbalance_ratio {c.imbalance_ratio:g} would leave the rarest classes of "
                 f"{c.dataset!r} ({spec.train_size} samples, {spec.num_classes} classes) with no sample; its "
                 "partition job will refuse it")


Variant = tuple[dict, dict, str]  # (method_params, RunConfig overrides, the config key path that declared it)


@dataclass(frozen=True)
class _Sweep:
    """The checked top of one sweep: what every run of it shares."""

    data_root: str
    defaults: dict
    seeds: list[int]
    pseeds: list[int]
    datasets: dict[str, tuple[dict, str]]  # name -> (entry, key path)
    global_het: list[dict] | None  # None when every dataset sets its own list
    variants: dict[str, dict[str, Variant]]  # method -> variant name -> Variant


@dataclass(frozen=True)
class _DatasetParts:
    """One dataset entry split into its RunConfig overrides, heterogeneity list and methods."""

    overrides: dict
    het_list: list[dict]
    methods: list[str]
    path: str  # datasets.<name> (or pending_datasets.<name>)
    het_path: str  # the key path of its heterogeneity list (its own or the top-level one)


@dataclass(frozen=True)
class _RunRequest:
    """One cell of the sweep before validation: which run, and the config entries it is merged from."""

    kind: str  # "main" or "ablation"
    dataset: str
    parts: _DatasetParts
    het_index: int
    het_entry: dict
    method: str
    variant: str
    spec: Variant
    pseed: int
    seed: int


def _sweep_top(config: Mapping, warn: Callable[[str], None]) -> _Sweep:
    """Check the workflow keys and parse what the runs share (defaults, seeds, datasets, variants)."""
    data_root = config.get("data_root", "data")
    defaults = _check_overrides(_mapping(config.get("defaults"), "defaults"), "defaults")
    seeds = _int_list(config.get("seeds", [0]), "seeds")
    pseeds = _int_list(config.get("partition_seeds", [0]), "partition_seeds")
    datasets = _dataset_table(config, warn)
    # optional when every dataset sets its own list (e.g. an experiment of feature-shift datasets)
    global_het = (_het_list(config.get("heterogeneity"), "heterogeneity")
                  if config.get("heterogeneity") is not None else None)
    return _Sweep(data_root, defaults, seeds, pseeds, datasets, global_het, _method_variants(config))


def _method_variants(config: Mapping) -> dict[str, dict[str, Variant]]:
    """method -> variant name -> Variant: the variants under `methods`, then the grid variants of `grids`."""
    from fedhpro.methods import METHOD_MODULES

    methods_cfg = _mapping(config.get("methods"), "methods")
    if not methods_cfg:
        raise _err("methods", "must name at least one method")
    variants: dict[str, dict[str, Variant]] = {}
    for method, vmap in methods_cfg.items():
        if method not in METHOD_MODULES:
            raise _err(f"methods.{method}", f"unknown method {method!r}; available: {', '.join(METHOD_MODULES)}")
        vmap = _mapping(vmap, f"methods.{method}")
        if not vmap:
            raise _err(f"methods.{method}", "must define at least one variant (e.g. `default: {}`)")
        variants[method] = {}
        for vname, vspec in vmap.items():
            _check_name(vname, f"methods.{method}.{vname}", VARIANT_RE)
            params, overrides = _variant_params(vspec, f"methods.{method}.{vname}")
            variants[method][vname] = (params, overrides, f"methods.{method}.{vname}")
    for method, grid in _mapping(config.get("grids"), "grids").items():
        if method not in variants:
            raise _err(f"grids.{method}", f"method {method!r} is not listed under 'methods'")
        base = variants[method].get("default", ({}, {}, ""))
        for vname, spec in _grid_variants(method, grid, base[:2]).items():
            if vname in variants[method]:
                raise _err(f"grids.{method}", f"grid variant {vname!r} clashes with the variant of that name "
                           f"under methods.{method}")
            variants[method][vname] = spec
    return variants


def _dataset_parts(sweep: _Sweep, name: str) -> _DatasetParts:
    """The parts of dataset `name`'s entry (its own `heterogeneity` / `methods`, else the sweep's)."""
    entry, path = sweep.datasets[name]
    entry = dict(entry)
    own_het = "heterogeneity" in entry
    het = _het_list(entry.pop("heterogeneity"), f"{path}.heterogeneity") if own_het else sweep.global_het
    if het is None:
        raise _err("heterogeneity", f"must be a non-empty list of partition settings (dataset {name} sets "
                   "no heterogeneity of its own)")
    allowed = entry.pop("methods", None)
    if allowed is None:
        allowed = list(sweep.variants)
    elif not isinstance(allowed, list) or any(m not in sweep.variants for m in allowed):
        raise _err(f"{path}.methods", f"must be a list of methods listed under 'methods' "
                   f"({', '.join(sweep.variants)}), got {allowed!r}")
    overrides = _check_overrides(entry, path)
    return _DatasetParts(overrides, het, allowed, path, f"{path}.heterogeneity" if own_het else "heterogeneity")


def _main_requests(sweep: _Sweep):
    """Every main run: dataset x heterogeneity x method x variant x partition seed x seed."""
    for dataset in sweep.datasets:
        parts = _dataset_parts(sweep, dataset)
        for hi, het_entry in enumerate(parts.het_list):
            for method in parts.methods:
                for vname, vspec in sweep.variants[method].items():
                    for pseed in sweep.pseeds:
                        for seed in sweep.seeds:
                            yield _RunRequest("main", dataset, parts, hi, het_entry, method, vname, vspec, pseed,
                                              seed)


def _ablation_sections(config: Mapping) -> list[tuple[Any, str]]:
    """(section, key path): one ablation section (a mapping) or several (a list: e.g. FedHPro's components
    and GFPL's head wiring)."""
    value = config.get("ablations")
    if isinstance(value, list):
        return [(entry, f"ablations[{i}]") for i, entry in enumerate(value)]
    return [(value, "ablations")]


def _ablation_requests(config: Mapping, sweep: _Sweep):
    """Every ablation run of every ablation section, in config order."""
    for abl, apath in _ablation_sections(config):
        abl = _mapping(abl, apath)
        if abl:
            yield from _ablation_section_requests(config, sweep, abl, apath)


def _ablation_section_requests(config: Mapping, sweep: _Sweep, abl: dict, apath: str):
    """The runs of one ablation section: each listed variant of each method, on its datasets, heterogeneity
    settings and seeds, merged over the base variant."""
    from fedhpro.methods import METHOD_MODULES

    unknown = sorted(set(abl) - set(ABLATION_KEYS))
    if unknown:
        raise _err(f"{apath}.{unknown[0]}", f"unknown key; accepted: {', '.join(ABLATION_KEYS)}")
    abl_methods = abl.get("methods", ["fedhpro"])
    if not isinstance(abl_methods, list) or not abl_methods:
        raise _err(f"{apath}.methods", f"must be a non-empty list of methods, got {abl_methods!r}")
    for m in abl_methods:
        if m not in METHOD_MODULES:
            raise _err(f"{apath}.methods", f"unknown method {m!r}; available: {', '.join(METHOD_MODULES)}")
    base_name = abl.get("base_variant", "default")
    abl_variants = _mapping(abl.get("variants"), f"{apath}.variants")
    seeds = _int_list(abl["seeds"], f"{apath}.seeds") if abl.get("seeds") is not None else sweep.seeds
    pseeds = (_int_list(abl["partition_seeds"], f"{apath}.partition_seeds")
              if abl.get("partition_seeds") is not None else sweep.pseeds)
    abl_datasets = abl.get("datasets")
    if abl_datasets is None:
        abl_datasets = list(sweep.datasets)
    if not isinstance(abl_datasets, list):
        raise _err(f"{apath}.datasets", f"must be a list of dataset names, got {abl_datasets!r}")
    pending = _mapping(config.get("pending_datasets"), "pending_datasets")
    for dataset in abl_datasets:
        if dataset not in sweep.datasets:
            if dataset in pending:
                continue  # skipped with a warning by _dataset_table
            raise _err(f"{apath}.datasets", f"dataset {dataset!r} is not listed under 'datasets'")
        parts = _dataset_parts(sweep, dataset)
        indices = _ablation_het_indices(abl.get("heterogeneity"), parts, apath)
        for method in abl_methods:
            base = _ablation_base(sweep.variants.get(method, {}), method, base_name, apath)
            for vname, vspec in abl_variants.items():
                path = f"{apath}.variants.{vname}"
                merged = _ablation_variant(vname, vspec, base, path, sweep.variants.get(method, {}), method)
                for hi in indices:
                    for pseed in pseeds:
                        for seed in seeds:
                            yield _RunRequest("ablation", dataset, parts, hi, parts.het_list[hi], method, vname,
                                              merged, pseed, seed)


def _ablation_het_indices(indices: Any, parts: _DatasetParts, apath: str) -> list[int]:
    """The ablation's `heterogeneity` indices into the dataset's list (all when not given)."""
    het_list = parts.het_list
    if indices is None:
        indices = list(range(len(het_list)))
    if not isinstance(indices, list) or not indices or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(het_list) for i in indices):
        raise _err(f"{apath}.heterogeneity", f"must be a list of indices into {parts.het_path} "
                   f"(0..{len(het_list) - 1}), got {indices!r}")
    return indices


def _ablation_base(method_variants: dict[str, Variant], method: str, base_name: str, apath: str) -> Variant:
    """The variant an ablation modifies: `base_variant` under `methods`, or the method's own defaults."""
    if base_name in method_variants:
        return method_variants[base_name]
    if base_name == "default":
        return ({}, {}, "")  # the method's own defaults
    raise _err(f"{apath}.base_variant", f"{method!r} has no variant {base_name!r} under 'methods'")


def _ablation_variant(vname: str, vspec: Any, base: Variant, path: str, method_variants: dict[str, Variant],
                      method: str) -> Variant:
    """An ablation variant merged over its base; its name may not clash with a variant under `methods`."""
    _check_name(vname, path, VARIANT_RE)
    params, overrides = _variant_params(vspec, path)
    merged = ({**base[0], **params}, {**base[1], **overrides}, path)
    if vname in method_variants:
        raise _err(path, f"clashes with the variant {method}.{vname} under 'methods'; give the ablation another name")
    return merged


def _validated_run(sweep: _Sweep, req: _RunRequest) -> RunSpec:
    """The RunSpec of a request: its RunConfig merged (defaults < dataset < heterogeneity < variant config <
    sweep axes) and validated; a ConfigError becomes a SweepConfigError naming the config entry that set
    the offending key, then the run."""
    params, overrides, vpath = req.spec
    parts = req.parts
    raw = {**sweep.defaults, **parts.overrides, **req.het_entry, **overrides, "method": req.method,
           "variant": req.variant, "method_params": params, "dataset": req.dataset, "data_root": sweep.data_root,
           "seed": req.seed, "partition_seed": req.pseed}
    cell = f"{parts.het_path}[{req.het_index}]"
    where = f"{vpath} (dataset {req.dataset}, {cell}, partition seed {req.pseed}, seed {req.seed})"
    try:
        cfg = from_dict(raw)
        check_supported(cfg)
    except ConfigError as err:
        origin = _error_origin(str(err), sweep, req)
        raise SweepConfigError(f"{origin}: {err} (run {req.method}/{req.variant} on {req.dataset}, {cell}, "
                               f"partition seed {req.pseed}, seed {req.seed}; from {vpath})") from None
    het = het_id(cfg)
    return RunSpec(run_id=layout.run_id(req.dataset, het, req.method, req.variant, req.pseed, req.seed),
                   partition_id=layout.partition_id(req.dataset, het, req.pseed), kind=req.kind,
                   dataset=req.dataset, het=het, method=req.method, variant=req.variant, partition_seed=req.pseed,
                   seed=req.seed, config=cfg, config_hash=cfg.config_hash(), source=where)


def _error_origin(message: str, sweep: _Sweep, req: _RunRequest) -> str:
    """The config entry that set the key a ConfigError names (`config key '<key>'`), most specific first."""
    params, overrides, vpath = req.spec
    match = re.search(r"config key '([A-Za-z0-9_.]+)'", message)
    key = match.group(1) if match else ""
    if key.startswith("method_params."):
        return f"{vpath}.{key.split('.', 1)[1]}" if key.split(".", 1)[1] in params else vpath
    if key in overrides:
        return f"{vpath}.config.{key}"
    if key in req.het_entry:
        return f"{req.parts.het_path}[{req.het_index}].{key}"
    if key in req.parts.overrides:
        return f"{req.parts.path}.{key}"
    if key in sweep.defaults:
        return f"defaults.{key}"
    return vpath


def _add_run(runs: dict[str, RunSpec], partitions: dict, spec: RunSpec) -> None:
    """Add `spec` unless an identical run is already there; the same run id with another config, or a
    partition id with another split, is a SweepConfigError."""
    where = spec.source
    old = runs.get(spec.run_id)
    if old is not None:
        if old.config_hash != spec.config_hash:
            raise SweepConfigError(f"{where}: run {spec.run_id!r} is also produced by {old.source} with a "
                                   "different config; give one of the variants another name")
        return
    register_partition(partitions, spec.partition(), where, where)
    runs[spec.run_id] = spec


def _expand_one(config: Mapping, *, warn: Callable[[str], None] | None = None) -> list[RunSpec]:
    """Every run of one sweep (the top-level keys, or one experiment's), validated (`from_dict`), main runs
    first, then ablations.

    Raises SweepConfigError naming the config entry that set the bad value, then the run, e.g.
    ``methods.fedprox.default.mu: config key 'method_params.mu' (fedprox) must be >= 0.0, got -3.0
    (run fedprox/default on digits, heterogeneity[0], partition seed 0, seed 0; from methods.fedprox.default)``.
    """
    warn = warn or _warn_stderr
    check_workflow_keys(config)
    config = yaml12_numbers(config)
    sweep = _sweep_top(config, warn)
    runs: dict[str, RunSpec] = {}
    partitions: dict[str, tuple[PartitionSpec, str]] = {}
    # generators: each request is validated before the next is parsed, so the first bad entry is reported
    for req in itertools.chain(_main_requests(sweep), _ablation_requests(config, sweep)):
        _add_run(runs, partitions, _validated_run(sweep, req))
    return list(runs.values())


# ------------------------------------------------------------------------------------------ experiments
EXPERIMENT_KINDS = ("comparison", "ablation")
# the sweep keys an experiment block declares for itself (with `experiments:`, never at the top level)
EXPERIMENT_SWEEP_KEYS = ("datasets", "pending_datasets", "heterogeneity", "methods", "grids", "ablations")
EXPERIMENT_KEYS = ("title", "kind", "protocol", "defaults", "seeds", "partition_seeds") + EXPERIMENT_SWEEP_KEYS
LEGACY_EXPERIMENT = "main"  # the one experiment of a config without `experiments:`


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment of the paper: its name (results/tables/<name>/, results/figures/<name>/), title,
    table kind (`comparison` of methods or `ablation` variants against their default) and protocol text
    (stated in every caption)."""

    name: str
    title: str = ""
    kind: str = "comparison"
    protocol: str = ""


def _experiment_blocks(config: Mapping) -> list[tuple[ExperimentSpec, dict, dict]]:
    """(spec, sweep config of the experiment, its block) for every experiment, in config order.

    Without `experiments:`, the top-level sweep is one experiment named `LEGACY_EXPERIMENT`. With it,
    every experiment block is a sweep of its own: its `defaults` are merged over the top-level ones, its
    `seeds` / `partition_seeds` replace the top-level ones, and it declares its own datasets,
    heterogeneity, methods (and grids, ablations); the top level may not set those.
    """
    if not isinstance(config, Mapping):
        raise SweepConfigError("the workflow config must be a mapping")
    experiments = config.get("experiments")
    if experiments is None or experiments == {}:
        return [(ExperimentSpec(LEGACY_EXPERIMENT), dict(config), {})]
    experiments = _mapping(experiments, "experiments")
    for key in EXPERIMENT_SWEEP_KEYS:
        value = config.get(key)
        if key == "ablations":  # the JSON schema fills in an empty section (no variants): nothing declared
            sections = value if isinstance(value, list) else [value]
            value = [s for s in sections if s is not None and (not isinstance(s, Mapping) or s.get("variants"))]
        if value:
            raise _err(key, "is set at the top level next to 'experiments'; with experiments every dataset, "
                       "heterogeneity setting, method, grid and ablation belongs to an experiment: move it into "
                       "the experiment block(s) that use it")
    top_defaults = _mapping(config.get("defaults"), "defaults")
    shared = {k: v for k, v in config.items() if k not in EXPERIMENT_SWEEP_KEYS + ("experiments", "defaults")}
    out = []
    for name, block in experiments.items():
        path = f"experiments.{name}"
        _check_name(name, path, VARIANT_RE)
        block = _mapping(block, path, allow_none=False)
        unknown = sorted(set(block) - set(EXPERIMENT_KEYS))
        if unknown:
            raise _err(f"{path}.{unknown[0]}", f"unknown experiment key; accepted: {', '.join(EXPERIMENT_KEYS)}")
        for key in ("title", "protocol"):
            if not isinstance(block.get(key, ""), str):
                raise _err(f"{path}.{key}", f"must be a string, got {block[key]!r}")
        kind = block.get("kind", "comparison")
        if kind not in EXPERIMENT_KINDS:
            raise _err(f"{path}.kind", f"unknown value {kind!r}; accepted: {', '.join(EXPERIMENT_KINDS)}")
        if not block.get("datasets") and not block.get("pending_datasets"):
            raise _err(f"{path}.datasets", "must name at least one dataset (or pending dataset)")
        sub = dict(shared)
        sub["defaults"] = {**top_defaults, **_mapping(block.get("defaults"), f"{path}.defaults")}
        for key in EXPERIMENT_SWEEP_KEYS + ("seeds", "partition_seeds"):
            if key in block:
                sub[key] = block[key]
        if "datasets" not in sub:
            sub["datasets"] = {}
        spec = ExperimentSpec(name, block.get("title", "").strip(), kind, " ".join(block.get("protocol", "").split()))
        out.append((spec, sub, block))
    if not out:
        raise _err("experiments", "must declare at least one experiment")
    return out


def experiments_of(config: Mapping) -> dict[str, ExperimentSpec]:
    """name -> ExperimentSpec of every experiment (no runs expanded; cheap)."""
    return {spec.name: spec for spec, _, _ in _experiment_blocks(config)}


def _prefix_error(err: SweepConfigError, spec: ExperimentSpec, block: dict) -> SweepConfigError:
    """Prefix a key path from an experiment's sweep with `experiments.<name>.` (unless it names a top-level key)."""
    text = str(err)
    if spec.name == LEGACY_EXPERIMENT and not block:
        return err
    head = text.split(":", 1)[0]
    root = head.split(".", 1)[0].split("[", 1)[0]
    top_level = root not in EXPERIMENT_SWEEP_KEYS + ("seeds", "partition_seeds") and not (
        root == "defaults" and head.split(".", 1)[-1] in _mapping(block.get("defaults"), "defaults"))
    if root in ("seeds", "partition_seeds") and root in block:
        top_level = False
    if top_level:
        return err
    return SweepConfigError(f"experiments.{spec.name}.{text}")


def expand_sweep(config: Mapping, *, warn: Callable[[str], None] | None = None) -> list[RunSpec]:
    """Every run of the workflow config, validated (`from_dict`), experiment by experiment.

    A run that two experiments declare identically (same run id, same config) is one run listed in both
    (`RunSpec.experiments`); the same run id with a different config, or one partition id with a different
    split, is an error naming both experiments.

    Raises SweepConfigError naming the config entry that set the bad value, then the run, e.g.
    ``methods.fedprox.default.mu: config key 'method_params.mu' (fedprox) must be >= 0.0, got -3.0
    (run fedprox/default on digits, heterogeneity[0], partition seed 0, seed 0; from methods.fedprox.default)``
    (with `experiments:` prefixed by ``experiments.<name>.``).
    """
    runs: dict[str, RunSpec] = {}
    partitions: dict[str, tuple[PartitionSpec, str]] = {}
    for spec, sub, block in _experiment_blocks(config):
        try:
            expanded = _expand_one(sub, warn=warn)
        except SweepConfigError as err:
            raise _prefix_error(err, spec, block) from None
        for run in expanded:
            where = f"experiment {spec.name} ({run.source})"
            old = runs.get(run.run_id)
            if old is not None:
                if old.config_hash != run.config_hash:
                    raise SweepConfigError(f"experiments.{spec.name}: run {run.run_id!r} is also declared by "
                                           f"experiment(s) {', '.join(old.experiments)} with a different config "
                                           f"({old.source}); give one of the variants another name")
                if spec.name not in old.experiments:
                    kind = "main" if "main" in (old.kind, run.kind) else old.kind
                    runs[run.run_id] = replace(old, experiments=old.experiments + (spec.name,), kind=kind)
                continue
            register_partition(partitions, run.partition(), where, f"experiments.{spec.name}")
            runs[run.run_id] = replace(run, experiments=(spec.name,))
    return list(runs.values())


def pending_datasets_of(config: Mapping) -> set[str]:
    """Names listed under `pending_datasets`, at the top level or in any experiment (their download plan is lenient)."""
    names = set(_mapping(config.get("pending_datasets"), "pending_datasets"))
    for spec, sub, _ in _experiment_blocks(config):
        names |= set(_mapping(sub.get("pending_datasets"), f"experiments.{spec.name}.pending_datasets"))
    return names


def register_partition(partitions: dict, part: "PartitionSpec", where: str, context: str) -> None:
    """Record `part` (declared at `where`); one partition id with two different splits is a SweepConfigError
    naming `context` and the other declaration."""
    known = partitions.get(part.partition_id)
    if known is not None and known[0] != part:
        raise SweepConfigError(f"{context}: partition {part.partition_id!r} would be shared with {known[1]}, "
                               f"whose split differs ({known[0].params()} vs {part.params()})")
    partitions.setdefault(part.partition_id, (part, where))


def runs_by_experiment(runs: list[RunSpec]) -> dict[str, list[RunSpec]]:
    """experiment name -> its runs (in expansion order)."""
    out: dict[str, list[RunSpec]] = {}
    for run in runs:
        for name in run.experiments:
            out.setdefault(name, []).append(run)
    return out


def partitions_of(runs: list[RunSpec]) -> dict[str, PartitionSpec]:
    """partition id -> its PartitionSpec (one per distinct split)."""
    out: dict[str, PartitionSpec] = {}
    for run in runs:
        out.setdefault(run.partition_id, run.partition())
    return out


def validate_workflow_config(config: Mapping, *, warn: Callable[[str], None] | None = None) -> list[RunSpec]:
    """Check the workflow-level keys and validate every run's RunConfig; returns the runs.

    Raises SweepConfigError (a ConfigError) for the first problem, naming the key path and context.
    """
    runs = expand_sweep(config, warn=warn)
    if not runs:
        raise SweepConfigError("the config expands to no runs")
    _warn_infeasible(runs, config, warn or _warn_stderr)
    return runs


def workflow_run(config: Mapping, wildcards: Mapping[str, str]) -> RunSpec:
    """The RunSpec (full config, data location included) of a rule's wildcards; scripts use it because the
    rule's params hold only the canonical config (no data location: moving data must not rerun anything)."""
    runs = validate_workflow_config(config, warn=lambda message: None)
    w = dict(wildcards)
    if "method" in w:
        run_id = layout.run_id_of(w)
        found = [r for r in runs if r.run_id == run_id]
    else:
        pid = layout.partition_id_of(w)
        found = [r for r in runs if r.partition_id == pid]
    if not found:
        raise SweepConfigError(f"{w} is not a run or partition of this workflow config")
    return found[0]
