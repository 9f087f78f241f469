"""Nothing silently wrong, round three (issue 23, the non-cluster items): every case below is correct behaviour
or a one-line error naming the key, file or run, and nothing is lost."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import digits_run, one_line_error
from fedhpro import aggregate as agg
from fedhpro.cli import main as cli_main
from fedhpro.config import from_dict
from fedhpro.runio import METRICS
from fedhpro.train import train

TINY = digits_run(num_clients=3, rounds=1, batch_size=64, lr=0.1, device="cpu", method="fedavg")
# FedHPro's server steps cut down: the runs only need to exist (seconds each)
HPRO_FAST = {"matching_steps": 2, "feature_matching_steps": 2, "retrain_epochs": 2, "prototypes_per_class": 2,
             "features_per_class": 5, "real_batch": 16}


def cfg_of(**changes):
    return from_dict({**TINY, **changes})


def hpro(params: dict | None = None, **changes):
    return cfg_of(method="fedhpro", method_params={**HPRO_FAST, **(params or {})}, **changes)


# ------------------------------------------------------------------ 1: one (method, variant) row, one config
@pytest.mark.parametrize("mode", ["global", "personalized"])
@pytest.mark.parametrize("a, b, difference, same_seed", [
    ({}, {"aggregation": "fedavg"}, "method_params.aggregation: 'last_client' vs 'fedavg'", True),
    ({}, {"aggregation": "fedavg"}, "method_params.aggregation: 'last_client' vs 'fedavg'", False),
    ({"aggregation": "fedavg"}, {"aggregation": "fedavg", "hpcl": False}, "method_params.hpcl: True vs False", True),
    ({}, {"temperature": 0.1}, "method_params.temperature: 0.05 vs 0.1", False),
], ids=["aggregation-same-seed", "aggregation-other-seed", "hpcl", "temperature"])
def test_aggregate_refuses_one_variant_name_over_two_fedhpro_configs(tmp_path, capsys, mode, a, b, difference,
                                                                      same_seed):
    """Two FedHPro runs under one variant name that differ in a method parameter (aggregation among them, which
    is shown in the row label but was not part of the row key) are refused, naming both directories and the
    parameter, by collect and so by every table (main, personalized, ablation, communication)."""
    runs = tmp_path / "runs"
    train(hpro(a, eval_mode=mode), runs / "a", progress=False)
    train(hpro(b, eval_mode=mode, seed=0 if same_seed else 1), runs / "b", progress=False)
    with pytest.raises(agg.MixedSeedsError) as info:
        agg.collect(str(runs / "**" / METRICS))
    text = str(info.value)
    assert str(runs / "a") in text and str(runs / "b") in text
    assert difference in text, text
    for kind in ("comparison", "ablation"):
        err = one_line_error(capsys, cli_main(["aggregate", "--runs", str(runs / "**" / METRICS), "--kind", kind,
                                               "--out", str(tmp_path / kind)]))
        assert str(runs / "a") in err and str(runs / "b") in err and difference.split(":")[0] in err
        assert not (tmp_path / kind / "main.md").exists() and not (tmp_path / kind / "communication.md").exists()
    # under their own variant names they are two rows, each labelled by its own aggregation
    shutil.rmtree(runs / "b")
    train(hpro(b, eval_mode=mode, variant="other"), runs / "b", progress=False)
    summary = agg.summarize(agg.collect(str(runs / "**" / METRICS)))
    assert sorted(summary["variant"]) == ["default", "other"] and summary["n"].tolist() == [1, 1]


# ------------------------------------------------------------------ 2: configs that cannot run are refused up front
WF = {"defaults": {"rounds": 5, "num_clients": 3}, "datasets": {"digits": {}},
      "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}}, "seeds": [0],
      "reporting": {"rule": "last_k", "last_k": 3}}
HET = {"eval_mode": "personalized", "method": "fedproto"}


@pytest.mark.parametrize("changes, match", [
    ({**HET, "client_models": ["cnn", "text_embedding_bag"]},
     r"config key 'client_models': 'text_embedding_bag' is a text model, but dataset 'digits' holds images"),
    ({"model": "text_embedding_bag"}, r"config key 'model': 'text_embedding_bag' is a text model.*'digits' holds "
                                      r"images; accepted: cnn, "),
    ({"model": "text_transformer"}, r"config key 'model': 'text_transformer' is a text model"),
    ({"dataset": "agnews", "model": "cnn"}, r"config key 'model': 'cnn' is an image model, but dataset 'agnews' "
                                            r"holds text; accepted: text_embedding_bag, text_transformer"),
    ({**HET, "client_models": ["cnn", "resnet10"], "model": "cnn"},
     r"config key 'model' \('cnn'\) is not used when 'client_models' is set"),
], ids=["text-client-model-on-images", "text-model-on-images", "transformer-on-images", "image-model-on-text",
        "model-with-client_models"])
def test_models_that_do_not_fit_the_data_are_refused_at_validation(tmp_path, capsys, changes, match):
    """One check (config validation), reached by `fedhpro train` before anything is written and by the workflow at
    load, never at run time (a 41-line TypeError before)."""
    import yaml

    from fedhpro.config import ConfigError
    from fedhpro.sweep import SweepConfigError, validate_workflow_config

    with pytest.raises(ConfigError, match=match):
        cfg_of(**changes)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY, **changes}))
    err = one_line_error(capsys, cli_main(["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert ("config key 'model" in err or "config key 'client_models'" in err) and not (tmp_path / "run").exists()
    dataset = changes.get("dataset", "digits")
    wf = {**WF, "datasets": {dataset: {}}, "defaults": {**WF["defaults"], **{k: v for k, v in changes.items()
                                                                          if k not in ("dataset", "method")}},
          "methods": {changes.get("method", "fedavg"): {"default": {}}}}
    with pytest.raises(SweepConfigError, match=match):
        validate_workflow_config(wf)
    assert cfg_of(**{**HET, "client_models": ["cnn", "resnet10"]}).client_models == ("cnn", "resnet10")


# ------------------------------------------------------------------ 3: --path of fingerprint and partition
def _image_tree(root: Path, classes=("cat", "dog")) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(6 if split == "train" else 2):
                Image.new("RGB", (8, 8), (50 + i, 10 * (c == "dog"), 3)).save(d / f"{i}.png")
    return root


def test_fingerprint_and_partition_take_path_or_say_in_one_line_why_not(tmp_path, capsys):
    from fedhpro.partition import main as partition_main

    for argv in (["fingerprint", "--dataset", "digits", "--path", str(tmp_path)],
                 ["partition", "--dataset", "digits", "--scheme", "iid", "--num-clients", "3", "--path", str(tmp_path)]):
        err = one_line_error(capsys, cli_main(argv))
        assert "--path" in err and "'digits'" in err
    src = _image_tree(tmp_path / "imgs")
    assert cli_main(["fingerprint", "--dataset", "imagefolder", "--path", str(src), "--data-root",
                     str(tmp_path / "data")]) == 0
    fp = capsys.readouterr().out.strip()
    assert fp.startswith("sha256:")
    out = tmp_path / "part"
    assert partition_main(["--dataset", "imagefolder", "--scheme", "iid", "--num-clients", "2", "--path", str(src),
                           "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    import json

    assert json.loads((out / "meta.json").read_text())["identity"]["data_fingerprint"] == fp


# ------------------------------------------------------------------ 7: fewer than 2 classes
def test_one_class_image_folder_is_refused_at_load(tmp_path, capsys):
    import yaml

    src = _image_tree(tmp_path / "imgs", classes=("cat",))
    run = {**TINY, "dataset": "imagefolder", "partition": "iid", "alpha": None, "num_clients": 2,
           "dataset_options": {"path": str(src), "image_size": 8}}
    with pytest.raises(ValueError, match=r"imgs: 1 class folder\(s\) \(cat\) under train/; a classifier needs at "
                                         r"least 2"):
        train(cfg_of(**run), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.parquet").exists()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    err = one_line_error(capsys, cli_main(["train", "--config", str(config), "--out", str(tmp_path / "r2")]))
    assert "1 class folder" in err and str(src) in err


def test_one_class_training_data_of_any_loader_is_refused(monkeypatch):
    import torch

    from fedhpro.data import DATASETS, load_dataset

    real = DATASETS["digits"].loader

    def one_class(root, **options):
        data = real(root, **options)
        keep = data.train_y == 3
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
        return data

    import dataclasses

    monkeypatch.setitem(DATASETS, "digits", dataclasses.replace(DATASETS["digits"], loader=one_class))
    with pytest.raises(ValueError, match=r"dataset 'digits' holds 1 class\(es\) in its training data"):
        load_dataset("digits")
    monkeypatch.undo()
    assert len(torch.unique(load_dataset("digits").train_y)) == 10


# ------------------------------------------------------------------ 10: dataset_options.test_fraction
@pytest.mark.parametrize("value, match", [
    (0.001, r"\(0\.001\) leaves 2 test and 1795 training samples.*at least 10 \(one per class\)"),
    (0.005, r"leaves 9 test"),
    (0.995, r"leaves 1789 test and 8 training"),
    (1.0, r"must be a number in \(0, 1\), got 1\.0"),
    (0, r"must be a number in \(0, 1\), got 0"),
    (-0.2, r"must be a number in \(0, 1\)"),
    ("much", r"must be a number in \(0, 1\), got 'much'"),
])
def test_test_fraction_is_checked_up_front_naming_the_key(tmp_path, capsys, value, match):
    import yaml

    from fedhpro.config import ConfigError
    from fedhpro.data import load_dataset
    from fedhpro.sweep import SweepConfigError, validate_workflow_config

    with pytest.raises(ConfigError, match=r"config key 'dataset_options\.test_fraction'.*" + match):
        cfg_of(dataset_options={"test_fraction": value})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY, "dataset_options": {"test_fraction": value}}))
    err = one_line_error(capsys, cli_main(["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert "dataset_options.test_fraction" in err and "test_size" not in err
    with pytest.raises(SweepConfigError, match="test_fraction"):
        validate_workflow_config({**WF, "datasets": {"digits": {"options": {"test_fraction": value}}}})
    if isinstance(value, float) and 0 < value < 1:  # the loader itself (e.g. fingerprint) says the same
        with pytest.raises(ConfigError, match=match):
            load_dataset("digits", test_fraction=value)
    assert len(load_dataset("digits", test_fraction=0.006).test_y) == 11


# ------------------------------------------------------------------ 4: an empty --out
def test_empty_out_is_refused_and_nothing_lands_in_the_current_directory(tmp_path, capsys, monkeypatch):
    import yaml

    from fedhpro.partition import main as partition_main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(TINY))
    before = sorted(tmp_path.iterdir())
    for flag, argv in [("--out", ["train", "--config", str(config), "--out", ""]),
                       ("--out", ["partition", "--dataset", "digits", "--scheme", "iid", "--num-clients", "3",
                                  "--out", ""]),
                       ("--out", ["aggregate", "--runs", str(tmp_path), "--out", ""]),
                       ("--figures", ["aggregate", "--runs", str(tmp_path), "--out", "t", "--figures", " "])]:
        err = one_line_error(capsys, cli_main(argv))
        assert f"{flag} is empty" in err, err
    assert sorted(tmp_path.iterdir()) == before
    assert partition_main(["--dataset", "digits", "--scheme", "iid", "--num-clients", "3", "--out", " "]) == 2
    assert sorted(tmp_path.iterdir()) == before


# ------------------------------------------------------------------ 11: a finished, read-only run directory
@pytest.mark.slow  # two CLI processes (about 35 s on a 2-core machine)
def test_finished_read_only_run_is_reinvoked_without_writing():
    """As another user than root (root writes anywhere): the run is made, its directory and files made read-only,
    and the same command again prints the run's result and exits 0, writing nothing."""
    import os
    import subprocess
    import sys

    import yaml

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root")
    import tempfile

    with tempfile.TemporaryDirectory() as name:  # pytest's own tmp_path is private to its user
        base = Path(name)
        base.chmod(0o755)
        for parent in base.parents:  # the unprivileged user must reach the files
            if parent != Path("/") and parent.stat().st_mode & 0o005 != 0o005:
                pytest.skip(f"{parent} is not readable by other users")
        _reinvoke_read_only(base)


def _reinvoke_read_only(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    fedhpro = [sys.executable, "-m", "fedhpro.cli", "train", "--config", str(config), "--out", str(out), "--quiet",
               "--threads", "1"]
    assert subprocess.run(fedhpro, capture_output=True, text=True).returncode == 0
    for path in [out, *out.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    snapshot = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    env = {**os.environ, "HOME": str(tmp_path), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    done = subprocess.run(drop + fedhpro, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "status finished" in done.stdout and "not writable" not in done.stderr
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == snapshot


# ------------------------------------------------------------------ 5: last_k over runs of unequal length
def test_last_k_over_short_runs_is_counted_and_captioned_as_averaged(tmp_path, capsys):
    runs = tmp_path / "runs"
    train(cfg_of(rounds=2), runs / "short", progress=False)
    train(cfg_of(rounds=4, method="fedprox"), runs / "long", progress=False)
    train(cfg_of(rounds=4, method="fedprox", eval_every=3, variant="sparse"), runs / "sparse", progress=False)
    df = agg.collect(str(runs / "**" / METRICS))
    (warning,) = agg.last_k_warnings(df, "last_k", 3)
    # short: rounds 1, 2; sparse: rounds 3, 4 evaluated (every 3rd and the last); long: 3 of 4
    assert "2 finished run(s) have fewer evaluated rounds, 2 to 2" in warning, warning
    assert str(runs / "short") in warning and str(runs / "sparse") in warning and str(runs / "long") not in warning
    summary = agg.summarize(df, "last_k", 3)
    assert dict(zip(summary["variant"] + summary["method"], summary["rounds_taken_min"])) == {
        "defaultfedavg": 2, "defaultfedprox": 3, "sparsefedprox": 2}
    assert cli_main(["aggregate", "--runs", str(runs / "**" / METRICS), "--out", str(tmp_path / "t"), "--rule",
                     "last_k", "--last-k", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning: reporting rule last_k=3, but 2 finished run(s)" in err
    main = (tmp_path / "t" / "main.md").read_text()
    assert "as the mean of the last 3 rounds" in main
    assert "Runs with fewer than 3 evaluated rounds are the mean of all their evaluated rounds" in main
    assert "FedAvg" in main.split("fewest per cell:")[1] and ": 2" in main.split("fewest per cell:")[1]
    assert "Runs with fewer" in (tmp_path / "t" / "communication.md").read_text()
    # nothing short: no note
    shutil.rmtree(runs / "short")
    shutil.rmtree(runs / "sparse")
    assert agg.last_k_warnings(agg.collect(str(runs / "**" / METRICS)), "last_k", 3) == []


# ------------------------------------------------------------------ 6: a foreign Parquet file
def test_foreign_parquet_is_named_as_not_a_metrics_file(tmp_path, capsys, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"a": [1, 2]}).to_parquet("sales.parquet")
    (tmp_path / "run").mkdir()
    pd.DataFrame({"round": [1]}).to_parquet(tmp_path / "run" / METRICS)
    for given, named in (("sales.parquet", "sales.parquet"), (str(tmp_path / "run"), str(tmp_path / "run" / METRICS))):
        with pytest.raises(agg.MetricsFileError, match="is not a metrics file of this pipeline"):
            agg.collect(given)
        err = one_line_error(capsys, cli_main(["aggregate", "--runs", given, "--out", "t"]))
        assert err.startswith(f"error: {named} is not a metrics file of this pipeline"), err
        assert "schema version" not in err and " . " not in err and "(delete" not in err


# ------------------------------------------------------------------ 9: one run id, two thread counts
def test_one_run_id_under_two_thread_counts_says_threads(tmp_path, capsys):
    import torch

    runs = tmp_path / "runs"
    train(cfg_of(), runs / "a", progress=False, threads=1)
    try:
        train(cfg_of(), runs / "b", progress=False, threads=2)
    finally:
        torch.set_num_threads(1)
    with pytest.raises(agg.DuplicateRunError) as info:
        agg.collect(str(runs / "**" / METRICS))
    text = str(info.value)
    assert "with different threads 1 vs 2" in text and "copy" not in text, text
    assert str(runs / "a") in text and str(runs / "b") in text
    err = one_line_error(capsys, cli_main(["aggregate", "--runs", str(runs / "**" / METRICS), "--out",
                                           str(tmp_path / "t")]))
    assert "threads 1 vs 2" in err
    shutil.copytree(runs / "a", tmp_path / "copy" / "a")  # a real copy is still called one
    with pytest.raises(agg.DuplicateRunError, match="keep only one copy"):
        agg.collect([str(runs / "a"), str(tmp_path / "copy" / "a")])


# ------------------------------------------------------------------ 12: YAML 1.2 everywhere; a full disk exits 2
@pytest.mark.parametrize("text, value", [("1_000", "1_000"), ("yes", "yes"), ("on", "on"), ("no", "no"),
                                         ("010", 10), ("0o17", 15), ("0x1F", 31), ("1e-3", 0.001), ("true", True),
                                         ("False", False), ("~", None), ("2020-01-01", "2020-01-01")])
def test_config_files_and_set_read_yaml_1_2(text, value):
    from fedhpro.cli import _parse_set
    from fedhpro.config import load_yaml_text

    assert load_yaml_text(f"x: {text}")["x"] == value and type(load_yaml_text(f"x: {text}")["x"]) is type(value)
    assert _parse_set([f"x={text}"])["x"] == value


def test_yaml_1_1_spellings_are_refused_naming_the_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: digits\nrounds: 1\nnum_clients: 3\n")
    for setting, message in (("seed=1_000", "config key 'seed' must be an integer, got '1_000'"),
                             ("diagnostics=yes", "config key 'diagnostics' must be true or false, got 'yes'")):
        err = one_line_error(capsys, cli_main(["train", "--config", str(config), "--out", str(tmp_path / "r"),
                                               "--set", setting]))
        assert err == f"error: {message}"
        key, value = setting.split("=")
        (tmp_path / "file.yaml").write_text(config.read_text() + f"{key}: {value}\n")
        err = one_line_error(capsys, cli_main(["train", "--config", str(tmp_path / "file.yaml"), "--out",
                                               str(tmp_path / "r")]))
        assert err == f"error: {message}"  # one parser for files and --set
    assert not (tmp_path / "r").exists()


def test_workflow_config_that_snakemake_reads_otherwise_is_refused(tmp_path):
    from fedhpro.sweep import SweepConfigError, check_config_files

    for text, key in (("defaults:\n  diagnostics: yes\n", "defaults.diagnostics"),
                      ("seeds: [0, 1_000]\n", "seeds[1]"), ("defaults: {partition_seed: 010}\n",
                                                             "defaults.partition_seed")):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(SweepConfigError, match=rf"key '{re.escape(key)}': .* by Snakemake's YAML 1\.1 loader"):
            check_config_files([str(tmp_path / "c.yaml")])
    (tmp_path / "c.yaml").write_text("defaults: {lr: 1e-3, diagnostics: false, seed: 1000}\nseeds: [0, 1]\n")
    check_config_files([str(tmp_path / "c.yaml")])  # 1e-3: a number to both (sweep reads it as YAML 1.2)


def test_full_disk_is_exit_status_2_naming_the_file(capsys):
    import errno

    from fedhpro.cliutil import run_guarded

    def job(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/checkpoint.pt")

    err = one_line_error(capsys, run_guarded(job, []))
    assert "No space left on device" in err and "/runs/r/checkpoint.pt" in err


# ------------------------------------------------------------------ 8 and 13: the workflow after a refusal
@pytest.mark.slow  # five real Snakemake runs of a one-round digits workflow (about 2 minutes on 2 cores)
def test_workflow_rebuilds_what_a_refusal_says_to_delete_and_says_why_on_the_console(tmp_path):
    from test_pipeline import copy_workflow, planned, smk, tiny_workflow_config

    wf = copy_workflow(tmp_path, tiny_workflow_config())
    assert smk(wf, "--cores", "1").returncode == 0
    res = wf / "results"
    (pdir,) = [p.parent for p in (res / "partitions").glob("**/partition.npz")]
    (metrics,) = list((res / "runs").glob("**/metrics.parquet"))
    from fedhpro.partition import main as partition_main

    assert partition_main(["--dataset", "digits", "--scheme", "dirichlet", "--alpha", "0.5", "--num-clients", "2",
                           "--seed", "7", "--out", str(tmp_path / "other")]) == 0
    # a partition.npz of another partition: the run is refused, and the console says so and what to do
    shutil.copy(tmp_path / "other" / "partition.npz", pdir / "partition.npz")
    proc = smk(wf, "--cores", "1")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "does not match its meta.json" in text and "delete it and rerun snakemake" in text
    (pdir / "partition.npz").unlink()  # as advised
    assert {"partition", "train"} <= set(planned(smk(wf, "-n"))), "a plain rerun must rebuild the partition and run"
    assert smk(wf, "--cores", "1").returncode == 0
    assert (pdir / "partition.npz").is_file() and metrics.is_file()
    assert "Nothing to be done" in smk(wf, "-n").stdout
    # a metrics.parquet of another run: aggregate's console line gives the reason, not only its exit status
    other = tmp_path / "other_run"
    train(cfg_of(rounds=1, num_clients=2, seed=5), other, progress=False)
    shutil.copy(other / METRICS, metrics)
    proc = smk(wf, "--cores", "1", "--forcerun", "aggregate")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # aggregate and figures both read the replaced file (its new mtime makes figures out of date too), and
    # Snakemake's order between them is not fixed: whichever runs first must give the reason on one line
    failed = [x for x in text.splitlines() if re.search(r"\b(aggregate|figures) failed:", x)]
    assert failed, text[-3000:]
    assert "belongs to another run" in failed[0] and str(metrics.relative_to(wf)) in failed[0], failed[0]
    metrics.unlink()  # as advised
    assert "train" in planned(smk(wf, "-n"))
    assert smk(wf, "--cores", "1").returncode == 0 and metrics.is_file()
