# Config loading and validation, the run table, and the input functions of the other rules.
#
# The config is checked twice at parse time, before any job: against the JSON schema (which also
# fills in defaults) and by fedhpro.sweep.validate_workflow_config, which expands the sweep and
# validates every run's RunConfig with fedhpro.config.from_dict. An invalid value stops the
# workflow with a message naming the key, e.g.
#   methods.fedprox.default (dataset digits, heterogeneity[0], ...): config key 'method_params.mu' ...
# The second check, the run table and the download plan (fedhpro.runtable) run in this process: the
# method/dataset/model declarations they read import torch only when a run is trained (fedhpro.lazy),
# and this process stays on the submit host for the whole sweep (no torch here: tests/test_torch_free.py).
import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# the fedhpro package of this checkout (falls back to the installed one)
PACKAGE_ROOT = (
    workflow.basedir if os.path.isdir(os.path.join(workflow.basedir, "fedhpro")) else None
)
if PACKAGE_ROOT:
    sys.path.insert(0, PACKAGE_ROOT)

from fedhpro import layout  # noqa: E402  (no torch)
from fedhpro.runtable import (  # noqa: E402  (no torch)
    RunTableError,
    RunTableInterrupted,
    check_directories,
    load_run_table,
    schema_error,
)
from fedhpro.snakelock import remove_dead_lock  # noqa: E402  (no torch)
from fedhpro.sweep import WILDCARD_PATTERNS, SweepConfigError, check_config_files  # noqa: E402  (no torch)

# A Snakemake killed here earlier (SIGKILL, a lost login session) left its lock: remove it, with one line, before
# this Snakemake takes its own (after loading the workflow), instead of stopping with "Directory cannot be locked".
# Only the main Snakemake: a job's Snakemake on a compute node must never touch the submit host's lock.
if workflow.is_main_process:
    _removed_lock = remove_dead_lock(os.getcwd())
    if _removed_lock:
        print(_removed_lock, file=sys.stderr)


try:  # duplicate keys (Snakemake's YAML loader keeps the last silently) and invalid YAML, naming file and line
    check_config_files(
        list(workflow.overwrite_configfiles)
        or [os.path.join(workflow.basedir, "config", "config.yaml")]
    )
except SweepConfigError as err:
    raise WorkflowError(f"invalid workflow config: {err}") from None

try:  # fills in the schema's defaults
    validate(config, schema="../schemas/config.schema.yaml")
except (WorkflowError, AttributeError, TypeError) as err:  # its message holds the whole schema: say which
    # key, in one line (AttributeError/TypeError: Snakemake's default filler meeting a list where a schema
    # branch with defaults expects a mapping, e.g. a bad section inside a list of `ablations`)
    reason = schema_error(
        config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
    )
    raise WorkflowError(
        f"invalid workflow config: {reason or str(err).strip().splitlines()[0]}"
    ) from None

try:  # `results: <a file>` would fail later, on '<file>/tables', with a traceback
    check_directories(config)
except RunTableError as err:
    raise WorkflowError(f"invalid workflow config: {err}") from None

RESULTS = config["results"].rstrip("/")
DATA_ROOT = config["data_root"].rstrip("/")

# dataset -> the files its download step fetches (or finds locally): only those the runs need, e.g.
# digit_domains with `domains: [mnist, usps]` gets the MNIST and USPS files. A needed file that has
# no checksum (upstream or in `mirrors:`; SynDigits has none) and no local copy stops the workflow
# here, at load time, not in the job; for a dataset under `pending_datasets` it is dropped with a
# warning (the loader skips what is missing, e.g. digit_domains a domain).
try:
    RUN_TABLE = load_run_table(config, DATA_ROOT)
except RunTableError as err:
    raise WorkflowError(f"invalid workflow config: {err}") from None
except (RunTableInterrupted, KeyboardInterrupt):  # Ctrl-C: one line, no traceback
    raise WorkflowError(str(RunTableInterrupted())) from None

RUNS = RUN_TABLE.runs
RUN_BY_ID = {run.run_id: run for run in RUNS}
PARTITIONS = RUN_TABLE.partitions
DOWNLOAD_FILES = RUN_TABLE.downloads
DOWNLOAD_DATASETS = sorted(DOWNLOAD_FILES)

# output patterns: the run and partition ids (fedhpro.layout) are the rules' wildcards
RUN_ID = layout.RUN_ID
PARTITION_ID = layout.PARTITION_ID
RUN_DIR = layout.run_dir(RESULTS, RUN_ID)
PARTITION_DIR = layout.partition_dir(RESULTS, PARTITION_ID)
TABLES = f"{RESULTS}/tables"
FIGURES = f"{RESULTS}/figures"
LOGS = f"{RESULTS}/logs"


wildcard_constraints:
    dataset=WILDCARD_PATTERNS["dataset"],
    het=WILDCARD_PATTERNS["het"],
    method=WILDCARD_PATTERNS["method"],
    variant=WILDCARD_PATTERNS["variant"],
    pseed=WILDCARD_PATTERNS["pseed"],
    seed=WILDCARD_PATTERNS["seed"],


def run_dir(run):
    return layout.run_dir(RESULTS, run.run_id)


def metrics_of(runs):
    return [f"{run_dir(run)}/metrics.parquet" for run in runs]


def run_of(wildcards):
    run_id = layout.run_id_of(wildcards)
    if run_id not in RUN_BY_ID:
        raise WorkflowError(f"{run_id} is not a run of this config")
    return RUN_BY_ID[run_id]


def partition_of(wildcards):
    pid = layout.partition_id_of(wildcards)
    if pid not in PARTITIONS:
        raise WorkflowError(f"{pid} is not a partition of this config")
    return PARTITIONS[pid]


def download_marker(dataset):
    """The download rule's marker for datasets with files to fetch (none for e.g. digits).

    ancient(): the marker only says "the files are there" (all checksum-verified), so a download job
    rerun because more files were requested (its `files` param changed) does not make the partitions
    and runs that already used the data out of date.
    """
    if dataset in DOWNLOAD_FILES:
        return [ancient(f"{DATA_ROOT}/{dataset}/download.complete")]
    return []


def train_input(wildcards):
    run = run_of(wildcards)
    pdir = layout.partition_dir(RESULTS, run.partition_id)
    return {
        "partition": f"{pdir}/partition.npz",
        "meta": f"{pdir}/meta.json",
        "data": download_marker(run.dataset),
    }


def train_resources():
    """Resources of a training job from the `slurm:` section (used by SLURM executors)."""
    slurm = config["slurm"]
    res = {"mem_mb": int(slurm["mem_gb"] * 1024), "runtime": int(slurm["time_min"])}
    if slurm["gpus"]:
        res["gres"] = f"gpu:{slurm['gpus']}"
    return res


MAIN_METRICS = metrics_of([run for run in RUNS if run.kind == "main"])
ABLATION_METRICS = metrics_of([run for run in RUNS if run.kind == "ablation"])
ALL_METRICS = MAIN_METRICS + ABLATION_METRICS


# experiments: each has its own tables and figures, from its own runs (a run may be in several)
from fedhpro.sweep import experiments_of, runs_by_experiment  # noqa: E402

EXPERIMENTS = experiments_of(config)
RUNS_OF_EXPERIMENT = runs_by_experiment(RUNS)


def experiment_metrics(wildcards):
    return metrics_of(RUNS_OF_EXPERIMENT[wildcards.experiment])


def experiment_params(wildcards):
    spec = EXPERIMENTS[wildcards.experiment]
    return {"kind": spec.kind, "title": spec.title, "protocol": spec.protocol}


# README figures: a run of the quick default (config/config.yaml, no --configfile) copies these of its
# figures into docs/figures, so the README always shows the figures of the last quick-default run, made by
# this code (never hand-copied, never stale). name -> (experiment, file in results/figures/<experiment>/).
DOCS_FIGURES = {
    "accuracy": ("label_skew", "accuracy.png"),
    "communication": ("model_heterogeneity", "communication.png"),
    "ablation": ("ablation", "ablation.png"),
    "diagnostics": ("label_skew", "diagnostics_digits_dirichlet_a0.5_n10_global_auto.png"),
}


def docs_figure_outputs():
    """The README figures that this run regenerates: none unless it runs the quick default."""
    if workflow.overwrite_configfiles:
        return []
    return [
        f"docs/figures/{name}.png"
        for name, (experiment, _) in DOCS_FIGURES.items()
        if experiment in RUNS_OF_EXPERIMENT
    ]


def report_metrics(wildcards):
    """The reproduction report's runs: all planned ones, or with `report_partial` those finished at load."""
    if config.get("report_partial"):
        return [path for path in ALL_METRICS if os.path.exists(path)]
    return ALL_METRICS


def final_outputs():
    """Every experiment's tables and figures, every run's metrics and the README figures (quick default only).
    Snakemake rebuilds a missing file only for a job that needs it, so a metrics.parquet deleted after its
    tables were made (e.g. as a refusal of a swapped partition.npz or metrics.parquet advises) is rebuilt, with
    its partition, only if `all` asks."""
    return (
        [f"{TABLES}/{name}" for name in RUNS_OF_EXPERIMENT]
        + [f"{FIGURES}/{name}" for name in RUNS_OF_EXPERIMENT]
        + metrics_of(RUNS)
        + docs_figure_outputs()  # the README figures (quick default only; rule docs_figure)
        + report_outputs()  # the reproduction report (a config with `published` and `reproduction_report`)
    )


def report_outputs():
    if config.get("published") and config.get("reproduction_report"):
        return [config["reproduction_report"]]
    return []


def data_identity(dataset):
    """What the workflow config says the dataset's data is (not where it lives): the checksums its downloads
    are verified against and any pinned fingerprint (computed with the run table)."""
    return RUN_TABLE.data_identity.get(dataset, {"files": {}, "fingerprint": None})


def partition_data_identity(wildcards):
    """The partition rule's `data` param: the dataset's declared identity (data_identity) and, for data given by
    dataset_options.path, its content fingerprint read from the files at workflow load (cached by file stats),
    so that other data under the same path reruns the partition and its runs; absent otherwise, so the params
    of partitions of downloaded or packaged data are what they were."""
    identity = dict(data_identity(wildcards.dataset))
    content = RUN_TABLE.partition_content.get(layout.partition_id_of(wildcards))
    if content:
        identity["content"] = content
    return identity


onstart:
    # Snakemake holds its lock now: note which process wrote it, so that after a kill (no cleanup) the next
    # `snakemake` here removes it instead of stopping with "Directory cannot be locked" (fedhpro.snakelock).
    from fedhpro.snakelock import write_lock_owner

    write_lock_owner(workflow)
