"""One frozen, flat, validated config per federated run.

A `RunConfig` is everything that determines a run's numbers. It is loaded from
YAML/JSON, validated with one-line errors that name the key and the accepted
values, and saved into the run directory together with the git SHA, package
versions and a hash of its canonical JSON (see `fedhpro.runinfo`).

Method hyperparameters live in each method module's `Params` dataclass; the
config stores them fully resolved (defaults filled in), so the saved config is
self-describing. Its hash (and the canonical JSON Snakemake compares to decide reruns) covers every
value that differs from its default, so adding a key with a default leaves existing runs' hashes, and
their results on disk, valid. Policy that follows: a default is never changed in place; a new
behaviour gets a new value (or key) instead. Where a method's behaviour itself changes under
unchanged parameters (a fix), its module appends one line to `REVISIONS`; the revision number
(`method_revision`, from 1 on) enters the canonical dict and so the hash, and a config written for
an older revision (a saved canonical JSON, a metrics file's metadata) is refused by `from_dict`
with the change that made it stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedhpro.errors import ConfigError  # noqa: F401  (raised by every check; importable from here)


REVISION_KEY = "method_revision"  # not a RunConfig field: the method module's behaviour revision (see above)


PARTITION_SCHEMES = ("creff", "dirichlet", "pathological", "iid", "domains")
EVAL_MODES = ("global", "personalized")
AUGMENTS = ("auto", "none", "crop_flip", "flip")
AUGMENT_GRANULARITY = ("batch", "sample")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("sequential", "batched")
OPTIMIZERS = ("sgd",)
PRECISIONS = ("fp32", "bf16", "fp16")
CLIENT_STORES = ("memory", "disk")
# Where the data lives is not what a run is: these keys stay out of the config hash and the canonical JSON
# (Snakemake's rerun trigger); the data is identified by its content (`fedhpro.data.fingerprint`) instead.
LOCATION_KEYS = ("data_root",)
LOCATION_OPTIONS = ("path",)  # dataset_options that say where the data is, not what it is


@dataclass(frozen=True)
class RunConfig:
    # -- what is trained
    method: str = "fedavg"
    variant: str = "default"  # a name for this set of method_params, used in run ids and tables
    method_params: Mapping[str, Any] = field(default_factory=dict)
    eval_mode: str = "global"  # global: weights averaged, global test; personalized: per-client models
    # -- data and its split over clients
    dataset: str = "digits"
    dataset_options: Mapping[str, Any] = field(default_factory=dict)  # loader options, e.g. {domains: [mnist, usps]}
    data_root: str = "data"
    partition: str = "dirichlet"
    alpha: float | None = 0.5
    classes_per_client: int | None = None
    imbalance_ratio: float = 1.0  # rho >= 1; 1 = no long-tail selection
    num_clients: int = 10
    clients_per_domain: int | None = None  # `domains` scheme only
    partition_seed: int = 0
    local_test_fraction: float | None = None  # None: 0 in global mode, 0.25 in personalized mode
    # -- model
    model: str = "auto"  # auto = the dataset's default model
    client_models: tuple[str, ...] = ()  # model heterogeneity: assigned round-robin (personalized only)
    feature_dim: int | None = None  # None = the model's natural feature size
    # -- optimisation
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    clients_per_round: int | None = None  # None = all clients every round
    augment: str = "auto"
    augment_per: str = "batch"  # official FedHPro: one crop/flip shared by the whole batch
    # -- execution
    engine: str = "sequential"  # sequential | batched (identical-architecture clients trained in one vmap)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for local training and evaluation (fp16 adds loss scaling)
    channels_last: bool = False  # image models and batches in channels-last memory format
    client_store: str = "memory"  # memory | disk: where per-client state lives between rounds (disk: run dir)
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    checkpoint_every: int = 1
    test_batch_size: int = 500
    diagnostics: bool = True  # prototype separation/consistency columns on evaluated rounds (no-grad passes)

    # ------------------------------------------------------------------ derived
    @property
    def effective_local_test_fraction(self) -> float:
        if self.local_test_fraction is not None:
            return self.local_test_fraction
        return 0.25 if self.eval_mode == "personalized" else 0.0

    @property
    def effective_clients_per_round(self) -> int:
        return self.num_clients if self.clients_per_round is None else self.clients_per_round

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["method_params"] = dict(self.method_params)
        out["dataset_options"] = dict(self.dataset_options)
        out["client_models"] = list(self.client_models)
        return out

    def canonical_dict(self) -> dict[str, Any]:
        """The values that differ from their defaults (method_params: from the method's defaults), plus the
        method's behaviour revision when it is above 0."""
        from fedhpro.methods import method_revision, resolve_params  # late import: methods import torch

        defaults = RunConfig().to_dict()
        out = {k: v for k, v in self.to_dict().items()
               if k not in ("method_params",) + LOCATION_KEYS and v != defaults[k]}
        options = {k: v for k, v in out.pop("dataset_options", {}).items() if k not in LOCATION_OPTIONS}
        if options:
            out["dataset_options"] = options
        method_defaults = resolve_params(self.method, {})
        params = {k: v for k, v in self.method_params.items() if method_defaults.get(k, object()) != v}
        if params:
            out["method_params"] = params
        revision = method_revision(self.method)
        if revision:
            out[REVISION_KEY] = revision
        return out

    def provenance_dict(self) -> dict[str, Any]:
        """`to_dict()` plus the method's behaviour revision: what run records (config.json, metrics
        metadata) store, so a result computed by an earlier revision is recognised as stale."""
        from fedhpro.methods import method_revision

        return {**self.to_dict(), REVISION_KEY: method_revision(self.method)}

    def canonical_json(self) -> str:
        return json.dumps(self.canonical_dict(), sort_keys=True, separators=(",", ":"), default=str)

    def config_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunConfig":
        return from_dict({**self.to_dict(), **changes})


# ---------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Load and validate a run config from a YAML or JSON file (plus optional key overrides)."""
    raw = load_raw(path)
    for key, value in (overrides or {}).items():
        if key == "method_params":
            raw["method_params"] = {**(raw.get("method_params") or {}), **value}
        else:
            raw[key] = value
    return from_dict(raw)


# YAML 1.2 / JSON numbers: PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; a user writing
# `lr: 1e-3` (or valid JSON `1e-2`, or `--set lr=1e-3`) means the number.
_FLOAT_RE = re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*)\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
                       r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (YAML would silently keep the last)."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 / JSON floats (`1e-3` is a number) and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if first is not None:
                    raise DuplicateKeyError(
                        None, None, f"duplicate key {key!r} (first at line {first.line + 1}, again at line "
                        f"{key_node.start_mark.line + 1}); YAML would silently keep the last one", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


StrictLoader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def load_yaml_text(text: str, source: str = "<text>") -> Any:
    """Parse YAML/JSON text with `StrictLoader`; ConfigError naming `source` (one line) if it is invalid."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except DuplicateKeyError as err:
        line = f" line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise ConfigError(f"{source}:{line} {err.problem}") from None
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML/JSON{where}: {problem}") from None


def load_raw(path: str | Path) -> dict[str, Any]:
    """The YAML/JSON mapping of a config file, unvalidated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    raw = load_yaml_text(text, f"config file {str(path)!r}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return raw


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a plain mapping and build the frozen config (method params resolved)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config must be a mapping of keys to values")
    known = {f.name: f for f in fields(RunConfig)}
    revision = raw.get(REVISION_KEY)
    raw = {k: v for k, v in raw.items() if k != REVISION_KEY}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; accepted keys: {', '.join(sorted(known))}")
    values = {name: _coerce(name, raw[name], known[name]) for name in raw}
    values.setdefault("method", RunConfig.method)
    cfg = RunConfig(**values)
    _validate(cfg)
    from fedhpro.methods import resolve_params  # late import: methods import torch

    if revision is not None:
        check_revision(cfg.method, revision)
    params = resolve_params(cfg.method, cfg.method_params)
    return dataclasses.replace(cfg, method_params=params)


def check_revision(method: str, revision: Any, where: str = "config") -> None:
    """Refuse a config (or result) written for another behaviour revision of `method`, saying what changed."""
    from fedhpro.methods import method_revision, revision_changes

    current = method_revision(method)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise ConfigError(f"config key {REVISION_KEY!r} must be a revision number >= 0, got {revision!r}")
    if revision != current:
        changes = "; ".join(revision_changes(method, revision)) if revision < current else "unknown to this code"
        raise ConfigError(f"{where} was made by behaviour revision {revision} of method {method!r}, this code is at "
                          f"revision {current} ({changes}); its results are stale: rerun it")


_INT_KEYS = {"classes_per_client", "num_clients", "clients_per_domain", "partition_seed", "feature_dim",
             "rounds", "local_epochs", "batch_size", "clients_per_round", "seed", "eval_every",
             "checkpoint_every", "test_batch_size"}
_FLOAT_KEYS = {"alpha", "imbalance_ratio", "local_test_fraction", "lr", "momentum", "weight_decay"}
_STR_KEYS = {"method", "variant", "eval_mode", "dataset", "data_root", "partition", "model", "optimizer",
             "augment", "augment_per", "device", "engine", "precision", "client_store"}
_BOOL_KEYS = {"channels_last", "diagnostics"}


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    if value is None:
        if name in ("alpha", "classes_per_client", "clients_per_domain", "local_test_fraction",
                    "feature_dim", "clients_per_round"):
            return None
        raise ConfigError(f"config key {name!r} must not be null")
    if name in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {name!r} must be true or false, got {value!r}")
        return value
    if name in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {name!r} must be an integer, got {value!r}")
        return value
    if name in _FLOAT_KEYS:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()) and "_" not in value:
            value = float(value)  # `1e-3` read as a string by a YAML 1.1 parser (e.g. Snakemake's config loader)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {name!r} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"config key {name!r} must be finite, got {value!r}")
        return float(value)
    if name in _STR_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config key {name!r} must be a non-empty string, got {value!r}")
        return value
    if name in ("method_params", "dataset_options"):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key {name!r} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if name == "client_models":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v for v in value):
            raise ConfigError(f"config key 'client_models' must be a list of model names, got {value!r}")
        return tuple(value)
    raise AssertionError(name)  # pragma: no cover - every field is covered above


def _choice(name: str, value: str, accepted: tuple[str, ...] | list[str]) -> None:
    if value not in accepted:
        raise ConfigError(f"config key {name!r}: unknown value {value!r}; accepted: {', '.join(accepted)}")


def _positive(cfg: RunConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"config key {name!r} must be > 0, got {value!r}")


def _validate(cfg: RunConfig) -> None:
    from fedhpro.data import DATASETS
    from fedhpro.methods import METHODS, check_supported
    from fedhpro.models import MODELS

    _choice("method", cfg.method, sorted(METHODS))
    _choice("eval_mode", cfg.eval_mode, EVAL_MODES)
    _choice("dataset", cfg.dataset, sorted(DATASETS))
    _choice("partition", cfg.partition, PARTITION_SCHEMES)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("augment", cfg.augment, AUGMENTS)
    _choice("augment_per", cfg.augment_per, AUGMENT_GRANULARITY)
    _choice("engine", cfg.engine, ENGINES)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("client_store", cfg.client_store, CLIENT_STORES)
    _choice("device", cfg.device.split(":")[0], DEVICES)
    if cfg.model != "auto":
        _choice("model", cfg.model, sorted(MODELS))
    for name in cfg.client_models:
        _choice("client_models", name, sorted(MODELS))
    _positive(cfg, "num_clients", "rounds", "local_epochs", "batch_size", "lr", "eval_every",
              "checkpoint_every", "test_batch_size", "clients_per_round", "feature_dim", "classes_per_client",
              "clients_per_domain")
    for name in ("momentum", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(cfg, name)!r}")
    for name in ("seed", "partition_seed"):
        if not 0 <= getattr(cfg, name) < 2**32:
            raise ConfigError(f"config key {name!r} must be in [0, 2**32), got {getattr(cfg, name)!r}")
    if cfg.imbalance_ratio < 1:
        raise ConfigError(f"config key 'imbalance_ratio' must be >= 1 (rho), got {cfg.imbalance_ratio!r}")
    if cfg.local_test_fraction is not None and not 0 <= cfg.local_test_fraction < 1:
        raise ConfigError(f"config key 'local_test_fraction' must be in [0, 1), got {cfg.local_test_fraction!r}")
    if cfg.clients_per_round is not None and cfg.clients_per_round > cfg.num_clients:
        raise ConfigError(f"config key 'clients_per_round' ({cfg.clients_per_round}) must be <= num_clients "
                          f"({cfg.num_clients})")
    if cfg.partition in ("creff", "dirichlet") and cfg.alpha is None:
        raise ConfigError(f"config key 'alpha' is required for partition {cfg.partition!r}")
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise ConfigError(f"config key 'alpha' must be > 0, got {cfg.alpha!r}")
    if cfg.partition == "pathological" and cfg.classes_per_client is None:
        raise ConfigError("config key 'classes_per_client' is required for partition 'pathological'")
    if cfg.partition == "creff" and cfg.num_clients < 10:
        raise ConfigError("config key 'num_clients' must be >= 10 for partition 'creff' "
                          "(the official split uses groups of 10 workers)")
    spec = DATASETS[cfg.dataset]
    import inspect

    accepted = [n for n, p in inspect.signature(spec.loader).parameters.items()
                if n != "root" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in cfg.dataset_options:
        if key not in accepted:
            raise ConfigError(f"config key 'dataset_options.{key}' is not an option of dataset {cfg.dataset!r}; "
                              f"accepted: {', '.join(accepted) or '(none)'}")
    if spec.train_size is not None and cfg.num_clients > spec.train_size:
        raise ConfigError(f"config key 'num_clients' ({cfg.num_clients}) exceeds the {spec.train_size} training "
                          f"samples of dataset {cfg.dataset!r}")
    if cfg.classes_per_client is not None and cfg.classes_per_client > spec.num_classes:
        raise ConfigError(f"config key 'classes_per_client' ({cfg.classes_per_client}) exceeds the "
                          f"{spec.num_classes} classes of dataset {cfg.dataset!r}")
    if cfg.partition == "domains" and not spec.domains:
        raise ConfigError(f"config key 'partition': 'domains' needs a multi-domain dataset; {cfg.dataset!r} has none")
    if cfg.client_models and cfg.eval_mode != "personalized":
        raise ConfigError("config key 'client_models' (model heterogeneity) needs eval_mode 'personalized'")
    check_supported(cfg)  # what the method declares it supports: modes, engines, heterogeneous models
