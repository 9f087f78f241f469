"""The workflow config's sections other than the run keys, declared once with `param()` as the run keys are
(`fedhpro.config.RunConfig`): the top level, `reporting:`, `slurm:`, an ablation section and an experiment
block. They are checked by the checker the run keys use (`check_section` -> `fedhpro.params.check_value`),
and the workflow's JSON schema (workflow/schemas/config.schema.yaml, which Snakemake validates the config
with and fills the defaults from) is generated from them: ``fedhpro schema --write`` writes it, and
tests/test_sections.py checks that the committed file is what it writes.

A key whose value is a structure (datasets, methods, heterogeneity, ...) is declared with kind `Any` and
its JSON shape in `schema=`; `fedhpro.sweep` checks its content key by key. Torch-free (numpy only, for
the partition schemes' names).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedhpro.errors import ConfigError
from fedhpro.params import check_value, declared_choices, declared_fields, field_default, param

__all__ = ["WorkflowConfig", "Reporting", "Slurm", "AblationSection", "ExperimentSection", "HeterogeneityEntry",
           "check_section", "section_defaults", "json_schema", "schema_text", "SCHEMA_PATH", "LAUNCHERS",
           "REPORTING_RULES", "EXPERIMENT_KINDS"]

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
LAUNCHERS = ("local", "submitit")
REPORTING_RULES = ("final", "last_k", "best")
EXPERIMENT_KINDS = ("comparison", "ablation")
_SEED = {"low": 0}  # seeds are integers >= 0 (the sweep also checks < 2**32 and no duplicates)
_OBJECT_OR_NULL = {"type": ["object", "null"]}


@dataclass(frozen=True, kw_only=True)
class Reporting:
    """How a run's accuracy is reported in the tables (fedhpro.aggregate --rule/--last-k)."""

    rule: str = param("last_k", "final = last evaluated round; last_k = mean of the last k evaluated rounds; best = "
                      "max.", choices=REPORTING_RULES)
    last_k: int = param(3, "k of the last_k rule.", low=1)


@dataclass(frozen=True, kw_only=True)
class Slurm:
    """How training runs execute and, for SLURM, what each job requests."""

    launcher: str = param("local", "local = train inside the Snakemake job; submitit = the Snakemake job submits its "
                          "run as a SLURM job (submitit, Checkpointable, requeue on preemption) and waits for it. "
                          "Under `--profile slurm` the executor fedhpro submits the runs itself (packed, one status "
                          "query for all jobs), whatever this says.", choices=LAUNCHERS)
    partition: str | None = param(None, "SLURM partition (null = the cluster's default).")
    account: str | None = param(None, "SLURM account (null = the user's default).")
    gpus: int = param(1, "GPUs per training job (requested as gres gpu:N).", low=0)
    cpus: int = param(4, "CPUs per training job (cpus_per_task; also the job's torch threads).", low=1)
    mem_gb: float = param(16, "Memory per training job in GB.", low=0, low_inclusive=False)
    time_min: int = param(240, "Time limit per job attempt in minutes; a job that reaches it is checkpointed and "
                          "requeued.", low=1)
    signal_delay_s: int = param(120, "Seconds before the time limit at which SLURM sends USR2 (submitit checkpoint + "
                                "requeue).", low=0)
    max_num_timeout: int = param(3, "How many times a run may be requeued after hitting its time limit (preemptions "
                                 "are unlimited).", low=0)
    poll_seconds: float = param(30, "launcher submitit: longest interval between two SLURM status queries "
                                "(sacct/squeue) of a waiting job. (The executor fedhpro polls every job at once, every "
                                "seconds-between-status-checks of its profile.)", low=0, low_inclusive=False)
    additional: Mapping[str, Any] = param(default_factory=dict, help="Extra sbatch options (submitit "
                                          "slurm_additional_parameters), e.g. {qos = high}.")
    pack_minutes: float = param(30, "Executor fedhpro (--profile slurm): runs expected to take less than this many "
                                "minutes (run_minutes) share SLURM jobs, executed one after another in jobs of at most "
                                "this many minutes of expected work (a preempted job resumes every unfinished run in "
                                "it); 0 = one job per run.", low=0)
    run_minutes: float | Mapping[str, float | None] | None = param(
        None, "Expected minutes of one training run, used only for packing (pack_minutes): a number, or dataset -> "
        "minutes with an optional `default`; null (unknown) = never packed.", low=0, low_inclusive=False)
    runs_per_gpu: int = param(1, "Runs of one SLURM job trained at the same time, each in its own process on the "
                              "job's device (one small run cannot fill a modern GPU): each gets cpus // runs_per_gpu "
                              "torch threads and 1/runs_per_gpu of the GPU's memory (a run that needs more fails with "
                              "CUDA's out-of-memory error naming it, in its log); packs then hold runs_per_gpu x "
                              "pack_minutes of expected work. Each run's numbers are those of the same run alone with "
                              "that thread count; preemption resumes every unfinished run from its checkpoint.", low=1)


@dataclass(frozen=True, kw_only=True)
class AblationSection:
    """One ablation section."""

    methods: tuple[str, ...] = param(("fedhpro",), "Methods the ablation variants apply to.")
    base_variant: str = param("default", "Variant of each method whose params the ablation variants start from.")
    datasets: tuple[str, ...] | None = param(None, "Datasets to ablate on (null = all datasets).")
    heterogeneity: tuple[int, ...] | None = param(None, "Indices into the dataset's heterogeneity list (null = all).",
                                                  low=0)
    seeds: tuple[int, ...] | None = param(None, "Seeds of the ablation runs (null = the top-level seeds).", **_SEED)
    partition_seeds: tuple[int, ...] | None = param(None, "Partition seeds of the ablation runs (null = the top-level "
                                                    "partition_seeds).", **_SEED)
    variants: Mapping[str, Any] = param(default_factory=dict, help="Ablation name -> method_params changes (+ "
                                        "optional `config`).", schema={"additionalProperties": _OBJECT_OR_NULL})


def _scheme_names() -> tuple[str, ...]:
    from fedhpro.partition import SCHEMES

    return tuple(SCHEMES)


@dataclass(frozen=True, kw_only=True)
class HeterogeneityEntry:
    """One split setting (RunConfig partition keys). Its keys have no schema default on purpose - a key left out
    keeps the value from `defaults` / the dataset entry (else the RunConfig default). The values are checked
    by the run config's declarations (fedhpro.config.RunConfig) when the workflow is loaded."""

    # the schema of each key is the run config's declaration (`_heterogeneity_schema`); this class only
    # names the section, its keys are `fedhpro.partition.heterogeneity_keys()`


_SWEEP_SHAPES = {  # the JSON shape of the sweep's structures (their content is checked by fedhpro.sweep)
    "datasets": {"type": "object", "additionalProperties": _OBJECT_OR_NULL},
    "heterogeneity": {"type": "array", "minItems": 1, "items": {"type": "object"}},
    "methods": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "object"}},
}


@dataclass(frozen=True, kw_only=True)
class ExperimentSection:
    """One experiment (its name [A-Za-z0-9_.-] is a directory name)."""

    SCHEMA_DEFAULTS = False  # the sweep applies these defaults; the schema fills none inside an experiment

    title: str = param("", "Title of the experiment, the first words of its table captions and figure titles.")
    kind: str = param("comparison", "comparison (default): main table of methods x settings (+ sample-weighted "
                      "personalized table, communication, per-domain when recorded) and accuracy / communication / "
                      "diagnostics figures; ablation: each method's variants against its default (table with delta, "
                      "ablation figure).", choices=EXPERIMENT_KINDS)
    protocol: str = param("", "The protocol in words (evaluation mode, what is scored); stated in every caption.")
    defaults: Mapping[str, Any] = param(default_factory=dict, help="RunConfig values of this experiment, merged over "
                                        "the top-level defaults (e.g. eval_mode, client_models, rounds).")
    seeds: tuple[int, ...] = param((0,), "Training seeds of this experiment (default the top-level seeds).",
                                   schema={"minItems": 1}, **_SEED)
    partition_seeds: tuple[int, ...] = param((0,), "Partition seeds of this experiment (default the top-level "
                                             "partition_seeds).", schema={"minItems": 1}, **_SEED)
    datasets: Any = param(None, "As the top-level `datasets`, for this experiment.", schema=_SWEEP_SHAPES["datasets"])
    pending_datasets: Any = param(None, "As the top-level `pending_datasets`, for this experiment.",
                                  schema=_SWEEP_SHAPES["datasets"])
    heterogeneity: Any = param(None, "As the top-level `heterogeneity`, for this experiment (required unless every "
                               "dataset sets its own).", schema=_SWEEP_SHAPES["heterogeneity"])
    methods: Any = param(None, "As the top-level `methods` (method -> variant -> method_params), for this experiment.",
                         schema=_SWEEP_SHAPES["methods"])
    grids: Any = param(None, "As the top-level `grids`, for this experiment.", schema={"type": "object"})
    ablations: Any = param(None, "As the top-level `ablations` (one section or a list), for this experiment.",
                           schema={"type": ["object", "array"]})


_NO_DEFAULT = dataclasses.MISSING


@dataclass(frozen=True, kw_only=True)
class WorkflowConfig:
    """Workflow config of the FedHPro reproduction (config/config.yaml, config/paper.yaml). The sweep
    (fedhpro.sweep) expands it into runs: datasets x heterogeneity x methods x variants x partition seeds x
    seeds, plus the ablations; every run's RunConfig is validated with fedhpro.config.from_dict when the
    workflow is loaded, so bad values fail before any job runs."""

    results: str = param("results", "Output root; runs go to <results>/runs, partitions to <results>/partitions, "
                         "tables to <results>/tables, figures to <results>/figures, logs to <results>/logs.",
                         schema={"minLength": 1})
    data_root: str = param("data", "Dataset root (RunConfig data_root); downloads are stored in "
                           "<data_root>/<dataset>/raw.", schema={"minLength": 1})
    reporting: Reporting = param(default_factory=Reporting, help=Reporting.__doc__)
    defaults: Mapping[str, Any] = param(default_factory=dict, help="RunConfig values shared by every run (any "
                                        "RunConfig key, see `fedhpro config`, except the sweep axes method, variant, "
                                        "method_params, dataset, seed, partition_seed, data_root).")
    datasets: Any = param(_NO_DEFAULT, "(Without `experiments`) Registered dataset name -> RunConfig overrides for it "
                          "(e.g. model, lr, rounds), plus optionally `heterogeneity` (a list replacing the global one "
                          "for this dataset) and `methods` (the subset of methods to run on it).",
                          schema={**_SWEEP_SHAPES["datasets"], "minProperties": 1})
    pending_datasets: Any = param(default_factory=dict, help="Same shape as `datasets`, for datasets whose loader may "
                                  "not be registered yet; each unregistered one is skipped with a warning, registered "
                                  "ones are run like `datasets`.", schema=_SWEEP_SHAPES["datasets"])
    heterogeneity: Any = param(_NO_DEFAULT, "(Without `experiments`) Client-split settings; each run's heterogeneity "
                               "id (e.g. dirichlet-a0p5-n10) is generated from the resolved settings.",
                               schema={"type": "array", "minItems": 1,
                                       "items": {"$ref": "#/$defs/heterogeneity_entry"}})
    methods: Any = param(_NO_DEFAULT, "(Without `experiments`) Method (fedhpro.methods.METHOD_MODULES) -> variant "
                         "name -> method_params; a variant may hold `config` with RunConfig overrides for that variant "
                         "only.", schema={"type": "object", "minProperties": 1, "additionalProperties": {
                             "type": "object", "description": "Variant name ([A-Za-z0-9_.-]) -> method_params.",
                             "additionalProperties": _OBJECT_OR_NULL}})
    grids: Any = param(default_factory=dict, help="Method -> param -> list of values; every combination becomes a "
                       "variant (named like mu-0p1) on top of the method's `default` variant. Keys `config.<RunConfig "
                       "key>` sweep a RunConfig value.", schema={"type": "object", "additionalProperties": {
                           "type": "object", "additionalProperties": {"type": "array", "minItems": 1}}})
    ablations: Any = param(default_factory=AblationSection, help="Ablation runs (listed in the ablation table), "
                           "expanded like the main sweep; one section (a mapping) or a list of sections (e.g. "
                           "FedHPro's components and GFPL's head wiring, each with its own methods and variants).",
                           schema={"type": ["object", "array"], "items": {"$ref": "#/$defs/ablation_section"}})
    seeds: tuple[int, ...] = param((0,), "Training seeds (RunConfig seed).", schema={"minItems": 1}, **_SEED)
    partition_seeds: tuple[int, ...] = param((0,), "Partition seeds (RunConfig partition_seed); a separate axis from "
                                             "the training seeds.", schema={"minItems": 1}, **_SEED)
    threads: int = param(1, "CPU threads of a local (in-process) training job (Snakemake threads and torch threads).",
                         low=1)
    slurm: Slurm = param(default_factory=Slurm, help=Slurm.__doc__)
    mirrors: Mapping[str, Any] = param(default_factory=dict, help="Dataset -> fedhpro.download mirror mapping (file "
                                       "name -> URL/path or {url, checksum, filename}; \"*\" = base for all files). A "
                                       "file without a published checksum (e.g. SynthDigits.zip of digit_domains' "
                                       "domain syn) needs an entry with a checksum unless the loader finds it locally; "
                                       "else the workflow stops at load time. The key \"fingerprint\" ('sha256:<64 "
                                       "hex>', as printed by `fedhpro fingerprint --dataset NAME --path DIR`) accepts "
                                       "a local copy whose bytes differ from upstream (e.g. recompressed) by its "
                                       "content, one key for the whole dataset.",
                                       schema={"additionalProperties": {"type": "object"}})
    experiments: Mapping[str, Any] = param(default_factory=dict, help="The paper's experiments, each a named sweep "
                                           "with its own tables (<results>/tables/<name>/) and figures "
                                           "(<results>/figures/<name>/). With `experiments`, the top-level datasets, "
                                           "pending_datasets, heterogeneity, methods, grids and ablations are not used "
                                           "(the sweep refuses them) - each experiment declares its own; the top-level "
                                           "defaults, seeds and partition_seeds are inherited. A run that two "
                                           "experiments declare identically (same run id and config) is trained once "
                                           "and reported in both; the same run id with a different config is an error "
                                           "(give one variant another name). Without `experiments`, the top-level "
                                           "sweep is one experiment named `main`.",
                                           schema={"additionalProperties": {"$ref": "#/$defs/experiment"}})
    published: str | None = param(None, "Path of the published-results registry (config/published.yaml). When set, "
                                  "the accuracy figures draw its published curves as reference lines, and the rule "
                                  "reproduction_report compares its entries with the runs (fedhpro.published).")
    reproduction_report: str | None = param(None, "Where the rule reproduction_report writes the Markdown report "
                                            "(e.g. docs/reproduction.md); needs `published`. Null - no report.")
    report_partial: bool = param(False, "Let the reproduction report use the runs finished so far (its inputs are "
                                 "then the metrics that exist when the workflow is loaded; the report says how many "
                                 "runs of each cell are missing). False - the report waits for every run.")


# ---------------------------------------------------------------------------------------------- checking
def section_defaults(cls: type) -> dict[str, Any]:
    """The declared defaults of a section, as a config holds them (a nested section as its mapping)."""
    out = {}
    for name, (f, _, _) in declared_fields(cls).items():
        if f.default is _NO_DEFAULT and f.default_factory is _NO_DEFAULT:
            continue
        value = field_default(f)
        out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """A declared default as YAML/JSON holds it: a section as its mapping, a tuple as a list."""
    if dataclasses.is_dataclass(value):
        return section_defaults(type(value))
    if isinstance(value, tuple):
        return list(value)
    return value


def check_section(cls: type, value: Any, path: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A section's mapping checked against its declarations (unknown keys, then each key with the run keys'
    checker), with the declared defaults filled in; `error` (naming `path.key`) otherwise. Values are kept
    as written (an integer stays an integer: SLURM sizes are passed on as given)."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise error(f"{path}: must be a mapping, got {value!r}" if path else "the workflow config must be a mapping")
    declared = declared_fields(cls)
    unknown = sorted(set(value) - set(declared))
    if unknown:
        raise error(f"{path + '.' if path else ''}{unknown[0]}: unknown key; accepted: {', '.join(declared)}")
    out = section_defaults(cls)
    for key, given in value.items():
        f, kind, nullable = declared[key]
        if kind in ("any", "section"):
            out[key] = given  # a structure (or a section of its own): checked by its own code (fedhpro.sweep)
            continue
        try:
            checked = check_value(key, f, kind, nullable, given, where=f"{path}.{key}" if path else key)
        except ConfigError as err:
            raise error(str(err)) from None
        # as written where it was a number already (an integer stays one: SLURM sizes are passed on as given),
        # a list stays a list; else normalised (`1e-3` read as a string by a YAML 1.1 parser becomes a number)
        keep = isinstance(given, (int, float, list)) and not isinstance(given, bool)
        out[key] = given if keep else checked
    return out


# ---------------------------------------------------------------------------------------------- the schema
_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string", "mapping": "object",
               "str_list": "array", "int_list": "array", "number_map": ["number", "object"]}


def key_schema(f: dataclasses.Field, kind: str, nullable: bool, *, with_default: bool = True) -> dict[str, Any]:
    """The JSON schema of one declared key: type, choices, bounds, default and help (plus its `schema=`)."""
    default = field_default(f) if (f.default is not _NO_DEFAULT or f.default_factory is not _NO_DEFAULT) \
        else _NO_DEFAULT
    if dataclasses.is_dataclass(default):  # a section of its own: Snakemake fills its keys' defaults into {}
        return {**section_schema(type(default)), "default": {}, "description": " ".join(f.metadata["help"].split()),
                **(f.metadata.get("schema") or {})}
    out: dict[str, Any] = {}
    if kind != "any":
        json_type = _JSON_TYPES[kind]
        types = json_type if isinstance(json_type, list) else [json_type]
        out["type"] = [types[0], "null", *types[1:]] if nullable else (types if len(types) > 1 else types[0])
    choices = declared_choices(f)
    if kind in ("str_list", "int_list"):
        out["items"] = {"type": "string" if kind == "str_list" else "integer"}
    meta = f.metadata
    bounds = {}
    if meta["low"] is not None:
        bounds["minimum" if meta["low_inclusive"] else "exclusiveMinimum"] = meta["low"]
    if meta["high"] is not None:
        bounds["maximum" if meta["high_inclusive"] else "exclusiveMaximum"] = meta["high"]
    if choices:
        (out["items"] if kind == "str_list" else out)["enum"] = list(choices)
    if kind == "int_list":
        out["items"].update(bounds)
    elif kind == "number_map":  # bounds checked by check_section, per number (the message names the dataset)
        out["additionalProperties"] = {"type": ["number", "null"]}
    else:
        out.update(bounds)
    if with_default and default is not _NO_DEFAULT:
        out["default"] = _plain(default)
    out["description"] = meta["help"]
    out.update(meta.get("schema") or {})
    return out


def section_schema(cls: type) -> dict[str, Any]:
    """The JSON schema of a section: an object of its declared keys, nothing else."""
    with_default = getattr(cls, "SCHEMA_DEFAULTS", True)
    return {"type": "object", "additionalProperties": False, "description": " ".join(cls.__doc__.split()),
            "properties": {name: key_schema(f, kind, nullable, with_default=with_default)
                           for name, (f, kind, nullable) in declared_fields(cls).items()}}


def _heterogeneity_schema() -> dict[str, Any]:
    """A heterogeneity entry: the partition keys with the run config's types and choices; no defaults, no bounds
    (the values are checked, naming the entry, when the runs are validated)."""
    from fedhpro.config import RunConfig
    from fedhpro.partition import heterogeneity_keys

    declared = declared_fields(RunConfig)
    properties = {}
    for key in heterogeneity_keys():
        f, kind, _ = declared[key]
        properties[key] = {"type": _JSON_TYPES[kind], **({"enum": list(declared_choices(f))}
                                                          if declared_choices(f) else {}),
                           "description": f.metadata["help"]}
    return {"type": "object", "additionalProperties": False,
            "description": " ".join(HeterogeneityEntry.__doc__.split()), "properties": properties}


def json_schema() -> dict[str, Any]:
    """The workflow config's JSON schema, generated from the declarations."""
    top = section_schema(WorkflowConfig)
    # `ablations`: one section (its keys, defaults filled in) or a list of sections. The list branch comes
    # first: Snakemake's default filler calls setdefault on whatever a schema with `properties` meets, so a
    # list must never reach the section's own schema (anyOf stops at the first branch that holds).
    ablation = section_schema(AblationSection)
    entry = top["properties"]["ablations"]
    top["properties"]["ablations"] = {
        "description": entry["description"], "default": entry["default"],
        "anyOf": [{"type": "array", "items": {"$ref": "#/$defs/ablation_section"}},
                  {"$ref": "#/$defs/ablation_section"}]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": top.pop("description"),
            "$defs": {"ablation_section": ablation, "experiment": section_schema(ExperimentSection),
                      "heterogeneity_entry": _heterogeneity_schema()},
            **top}


def schema_text() -> str:
    """The schema file's text (what `fedhpro schema --write` writes)."""
    head = ("# Generated from the declarations in fedhpro/sections.py (and the run keys of fedhpro/config.py): do not\n"
            "# edit; run `fedhpro schema --write` (tests/test_sections.py checks this file is its output).\n")
    return head + yaml.safe_dump(json.loads(json.dumps(json_schema())), sort_keys=False, width=110,
                                 allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    """`fedhpro schema [--write]`: print the workflow schema, or write it to workflow/schemas/."""
    from fedhpro.cliutil import ArgumentParser

    parser = ArgumentParser(prog="fedhpro schema", description="The workflow config's JSON schema, generated from "
                            "the declarations in fedhpro/sections.py and fedhpro/config.py.")
    parser.add_argument("--write", action="store_true", help="write it to workflow/schemas/config.schema.yaml")
    args = parser.parse_args(argv)
    if args.write:
        SCHEMA_PATH.write_text(schema_text())
        print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(schema_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
