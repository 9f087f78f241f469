"""One frozen, flat, validated config per federated run.

A `RunConfig` is everything that determines a run's numbers. Each key is declared
once, with `fedhpro.params.param` (default, one line of help, choices, bounds), as
the methods declare their hyperparameters; `fedhpro config` lists them. It is
loaded from YAML/JSON, each value checked against its declaration by the checker
method parameters go through too (`fedhpro.params.check_value`), the checks across
keys made here (`_validate`), with one-line errors that name the key and the
accepted values, and saved into the run directory together with the git SHA, package
versions and a hash of its canonical JSON (see `fedhpro.runio`).

Method hyperparameters live in each method module's `Params` dataclass; the
config stores them fully resolved (defaults filled in), so the saved config is
self-describing. Its hash (and the canonical JSON Snakemake compares to decide reruns) covers every
value that differs from its default, except where the data lives (`LOCATION_KEYS`) and how the run is
executed (`EXECUTION_KEYS`: they change no number), so adding a key with a default leaves existing runs' hashes, and
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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedhpro.errors import ConfigError  # noqa: F401  (raised by every check; importable from here)
from fedhpro.params import FLOAT_RE, check_value, declared_fields, param


REVISION_KEY = "method_revision"  # not a RunConfig field: the method module's behaviour revision (see above)


EVAL_MODES = ("global", "personalized")
AUGMENTS = ("auto", "none", "crop_flip", "flip")
AUGMENT_GRANULARITY = ("batch", "sample")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("sequential", "batched")
OPTIMIZERS = ("sgd",)
PRECISIONS = ("fp32", "bf16", "fp16")
# torch.compile modes of the local-training forward pass (`fedhpro.local.training_forward`); none: eager
COMPILE_MODES = ("none", "default", "reduce-overhead")
CLIENT_STORES = ("memory", "disk")
# Where the data lives is not what a run is: these keys stay out of the config hash and the canonical JSON
# (Snakemake's rerun trigger); the data is identified by its content (`fedhpro.data.fingerprint`) instead.
LOCATION_KEYS = ("data_root",)
LOCATION_OPTIONS = ("path",)  # dataset_options that say where the data is, not what it is
# How a run is executed, never what it computes: each is proved by a test to leave every training number
# unchanged (client_store: tests/test_clientstore.py; diagnostics, diagnostics_every: tests/test_diagnostics.py,
# they only fill or skip the diagnostics columns; checkpoint_every: tests/test_run_identity.py). They are recorded
# (config.json, the metrics' metadata) but stay out of the config hash and the canonical JSON, so switching one
# reruns nothing; a finished run keeps the values it was computed with (docs/run-identity.md).
EXECUTION_KEYS = ("client_store", "diagnostics", "diagnostics_every", "checkpoint_every")


def _scheme_names() -> tuple[str, ...]:
    from fedhpro.partition import SCHEMES  # the one declaration of every partition scheme

    return tuple(SCHEMES)


def _method_names() -> tuple[str, ...]:
    from fedhpro.methods import METHOD_MODULES

    return tuple(sorted(METHOD_MODULES))


def _dataset_names() -> tuple[str, ...]:
    from fedhpro.data import DATASETS  # late import: loads every dataset's loader module

    return tuple(sorted(DATASETS))


def _model_names() -> tuple[str, ...]:
    from fedhpro.models import MODELS  # late import: loads the model registries

    return tuple(sorted(MODELS))


def _model_names_or_auto() -> tuple[str, ...]:
    return ("auto",) + _model_names()


@dataclass(frozen=True)
class RunConfig:
    """Every key declared once with `param`: default, help, accepted values (`fedhpro config` lists them)."""

    # -- what is trained
    method: str = param("fedavg", "federated learning method (see `fedhpro methods`)", choices=_method_names)
    variant: str = param("default", "name of this set of method_params, used in run ids and tables")
    method_params: Mapping[str, Any] = param(default_factory=dict, help="the method's hyperparameters (see "
                                             "`fedhpro config --method NAME`); unset ones take their defaults")
    eval_mode: str = param("global", "global: weights averaged, global test set; personalized: per-client models "
                           "and local test sets", choices=EVAL_MODES)
    # -- data and its split over clients
    dataset: str = param("digits", "registered dataset (see `fedhpro datasets`)", choices=_dataset_names)
    dataset_options: Mapping[str, Any] = param(default_factory=dict, help="the dataset loader's options, e.g. "
                                               "{domains: [mnist, usps]}")
    data_root: str = param("data", "dataset root; downloads go to <data_root>/<dataset>/raw (not in the hash)")
    partition: str = param("dirichlet", "client split: a scheme declared in fedhpro.partition.SCHEMES (creff: long "
                           "tail + Dirichlet; pathological: classes per client; domains: one domain per client "
                           "group; nway: FedProto n-way k-shot)", choices=_scheme_names)
    alpha: float | None = param(0.5, "Dirichlet concentration (creff, dirichlet)", low=0, low_inclusive=False,
                                finite=True)
    classes_per_client: int | None = param(None, "classes per client (pathological)", low=0, low_inclusive=False)
    imbalance_ratio: float = param(1.0, "long-tail ratio rho (1 = no long-tail selection)", low=1, finite=True)
    num_clients: int = param(10, "number of clients", low=0, low_inclusive=False)
    clients_per_domain: int | None = param(None, "clients per domain (domains scheme only)", low=0,
                                           low_inclusive=False)
    ways: int | None = param(None, "nway: mean classes per client (FedProto --ways)", low=0, low_inclusive=False)
    shots: int = param(100, "nway: mean training samples per class and client (FedProto --shots)", low=0,
                       low_inclusive=False)
    stdev: int = param(2, "nway: spread of ways and shots (FedProto --stdev)", low=0)
    train_shots_max: int = param(110, "nway: stride of the clients' blocks in each class (FedProto "
                                 "--train_shots_max)", low=0, low_inclusive=False)
    test_shots: int | None = param(None, "nway: local test samples per class, from the test split (null: "
                                   "FedProto's for the dataset: MNIST 40, CIFAR-100 5, else 15)", low=0,
                                   low_inclusive=False)
    partition_seed: int = param(0, "seed of the client split", low=0, high=2**32, high_inclusive=False)
    local_test_fraction: float | None = param(None, "share of each client's data held out as its local test set "
                                              "(null: 0 in global mode, 0.25 in personalized mode)", low=0,
                                              high=1, high_inclusive=False, finite=True)
    # -- model
    model: str = param("auto", "model architecture (auto = the dataset's default model)",
                       choices=_model_names_or_auto)
    client_models: tuple[str, ...] = param((), "model heterogeneity: client architectures, assigned round-robin "
                                           "(personalized only)", choices=_model_names)
    feature_dim: int | None = param(None, "feature size before the classifier (null = the model's natural size)",
                                    low=0, low_inclusive=False)
    # -- optimisation
    rounds: int = param(10, "communication rounds", low=0, low_inclusive=False)
    local_epochs: int = param(1, "local epochs per round", low=0, low_inclusive=False)
    batch_size: int = param(64, "local training batch size (at least 2: a batch of one sample is never trained, "
                            "fedhpro.local.keeps_batch, so 1 would train nothing)", low=2)
    optimizer: str = param("sgd", "local optimizer", choices=OPTIMIZERS)
    lr: float = param(0.1, "local learning rate", low=0, low_inclusive=False, finite=True)
    momentum: float = param(0.0, "local SGD momentum", low=0, finite=True)
    weight_decay: float = param(0.0, "local SGD weight decay", low=0, finite=True)
    clients_per_round: int | None = param(None, "clients sampled per round (null = all clients every round)",
                                          low=0, low_inclusive=False)
    augment: str = param("auto", "training augmentation (auto = the dataset's default)", choices=AUGMENTS)
    augment_per: str = param("batch", "augmentation drawn per batch (official FedHPro: one crop/flip for the "
                             "whole batch) or per sample", choices=AUGMENT_GRANULARITY)
    # -- execution
    engine: str = param("sequential", "local training: sequential, or batched (identical-architecture clients "
                        "trained in one vmap)", choices=ENGINES)
    precision: str = param("fp32", "autocast for local training and evaluation (fp16 adds loss scaling)",
                           choices=PRECISIONS)
    channels_last: bool = param(False, "image models and batches in channels-last memory format")
    compile: str = param("none", "torch.compile the model's forward (and so backward) pass in local training: "
                         "none (eager), default, reduce-overhead (adds CUDA graphs; CUDA only). Fused kernels "
                         "round differently, so it is part of the run's identity", choices=COMPILE_MODES)
    client_store: str = param("memory", "where per-client state lives between rounds (disk: the run directory)",
                              choices=CLIENT_STORES)
    seed: int = param(0, "training seed", low=0, high=2**32, high_inclusive=False)
    device: str = param("auto", "auto, cpu, cuda or cuda:N")
    eval_every: int = param(1, "evaluate every this many rounds", low=0, low_inclusive=False)
    checkpoint_every: int = param(1, "checkpoint every this many rounds", low=0, low_inclusive=False)
    test_batch_size: int = param(500, "evaluation batch size", low=0, low_inclusive=False)
    diagnostics: bool = param(True, "prototype separation/consistency columns on evaluated rounds (no-grad "
                              "passes)")
    diagnostics_every: int = param(5, "prototype diagnostics on every this many rounds and the last one (when "
                                      "evaluated): about 1% of a round instead of 5-15% on small data",
                                   low=0, low_inclusive=False)

    # ------------------------------------------------------------------ derived
    @property
    def effective_local_test_fraction(self) -> float:
        from fedhpro.partition import SCHEMES

        if SCHEMES[self.partition].local_tests is not None:  # nway: FedProto's, from the test split
            return 0.0
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
        """The run's identity: the values that differ from their defaults (method_params: from the method's
        defaults), data location and execution keys left out, plus the method's behaviour revision when above 0."""
        from fedhpro.methods import method_revision, resolve_params  # late import: loads the method's module

        defaults = RunConfig().to_dict()
        out = {k: v for k, v in self.to_dict().items()
               if k not in ("method_params",) + LOCATION_KEYS + EXECUTION_KEYS and v != defaults[k]}
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
            for where, given in (("--set method_params", value), (f"method_params in {path}", raw.get("method_params"))):
                if given is not None and not isinstance(given, Mapping):
                    raise ConfigError(f"{where} must be a mapping of method keys to values, e.g. "
                                      f"method_params={{mu: 0.01}}, got {given!r}")
            raw["method_params"] = {**(raw.get("method_params") or {}), **value}
        else:
            raw[key] = value
    return from_dict(raw)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (YAML would silently keep the last)."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader reading YAML 1.2 (core schema) scalars, as JSON does, and refusing duplicate keys. PyYAML follows
    YAML 1.1, where `1e-3` is a string, `yes`/`on` are true, `1_000` is 1000 and `010` is 8; here `1e-3` is a
    number, `true`/`false` are the only booleans, an integer is decimal (or 0o/0x) without underscores, and
    everything else is a string (which the key's declared type then refuses, naming the key)."""

    def construct_yaml_int(self, node):  # YAML 1.1 would read a leading 0 as octal and drop underscores
        value = self.construct_scalar(node)
        return int(value, 0) if value.lstrip("+-")[:2] in ("0o", "0x") else int(value, 10)

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


_YAML12_CORE = (  # YAML 1.2 core schema resolvers, tried in this order (an integer before a float)
    ("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")),
    ("tag:yaml.org,2002:float", FLOAT_RE, list("-+0123456789.")),
)
_YAML11_ONLY = {"tag:yaml.org,2002:timestamp"} | {tag for tag, _, _ in _YAML12_CORE}
StrictLoader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in _YAML11_ONLY]
                                        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _regex, _first in _YAML12_CORE:
    StrictLoader.add_implicit_resolver(_tag, _regex, _first)
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


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
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    raw = load_yaml_text(text, f"config file {str(path)!r}")
    if raw is None:  # an empty file (or only comments): surely not meant as "every default"
        raise ConfigError(f"config file {str(path)!r} is empty; write the run's keys in it (`fedhpro config` lists "
                          "them), e.g. method: fedavg and dataset: digits")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return raw


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a plain mapping and build the frozen config (method params resolved)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config must be a mapping of keys to values")
    known = declared_fields(RunConfig)
    revision = raw.get(REVISION_KEY)
    raw = {k: v for k, v in raw.items() if k != REVISION_KEY}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; accepted keys: {', '.join(sorted(known))}")
    values = {name: check_value(name, *known[name], raw[name]) for name in raw}
    values.setdefault("method", RunConfig.method)
    cfg = RunConfig(**values)
    check_runnable(cfg)
    from fedhpro.methods import resolve_params  # late import: loads the method's module

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


def check_runnable(cfg: RunConfig) -> None:
    """Is this config runnable? A ConfigError (one line, naming the key) if not: the checks across keys (each
    key's own type, choices and bounds are its declaration's), what the method declares it supports (modes,
    engines, heterogeneous models), a setting that would train and report nothing, and what `engine: batched`
    reproduces (asked of the method's client class, none built). The one answer: `from_dict` (so the sweep, the
    CLI and every loaded config) and `train` ask it; what needs the data or the device (a long tail that empties
    a class, a precision the GPU lacks) is checked when they are loaded."""
    from fedhpro.data import DATASETS
    from fedhpro.methods import check_supported

    if cfg.device.split(":")[0] not in DEVICES:  # cuda:N names a GPU
        raise ConfigError(f"config key 'device': unknown value {cfg.device!r}; accepted: {', '.join(DEVICES)}, "
                          f"cuda:N")
    if cfg.clients_per_round is not None and cfg.clients_per_round > cfg.num_clients:
        raise ConfigError(f"config key 'clients_per_round' ({cfg.clients_per_round}) must be <= num_clients "
                          f"({cfg.num_clients})")
    _check_scheme(cfg)
    spec = DATASETS[cfg.dataset]
    import inspect

    accepted = [n for n, p in inspect.signature(spec.loader).parameters.items()
                if n != "root" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in cfg.dataset_options:
        if key not in accepted:
            raise ConfigError(f"config key 'dataset_options.{key}' is not an option of dataset {cfg.dataset!r}; "
                              f"accepted: {', '.join(accepted) or '(none)'}")
    if "test_fraction" in cfg.dataset_options:  # loaders split with it: sklearn/our errors would name test_size
        fraction = cfg.dataset_options["test_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"config key 'dataset_options.test_fraction' must be a number in (0, 1), got "
                              f"{fraction!r}")
    if spec.check_options is not None:
        spec.check_options(cfg.dataset_options)
    if spec.train_size is not None and cfg.num_clients > spec.train_size:
        raise ConfigError(f"config key 'num_clients' ({cfg.num_clients}) exceeds the {spec.train_size} training "
                          f"samples of dataset {cfg.dataset!r}")
    if cfg.classes_per_client is not None and cfg.classes_per_client > spec.num_classes:
        raise ConfigError(f"config key 'classes_per_client' ({cfg.classes_per_client}) exceeds the "
                          f"{spec.num_classes} classes of dataset {cfg.dataset!r}")
    if cfg.client_models and cfg.eval_mode != "personalized":
        raise ConfigError("config key 'client_models' (model heterogeneity) needs eval_mode 'personalized'")
    if cfg.client_models and cfg.model != "auto":  # it would be ignored, yet change the run id
        raise ConfigError(f"config key 'model' ({cfg.model!r}) is not used when 'client_models' is set (the clients' "
                          f"architectures are {', '.join(cfg.client_models)}); leave 'model' out")
    _check_models_fit(cfg, spec)
    check_supported(cfg)  # what the method declares it supports: modes, engines, heterogeneous models
    if cfg.eval_mode == "personalized" and cfg.effective_local_test_fraction == 0 and cfg.partition != "nway":
        raise ConfigError("config key 'local_test_fraction': 0 leaves personalized clients no local test split, "
                          "so nothing would be evaluated (accuracy NaN); use e.g. 0.25 or leave it unset")
    if cfg.engine == "batched":  # late import: the batched engine and the modules it imports
        from fedhpro.batched import check_batchable
        from fedhpro.methods import METHODS

        names = list(cfg.client_models) or [cfg.model]
        check_batchable(cfg, METHODS[cfg.method].Client, [names[i % len(names)] for i in range(cfg.num_clients)])


def _check_scheme(cfg: RunConfig) -> None:
    """What the partition scheme declares (fedhpro.partition.SCHEMES): its required keys, no long tail where it
    takes none, and its own checks across keys."""
    from fedhpro.partition import SCHEMES

    scheme = SCHEMES[cfg.partition]
    for key, note in scheme.required.items():
        if getattr(cfg, key) is None:
            raise ConfigError(f"config key {key!r} is required for partition {cfg.partition!r}{note}")
    if not scheme.long_tail and cfg.imbalance_ratio != 1.0:
        raise ConfigError(f"config key 'imbalance_ratio' must be 1 for partition {cfg.partition!r}")
    if scheme.check is not None:
        scheme.check(cfg)


def _check_models_fit(cfg: RunConfig, spec: Any) -> None:
    """Text models on token data, image models on images: the dataset's default model says which it holds
    (a model that does not fit fails only when built, deep into a job)."""
    from fedhpro.models import MODELS
    from fedhpro.text import TEXT_BACKBONES

    text_data = spec.default_model in TEXT_BACKBONES
    fitting = sorted(name for name in MODELS if (name in TEXT_BACKBONES) == text_data)
    named = [("model", cfg.model)] if cfg.model != "auto" else []
    for key, name in named + [("client_models", name) for name in cfg.client_models]:
        if (name in TEXT_BACKBONES) != text_data:
            raise ConfigError(f"config key {key!r}: {name!r} is a{' text' if name in TEXT_BACKBONES else 'n image'} "
                              f"model, but dataset {cfg.dataset!r} holds {'text' if text_data else 'images'}; "
                              f"accepted: {', '.join(fitting)}")
