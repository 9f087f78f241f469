"""The sweep expansion (fedhpro.sweep), the launcher (fedhpro.launch) and the Snakemake workflow.

The workflow tests run the real `snakemake` of the venv as a subprocess, in a temporary copy of
the workflow (Snakefile, workflow/, profiles/) with a tiny config: 2 methods x 1 heterogeneity x
1 seed, 2 rounds, on scikit-learn digits (offline).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedhpro.config import ConfigError, from_dict
from fedhpro.sweep import (WILDCARD_PATTERNS, SweepConfigError, encode_value, expand_sweep, partitions_of,
                           validate_workflow_config)

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

TINY = {
    "defaults": {"rounds": 2, "num_clients": 10, "batch_size": 32, "lr": 0.05, "device": "cpu"},
    "datasets": {"digits": {}},
    "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
    "methods": {"fedavg": {"default": {}}, "fedprox": {"default": {"mu": 0.01}}},
    "seeds": [0],
}


# ---------------------------------------------------------------------------------------- helpers
def copy_workflow(dest: Path, config: dict) -> Path:
    """A runnable copy of the workflow in dest/wf whose config/config.yaml is `config`."""
    wf = dest / "wf"
    wf.mkdir(parents=True)
    shutil.copy2(REPO / "Snakefile", wf / "Snakefile")
    for name in ("workflow", "profiles"):
        shutil.copytree(REPO / name, wf / name, ignore=shutil.ignore_patterns("__pycache__"))
    (wf / "config").mkdir()
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return wf


def snakemake_cmd(*args: str) -> list[str]:
    return [str(SNAKEMAKE), *args]


def smk(wf: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(*args), cwd=wf, capture_output=True, text=True, timeout=timeout)


def planned(proc: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """rule -> outputs of the jobs a dry run (-n) plans."""
    jobs: dict[str, list[str]] = {}
    rule = None
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            jobs.setdefault(rule, [])
            continue
        m = re.match(r"^output: (.*)$", line.strip())
        if m and rule:
            jobs[rule].append(m.group(1))
    return jobs


def sweep_config(**changes) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg.update(changes)
    return cfg


# ---------------------------------------------------------------------------------------- sweep
def test_encode_value_is_wildcard_safe_and_distinct():
    cases = {0.5: "0p5", 0.05: "0p05", 1e-05: "1em05", -2: "m2", 100.0: "100", 100: "100", 0.001: "0p001",
             True: "true", "a b/c": "a_b_c", -0.25: "m0p25", 2.5e20: "2p5e20"}
    for value, text in cases.items():
        assert encode_value(value) == text
        assert re.fullmatch(WILDCARD_PATTERNS["variant"], text)
    assert len({encode_value(v) for v in (0.1, 0.01, 0.001, 1e-4, 1e-5, 1.0, 10.0)}) == 7


def test_run_ids_are_stable_readable_and_wildcard_safe():
    config = sweep_config(
        heterogeneity=[{"partition": "dirichlet", "alpha": 0.5}, {"partition": "dirichlet", "alpha": 0.05},
                       {"partition": "creff", "alpha": 0.5, "imbalance_ratio": 100},
                       {"partition": "pathological", "classes_per_client": 2}, {"partition": "iid"}],
        grids={"fedprox": {"mu": [0.001, 1.0e-5], "config.lr": [0.1]}},
        seeds=[0, 1], partition_seeds=[0, 7])
    runs = validate_workflow_config(config)
    again = expand_sweep(copy.deepcopy(config))
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    assert [r.config_hash for r in runs] == [r.config_hash for r in again]
    assert len({r.run_id for r in runs}) == len(runs) == 5 * (2 + 2) * 2 * 2
    hets = {r.het for r in runs}
    assert hets == {"dirichlet-a0p5-n10", "dirichlet-a0p05-n10", "creff-a0p5-rho100-n10", "pathological-k2-n10",
                    "iid-n10"}
    assert {r.variant for r in runs if r.method == "fedprox"} == {"default", "mu-0p001_lr-0p1", "mu-1em05_lr-0p1"}
    for run in runs:
        for name, value in run.wildcards.items():
            assert re.fullmatch(WILDCARD_PATTERNS[name], value), (name, value)
        assert run.run_id == "/".join([run.dataset, run.het, run.method, run.variant,
                                       f"ps{run.partition_seed}_s{run.seed}"])
        assert run.config == from_dict(run.config.to_dict())  # validated and self-consistent
    grid = next(r for r in runs if r.variant == "mu-1em05_lr-0p1")
    assert grid.config.method_params["mu"] == 1e-05 and grid.config.lr == 0.1


def test_partitions_are_distinct_per_setting_and_seed_axes_are_separate():
    config = sweep_config(
        heterogeneity=[{"partition": "dirichlet", "alpha": 0.5}, {"partition": "dirichlet", "alpha": 0.1},
                       {"partition": "dirichlet", "alpha": 0.5, "num_clients": 20},
                       {"partition": "dirichlet", "alpha": 0.5, "imbalance_ratio": 10}],
        seeds=[0, 1, 2], partition_seeds=[0, 1])
    runs = expand_sweep(config)
    parts = partitions_of(runs)
    assert len(parts) == 4 * 2  # settings x partition seeds, shared by methods and training seeds
    assert len({json.dumps(p.params(), sort_keys=True) for p in parts.values()}) == len(parts)
    for run in runs:
        p = parts[run.partition_id]
        assert (p.num_clients, p.partition_seed, json.loads(p.keys)["alpha"], p.imbalance_ratio) == (
            run.config.num_clients, run.config.partition_seed, run.config.alpha, run.config.imbalance_ratio)
        assert run.partition_id == f"{run.dataset}/{run.het}/ps{run.partition_seed}"
    by_key = {(r.het, r.method, r.partition_seed, r.seed) for r in runs}
    assert len(by_key) == len(runs) == 4 * 2 * 2 * 3
    seeds_of_partition = {}
    for run in runs:
        seeds_of_partition.setdefault(run.partition_id, set()).add(run.seed)
    assert all(s == {0, 1, 2} for s in seeds_of_partition.values())


def test_ablations_and_pending_datasets():
    warnings = []
    config = sweep_config(
        methods={"fedavg": {"default": {}}, "fedhpro": {"default": {"matching_steps": 3},
                                                         "paper": {"distance": "cos", "use_margin": True}}},
        pending_datasets={"not_written_yet": {"model": "resnet10"}},
        ablations={"datasets": ["digits", "not_written_yet"], "heterogeneity": [0],
                   "variants": {"no_hpcl": {"hpcl": False}, "L1": {"prototypes_per_class": 1}}},
        seeds=[0, 1])
    runs = expand_sweep(config, warn=warnings.append)
    assert len(warnings) == 1 and "not_written_yet" in warnings[0]
    ablation = [r for r in runs if r.kind == "ablation"]
    assert {r.variant for r in ablation} == {"no_hpcl", "L1"} and len(ablation) == 4
    for run in ablation:  # ablation variants start from the base variant's params
        assert run.method == "fedhpro" and run.config.method_params["matching_steps"] == 3
    assert next(r for r in ablation if r.variant == "no_hpcl").config.method_params["hpcl"] is False


@pytest.mark.parametrize("change, key", [
    ({"heterogeneity": [{"partition": "dirichlet", "alpha": -1}]}, "heterogeneity[0].alpha"),
    ({"methods": {"fedavg": {"default": {}}, "fedfoo": {"default": {}}}}, "methods.fedfoo"),
    ({"datasets": {"no_such_dataset": {}}}, "datasets.no_such_dataset"),
    ({"methods": {"fedprox": {"default": {"mu": -3}}}}, "methods.fedprox.default.mu"),
    ({"methods": {"fedprox": {"default": {"nu": 1}}}}, "methods.fedprox.default.nu"),
    ({"defaults": {"rounds": 0}}, "defaults.rounds"),
    ({"defaults": {"seed": 3}}, "defaults.seed"),
    ({"datasets": {"digits": {"lr": "fast"}}}, "datasets.digits.lr"),
    ({"methods": {"fedprox": {"bad/name": {}}}}, "methods.fedprox.bad/name"),
    ({"slurm": {"launcher": "ssh"}}, "slurm.launcher"),
    ({"reporting": {"rule": "median"}}, "reporting.rule"),
    ({"seeds": []}, "seeds"),
    ({"grids": {"fedavg": {"mu": [0.1]}}}, "grids.fedavg.mu"),
    ({"ablations": {"variants": {"default": {}}, "methods": ["fedprox"]}}, "ablations.variants.default"),
])
def test_validation_errors_name_the_key(change, key):
    with pytest.raises(SweepConfigError) as info:
        validate_workflow_config(sweep_config(**change))
    assert str(info.value).startswith(f"{key}:"), str(info.value)
    assert isinstance(info.value, ConfigError)


# ---------------------------------------------------------------------------------------- launcher
def test_launch_through_submitit_local_executor_and_failure_report(tmp_path):
    from fedhpro.launch import LaunchError, LaunchOptions, launch, read_jobs

    cfg = from_dict({"method": "fedavg", "dataset": "digits", "rounds": 1, "num_clients": 10, "device": "cpu"})
    options = LaunchOptions(launcher="submitit", cluster="local", gpus=0, cpus=1, poll_seconds=1)
    metrics = launch(cfg, tmp_path / "run", None, options, log=lambda m: None)
    assert metrics.exists()
    assert read_jobs(tmp_path / "run")[0]["result"] == "ok"
    # a job that fails: the error names the job id and carries the tail of its log
    bad = tmp_path / "bad_partition"
    bad.mkdir()
    (bad / "meta.json").write_text(json.dumps({"dataset": "digits", "scheme": "iid", "num_clients": 10, "seed": 0}))
    with pytest.raises(LaunchError) as info:
        launch(cfg, tmp_path / "run2", bad, options, log=lambda m: None)
    job_id = read_jobs(tmp_path / "run2")[0]["job_id"]
    assert f"job {job_id}" in str(info.value)
    assert "stderr tail" in str(info.value) and "partition" in str(info.value)
    # a changed config clears the old run's files instead of being refused by train()
    cfg2 = cfg.replace(lr=0.2)
    launch(cfg2, tmp_path / "run", None, LaunchOptions(threads=1), log=lambda m: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config_hash"] == cfg2.config_hash()


# ---------------------------------------------------------------------------------------- workflow
@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    """The tiny workflow, run once for real with `snakemake --cores 2`."""
    wf = copy_workflow(tmp_path_factory.mktemp("pipeline"), TINY)
    proc = smk(wf, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return wf


# Each case is one Snakemake start (about 12 s on 2 cores): the first stays in the default suite, the other two are
# `slow`; test_validation_errors_name_the_key checks every key's message in-process, quickly.
@pytest.mark.parametrize("change, key", [
    ({"heterogeneity": [{"partition": "dirichlet", "alpha": -1}]}, "heterogeneity[0].alpha"),
    pytest.param({"methods": {"fedavg": {"default": {}}, "fedfoo": {"default": {}}}}, "methods.fedfoo",
                 marks=pytest.mark.slow),
    pytest.param({"datasets": {"no_such_dataset": {}}}, "datasets.no_such_dataset", marks=pytest.mark.slow),
])
def test_snakemake_fails_at_config_load(tmp_path, change, key):
    wf = copy_workflow(tmp_path, sweep_config(**change))
    proc = smk(wf, "--cores", "2")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert f"invalid workflow config: {key}:" in text, text[-3000:]
    assert "Building DAG" not in text and not (wf / "results").exists()


def test_lint_is_clean():
    proc = subprocess.run(snakemake_cmd("--lint"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


def test_local_run_produces_tables_figures_and_run_files(workflow_run):
    res = workflow_run / "results"
    tables = res / "tables" / "main"  # a config without `experiments` is the one experiment "main"
    for name in ("main", "ablation", "communication"):
        for ext in ("md", "tex", "csv"):
            assert (tables / f"{name}.{ext}").stat().st_size > 0
    assert (tables / "runs.csv").is_file()
    # FedAvg and FedProx have the signal-free diagnostics (across-client agreement), so a diagnostics figure too
    assert {p.name for p in (res / "figures" / "main").iterdir() if not p.name.startswith(".")} == {
        "accuracy.png", "accuracy.pdf", "communication.png", "communication.pdf",
        "diagnostics_digits_dirichlet_a0.5_n10_global_auto.png", "diagnostics_digits_dirichlet_a0.5_n10_global_auto.pdf"}
    main = (tables / "main.md").read_text()
    assert "FedAvg" in main and "FedProx" in main
    runs = sorted(p.parent for p in (res / "runs").glob("**/metrics.parquet"))
    assert [str(p.relative_to(res / "runs")) for p in runs] == [
        "digits/dirichlet-a0p5-n10/fedavg/default/ps0_s0", "digits/dirichlet-a0p5-n10/fedprox/default/ps0_s0"]
    for run in runs:
        assert (run / "config.json").is_file() and (run / "checkpoint.pt").is_file()
    meta = json.loads((res / "partitions/digits/dirichlet-a0p5-n10/ps0/meta.json").read_text())
    assert (meta["dataset"], meta["scheme"], meta["num_clients"], meta["seed"]) == ("digits", "dirichlet", 10, 0)
    assert (res / "partitions/digits/dirichlet-a0p5-n10/ps0/histogram.png").is_file()


@pytest.mark.slow  # one more Snakemake dry run; the default suite keeps it covered by
# test_switching_execution_keys_in_a_finished_sweep_reruns_nothing, whose first dry run (only execution keys
# changed, so every rule's inputs and params are the unchanged ones) must also find nothing to be done
def test_rerun_with_nothing_changed_does_nothing(workflow_run):
    proc = smk(workflow_run, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_switching_execution_keys_in_a_finished_sweep_reruns_nothing(workflow_run):
    """client_store, diagnostics, diagnostics_every and checkpoint_every change no number, so they are not in the
    train rule's params (the canonical config): switching them plans nothing; a key that can change a number
    still reruns every run."""
    cfg_path = workflow_run / "config" / "config.yaml"
    original = cfg_path.read_text()
    try:
        changed = yaml.safe_load(original)
        changed["defaults"].update(client_store="disk", diagnostics=False, diagnostics_every=1, checkpoint_every=2)
        cfg_path.write_text(yaml.safe_dump(changed, sort_keys=False))
        proc = smk(workflow_run, "-n")
        assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
        changed["defaults"]["eval_every"] = 2
        cfg_path.write_text(yaml.safe_dump(changed, sort_keys=False))
        assert len(planned(smk(workflow_run, "-n")).get("train", [])) == 2
    finally:
        cfg_path.write_text(original)


@pytest.mark.slow
def test_deleting_tables_rebuilds_only_the_tables(workflow_run):
    shutil.rmtree(workflow_run / "results" / "tables")
    proc = smk(workflow_run, "-n")
    assert set(planned(proc)) == {"aggregate", "all"}, proc.stdout[-3000:]
    proc = smk(workflow_run, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workflow_run / "results" / "tables" / "main" / "main.md").is_file()
    assert "Nothing to be done" in smk(workflow_run, "-n").stdout


@pytest.mark.slow
def test_changing_one_hyperparameter_reruns_only_that_methods_runs(workflow_run):
    cfg_path = workflow_run / "config" / "config.yaml"
    original = cfg_path.read_text()
    fedavg = workflow_run / "results/runs/digits/dirichlet-a0p5-n10/fedavg/default/ps0_s0/metrics.parquet"
    fedprox = workflow_run / "results/runs/digits/dirichlet-a0p5-n10/fedprox/default/ps0_s0"
    before = fedavg.stat().st_mtime_ns
    try:
        changed = yaml.safe_load(original)
        changed["methods"]["fedprox"]["default"]["mu"] = 0.1
        cfg_path.write_text(yaml.safe_dump(changed, sort_keys=False))
        jobs = planned(smk(workflow_run, "-n"))
        assert jobs["train"] == [str(fedprox.relative_to(workflow_run) / "metrics.parquet")]
        assert set(jobs) == {"train", "aggregate", "figures", "all"}
        proc = smk(workflow_run, "--cores", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads((fedprox / "config.json").read_text())
        assert info["config"]["method_params"]["mu"] == 0.1
        assert fedavg.stat().st_mtime_ns == before
    finally:
        cfg_path.write_text(original)


def test_paper_config_plans_quickly_on_its_own(tmp_path):
    import resource

    # in a copy: what the checkout's results/ and data/ hold (a pipeline run, downloads) must not matter
    wf = copy_workflow(tmp_path, TINY)
    for name in ("paper.yaml", "published.yaml"):  # paper.yaml names the published-results registry
        shutil.copy2(REPO / "config" / name, wf / "config" / name)
    # the CPU time of Snakemake (and its children), not the wall clock: the other pytest-xdist worker shares the cores
    t0 = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    proc = subprocess.run(snakemake_cmd("-n", "--configfile", "config/paper.yaml"), cwd=wf, capture_output=True,
                          text=True, timeout=300)
    elapsed = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned(proc)
    trained = jobs["train"]
    assert len(trained) >= 500 and elapsed < 60
    # --configfile replaces config/config.yaml (no quick-default digits runs mixed in)
    assert not [p for p in trained if "/digits/" in p]
    assert any("/cifar10/creff-a0p2-rho50-n10/fedhpro/paper/" in p for p in trained)
    assert any("/cifar100/pathological-k20-n10/" in p for p in trained)
    # every experiment of the paper gets its tables and figures
    experiments = set(yaml.safe_load((REPO / "config" / "paper.yaml").read_text())["experiments"])
    assert {"label_skew", "label_skew_published", "label_skew_balanced", "feature_shift", "model_heterogeneity",
            "text", "sun397", "ablation", "fedproto_mnist", "fedproto_cifar100"} <= experiments
    assert {Path(p).name for p in jobs["aggregate"]} == experiments
    assert {Path(p).name for p in jobs["figures"]} == experiments
    assert any("/cifar10/creff-a0p5-rho100-n10/fedproto/personalized/" in p for p in trained)
    assert any("/cifar10/dirichlet-a0p1-n20/fedtgp/default/" in p for p in trained)
    assert any("/cifar10/creff-a0p5-rho100-n10/gfpl/projection/" in p for p in trained)


@pytest.mark.slow
def test_experiments_workflow_writes_tables_and_figures_per_experiment(tmp_path):
    """Two experiments sharing a run: each gets its own tables and figures from its own runs."""
    config = {"defaults": {"rounds": 2, "num_clients": 10, "batch_size": 32, "lr": 0.05, "device": "cpu"},
              "seeds": [0],
              "experiments": {
                  "skew": {"title": "Label skew", "datasets": {"digits": {}},
                           "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
                           "methods": {"fedavg": {"default": {}}, "fedprox": {"default": {"mu": 0.01}}}},
                  "abl": {"title": "Ablations", "kind": "ablation", "datasets": {"digits": {}},
                          "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
                          "methods": {"fedprox": {"default": {"mu": 0.01}}},
                          "ablations": {"methods": ["fedprox"], "variants": {"mu1": {"mu": 1.0}}}}}}
    wf = copy_workflow(tmp_path, config)
    proc = smk(wf, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = wf / "results"
    assert len(list((res / "runs").glob("**/metrics.parquet"))) == 3  # the shared FedProx run is trained once
    skew = (res / "tables" / "skew" / "main.md").read_text()
    assert skew.startswith("Table: Label skew.") and "FedAvg" in skew and "mu1" not in skew
    assert not (res / "tables" / "skew" / "ablation.md").exists()
    abl = (res / "tables" / "abl" / "ablation.md").read_text()
    assert abl.startswith("Table: Ablations.") and "mu1" in abl and "FedAvg" not in abl
    assert (res / "figures" / "skew" / "accuracy.png").is_file()
    assert {p.name for p in (res / "figures" / "abl").iterdir() if not p.name.startswith(".")} == {
        "ablation.png", "ablation.pdf"}
    assert "Nothing to be done" in smk(wf, "-n").stdout


# One Snakemake start each (about 11 s on 2 cores): each entry point and each way of naming the file once in the
# default suite, the other pairings `slow`.
@pytest.mark.parametrize("entry, args", [
    ("snakemake", ["--configfile", "missing.yaml"]),
    ("run-pipeline.sh", ["--configfile=missing.yaml"]),
    ("snakemake", ["--configfile", "config/config.yaml", "missing.yaml"]),
    pytest.param("run-pipeline.sh", ["--configfile", "missing.yaml"], marks=pytest.mark.slow),
    pytest.param("snakemake", ["--configfile=missing.yaml"], marks=pytest.mark.slow),
    pytest.param("run-pipeline.sh", ["--configfile", "config/config.yaml", "missing.yaml"], marks=pytest.mark.slow),
])
def test_a_missing_config_file_is_one_line(entry, args):
    """Snakemake reads --configfile before any workflow code and prints a traceback for a missing one; the
    venv's start hook (fedhpro.snakestart, run by a .pth file at interpreter start) checks first, also under
    run-pipeline.sh."""
    cmd = snakemake_cmd("-n", *args) if entry == "snakemake" else \
        ["bash", str(REPO / "scripts" / "run-pipeline.sh"), "-n", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: config file missing.yaml (--configfile) does not exist"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("content, message", [
    ("[1\n", "error: config file 'bad.yaml' is not valid YAML/JSON (line 2, column 1): "),
    ("seeds: [0]\nseeds: [1]\n", "error: config file 'bad.yaml': line 2 duplicate key 'seeds'"),
    (None, "error: config file bad.yaml (--configfile) is a directory"),
])
def test_an_invalid_or_directory_config_file_is_one_line_naming_it(tmp_path, content, message):
    """Snakemake says "Config file is not valid JSON or YAML" (no file, no line) and calls a directory missing."""
    bad = tmp_path / "bad.yaml"
    if content is None:
        bad.mkdir()
    else:
        bad.write_text(content)
    proc = subprocess.run(snakemake_cmd("-n", "--configfile", "bad.yaml"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr


def tiny_workflow_config(**changes) -> dict:
    """One FedAvg run of one round on digits with 2 clients (fast to load and to run)."""
    cfg = {"defaults": {"rounds": 1, "num_clients": 2, "batch_size": 32, "device": "cpu"},
           "datasets": {"digits": {}}, "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
           "methods": {"fedavg": {"default": {}}}, "seeds": [0], "reporting": {"rule": "final"}}
    cfg.update(changes)
    return cfg


def test_a_typo_in_a_top_level_key_is_one_line(tmp_path):
    """snakemake.utils.validate's message holds the whole JSON schema (~1,400 lines)."""
    cfg = tiny_workflow_config()
    cfg["heterogenity"] = cfg.pop("heterogeneity")
    proc = smk(copy_workflow(tmp_path, cfg), "-n")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "invalid workflow config: heterogenity: unknown key; accepted: results, data_root," in text, text[-2000:]
    assert len(text.splitlines()) < 10 and "$defs" not in text, text[-2000:]


def test_schema_errors_name_the_key_in_one_line():
    from fedhpro.runtable import schema_error

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    assert schema_error(tiny_workflow_config(), schema) is None
    assert schema_error(tiny_workflow_config(reporting={"rule": "final", "lastk": 2}), schema) == \
        "reporting.lastk: unknown key; accepted: rule, last_k"
    message = schema_error(tiny_workflow_config(seeds="zero"), schema)
    assert message.startswith("seeds: 'zero' is not of type 'array'"), message
    message = schema_error(tiny_workflow_config(results=["x" * 200]), schema)
    assert message.startswith("results: ['xxx") and "..." in message and len(message) < 150, message


@pytest.mark.parametrize("key, value, message", [
    ("results", "{tmp}/a_file", "results: {tmp}/a_file is not a directory"),
    ("data_root", "{tmp}/a_file/data",
     "data_root: {tmp}/a_file/data lies under {tmp}/a_file, which is not a directory"),
])
def test_a_directory_key_that_is_a_file_is_one_line(tmp_path, key, value, message):
    (tmp_path / "a_file").write_text("not a directory")
    value, message = value.format(tmp=tmp_path), message.format(tmp=tmp_path)
    proc = smk(copy_workflow(tmp_path, tiny_workflow_config(**{key: value})), "-n")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"invalid workflow config: {message}\n" in text, text[-2000:]
    assert "Traceback" not in text and "NotADirectoryError" not in text


def test_the_run_table_is_one_line_when_invalid_or_interrupted(monkeypatch):
    """The workflow computes its run table in its own process: a config error and a Ctrl-C become the one-line
    RunTableError / RunTableInterrupted that common.smk prints, never a traceback."""
    from fedhpro import runtable

    table = runtable.load_run_table(TINY, "data")
    assert [run.method for run in table.runs] == ["fedavg", "fedprox"] and table.partitions
    assert table.runs[0].config_hash == from_dict(json.loads(table.runs[0].config_json)).config_hash()
    with pytest.raises(runtable.RunTableError, match=r"^heterogeneity\[0\]\.alpha"):
        runtable.load_run_table({**TINY, "heterogeneity": [{"partition": "dirichlet", "alpha": -1}]}, "data")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtable, "build_run_table", interrupted)
    with pytest.raises(runtable.RunTableInterrupted,
                       match=r"^interrupted while loading the workflow config; rerun the same command$"):
        runtable.load_run_table(TINY, "data")


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A shell runs a background command (`cmd &`, a CI
    runner, nohup) with SIGINT ignored, an ignored signal stays ignored across exec, and Python then installs
    no KeyboardInterrupt handler: the Snakemake under test would never see the Ctrl-C (that was the 120 s
    "hang" and the "finished before its interrupt" of these tests after the pipeline command)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interruptible_snakemake(wf: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`snakemake ARGS` in its own process group (a terminal's foreground job), SIGINT at its default."""
    return subprocess.Popen(snakemake_cmd(*args), cwd=wf, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=_default_sigint, env=env)


def _group_interrupt(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> str:
    """Wait for ready() (a state the process holds until interrupted, never a race), then SIGINT the process
    group (a terminal's Ctrl-C); the output. Snakemake must be gone within 60 s."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"snakemake ended before {what}: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"snakemake still ran 60 s after Ctrl-C ({what}): {proc.communicate()[0][-3000:]}")
    return out


# In the Snakemake under test (a sitecustomize module): once the workflow imports fedhpro.runtable, its
# build_run_table says so in a file and waits, so that a Ctrl-C lands while the workflow loads, however fast
# the machine.
HOLD_RUNTABLE = """import importlib.abc, importlib.util, os, sys, time
class Hold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "fedhpro.runtable" or not os.environ.get("HOLD_MARKER"):
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module
        def exec_module(module):
            load(module)
            real = module.build_run_table
            def held(*args, **kwargs):
                open(os.environ["HOLD_MARKER"], "w").close()
                time.sleep(120)
                return real(*args, **kwargs)
            module.build_run_table = held
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Hold())
"""


def test_ctrl_c_while_the_workflow_loads_is_one_line(tmp_path):
    import os

    wf = copy_workflow(tmp_path, tiny_workflow_config())
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_RUNTABLE)
    marker = tmp_path / "runtable-started"
    env = {**os.environ, "HOLD_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    proc = interruptible_snakemake(wf, "--cores", "1", env=env)
    text = _group_interrupt(proc, marker.exists, "run table")
    assert proc.returncode != 0
    assert "interrupted while loading the workflow config; rerun the same command" in text, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


def test_ctrl_c_mid_job_is_one_line_and_the_log_holds_no_traceback(tmp_path):
    """Was `train failed:  (full log: ...)` (empty reason) and the log's KeyboardInterrupt traceback."""
    wf = copy_workflow(tmp_path, tiny_workflow_config(defaults={"rounds": 500, "num_clients": 2, "device": "cpu"}))
    proc = interruptible_snakemake(wf, "--cores", "1")
    runs = wf / "results" / "runs"
    # a run of 500 rounds that has written its first checkpoint: mid-job for many seconds more
    text = _group_interrupt(proc, lambda: any(runs.glob("**/checkpoint.pt")), "checkpoint", timeout=300)
    assert proc.returncode != 0
    assert "train: interrupted; rerun the same command to resume" in text, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text and "train failed" not in text, text[-3000:]
    (log,) = (wf / "results" / "logs" / "train").glob("**/*.log")
    assert "Traceback" not in log.read_text() and "interrupted; rerun" in log.read_text()


def test_ctrl_c_tests_see_the_interrupt_even_when_started_in_the_background(tmp_path):
    """The suite started with SIGINT ignored (`bash scripts/run-tests.sh &`): the Snakemake under test still
    gets its KeyboardInterrupt handler."""
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    ignored = subprocess.run(["bash", "-c", f"{sys.executable} -c '{code}' & wait"], capture_output=True, text=True)
    assert ignored.stdout.strip() == "False"  # what a background command inherits
    proc = subprocess.run(["bash", "-c", f"trap '' INT; exec {sys.executable} -c 'import subprocess, sys; "
                           "sys.path.insert(0, \"tests\"); from test_pipeline import _default_sigint; "
                           f"print(subprocess.run([sys.executable, \"-c\", \"{code}\"], capture_output=True, "
                           "text=True, preexec_fn=_default_sigint).stdout.strip())'"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr


def test_a_failing_job_is_one_line_naming_its_log_with_the_traceback_only_in_the_log(tmp_path):
    """A download whose checksum fails (files of a mirror folder that are not MNIST's): the job's one-line error
    and Snakemake's error block naming the log, not the log's traceback (the profile's show-failed-logs)."""
    from fedhpro.data import DATASETS

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for remote in DATASETS["mnist"].downloads:
        (mirror / remote.filename).write_text("not MNIST")
    cfg = tiny_workflow_config(datasets={"mnist": {}}, data_root=str(tmp_path / "data"),
                               mirrors={"mnist": {"*": f"{mirror}/"}})
    wf = copy_workflow(tmp_path, cfg)
    proc = smk(wf, "--cores", "1", "--until", "download")
    text = proc.stdout + proc.stderr
    log = "results/logs/download/mnist.log"
    assert proc.returncode != 0
    assert re.search(rf"^download failed: checksum mismatch for \S+ .*\(full log: {log}\)$", text, re.M), text[-3000:]
    assert f"log: {log} (check log file(s) for error details)" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "Traceback" in (wf / log).read_text() and "ChecksumError" in (wf / log).read_text()


def test_ctrl_c_while_snakemake_starts_is_one_line():
    """A KeyboardInterrupt that Snakemake does not catch (e.g. while it imports its plugins, before any workflow
    code) is one line: the start hook (fedhpro.snakestart) installs the excepthook in a `snakemake` process."""
    code = ("import sys; sys.argv[0] = 'snakemake'; import fedhpro.snakestart as s; s.start(); "
            "raise KeyboardInterrupt")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr == "interrupted; rerun the same command to resume\n", proc.stderr[-2000:]
    code = code.replace("KeyboardInterrupt", "ValueError('other errors are shown as before')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Traceback" in proc.stderr and "ValueError: other errors are shown as before" in proc.stderr
    # not a snakemake process: nothing happens
    code = "import sys, fedhpro.snakestart as s; s.start(); raise KeyboardInterrupt"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Traceback" in proc.stderr and "KeyboardInterrupt" in proc.stderr


def test_the_executor_plugin_does_nothing_at_import():
    """Snakemake imports every installed executor plugin in every call: importing ours defines the plugin and
    nothing else (no excepthook, no command-line parsing, no lock removal, no exit on a missing --configfile)."""
    code = ("import sys; sys.argv = ['snakemake', '--configfile', 'missing.yaml']; hook = sys.excepthook; "
            "import snakemake_executor_plugin_fedhpro as p; "
            "assert sys.excepthook is hook; assert p.Executor and p.common_settings; print('imported')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == "imported\n" and proc.stderr == "", proc.stderr[-2000:]


def test_ctrl_c_while_snakemake_imports_its_own_modules_is_one_line(tmp_path):
    """Snakemake imports ~1 s of its own modules and plugins before ours; a Ctrl-C then was 25-41 lines of
    traceback. The venv runs scripts/snakemake-start.pth first (installed by scripts/bootstrap.sh)."""
    import sysconfig

    hook = REPO / "scripts" / "snakemake-start.pth"
    installed = Path(sysconfig.get_paths()["purelib"]) / "fedhpro-snakemake-start.pth"
    assert installed.is_file() and installed.read_text() == hook.read_text(), \
        f"{installed} missing or stale: run scripts/bootstrap.sh"
    # a `snakemake` interrupted before any module of Snakemake's is imported (argv[0] is what the hook checks)
    fake = tmp_path / "snakemake"
    fake.write_text(f"#!{sys.executable}\nimport sys\nassert 'snakemake' not in sys.modules\nraise KeyboardInterrupt\n")
    fake.chmod(0o755)
    proc = subprocess.run([str(fake)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stderr == "interrupted; rerun the same command to resume\n", proc.stderr
    other = tmp_path / "other"
    other.write_text(fake.read_text())
    other.chmod(0o755)
    proc = subprocess.run([str(other)], capture_output=True, text=True, timeout=60)
    assert "Traceback" in proc.stderr and "KeyboardInterrupt" in proc.stderr  # other programs: untouched


@pytest.mark.slow
def test_the_same_command_after_a_killed_snakemake_removes_its_lock_in_one_line(tmp_path):
    """Was "Directory cannot be locked" until `snakemake --unlock`. The lock of a live Snakemake stays."""
    import os
    import signal
    import time

    wf = copy_workflow(tmp_path, tiny_workflow_config(defaults={"rounds": 500, "num_clients": 2, "device": "cpu"}))
    proc = interruptible_snakemake(wf, "--cores", "1")
    owner = wf / ".snakemake" / "locks" / "fedhpro-owner.json"
    deadline = time.monotonic() + 300
    while not (owner.exists() and any((wf / "results" / "runs").glob("**/checkpoint.pt"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    partition = next((wf / "results" / "partitions").glob("**/partition.npz")).relative_to(wf)
    os.killpg(proc.pid, signal.SIGSTOP)  # alive: its lock is its own
    try:
        live = smk(wf, "--cores", "1", "--force", str(partition))
        assert live.returncode != 0 and "Directory cannot be locked" in live.stdout + live.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    again = smk(wf, "--cores", "1", "--force", str(partition))  # the same command, after the kill
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    assert re.search(rf"^removed the lock left by Snakemake pid {proc.pid}, which is no longer running", text, re.M), \
        text[-3000:]
