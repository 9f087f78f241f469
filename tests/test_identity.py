"""Nothing silently wrong (issue 15): identity of data, partitions and runs checked end to end.

One fault test per item: (1) a partition made with other split keys or other data is refused naming the
key; (2) aggregation refuses two same-seed runs of one cell with different configs; (3) the data location
is out of the config hash and data is identified by content; (4) the thread count is recorded and a
resume under another is refused; (5) a swapped-in metrics.parquet is refused; (6) provenance keeps the
original record and appends one per attempt; (7) atomic writes give umask-derived modes. Then the
one-line CLI errors, the workflow-load refusals and a user's own copy of a dataset (recompressed IDX).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import digits_run, one_line_error
from fedhpro import aggregate as agg
from fedhpro.cli import INTERRUPTED, main as cli_main
from fedhpro.config import ConfigError, from_dict, load_config
from fedhpro.data import fingerprint, load_dataset, plan_downloads, prepare_by_content
from fedhpro.partition import IDENTITY_KEYS, check_identity, main as partition_main
from fedhpro.runio import METRICS, atomic_write_text, metrics_identity
from fedhpro.sweep import SweepConfigError, check_config_files, validate_workflow_config
from fedhpro.train import train

TINY = digits_run(num_clients=3, rounds=2, batch_size=64, lr=0.1, device="cpu", method="fedavg")


def cfg_of(**changes):
    return from_dict({**TINY, **changes})


def make_partition(tmp_path, capsys, *args) -> Path:
    out = tmp_path / "part"
    rc = partition_main(["--dataset", "digits", "--num-clients", "3", "--data-root", str(tmp_path / "data"),
                         "--out", str(out), *args])
    assert rc == 0
    capsys.readouterr()
    return out


# ------------------------------------------------------------------------------------------ item 1
def test_partition_made_with_another_alpha_is_refused_naming_the_key(tmp_path, capsys):
    part = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.05")
    with pytest.raises(ConfigError, match=r"alpha=0\.05.*alpha=0\.5"):
        train(cfg_of(), tmp_path / "run", partition_dir=part)
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything is recorded


def test_matching_partition_gives_the_numbers_of_the_computed_split(tmp_path, capsys):
    part = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5")
    a = train(cfg_of(rounds=1), tmp_path / "a", partition_dir=part)
    b = train(cfg_of(rounds=1), tmp_path / "b")
    pd.testing.assert_frame_equal(a.drop(columns=[c for c in a if c.startswith("time_")]),
                                  b.drop(columns=[c for c in b if c.startswith("time_")]))


@pytest.mark.parametrize("key, cli, run", [
    ("scheme", ["--scheme", "iid"], {}),
    ("alpha", ["--scheme", "dirichlet", "--alpha", "0.3"], {}),
    ("imbalance_ratio", ["--scheme", "dirichlet", "--alpha", "0.5", "--rho", "2"], {}),
    ("min_size", ["--scheme", "dirichlet", "--alpha", "0.5", "--min-size", "3"], {}),
    ("seed", ["--scheme", "dirichlet", "--alpha", "0.5", "--seed", "1"], {}),
    ("classes_per_client", ["--scheme", "pathological", "--classes-per-client", "3"],
     {"partition": "pathological", "classes_per_client": 2, "alpha": None}),
    ("dataset_options", ["--scheme", "dirichlet", "--alpha", "0.5"], {"dataset_options": {"test_fraction": 0.2}}),
])
def test_every_partition_key_is_checked(tmp_path, capsys, key, cli, run):
    part = make_partition(tmp_path, capsys, *cli)
    with pytest.raises(ConfigError, match=f"made with {key}="):
        train(cfg_of(**run), tmp_path / "run", partition_dir=part)


def test_partition_of_other_data_is_refused(tmp_path, capsys):
    part = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5")
    meta = json.loads((part / "meta.json").read_text())
    assert set(meta["identity"]) == set(IDENTITY_KEYS)
    meta["identity"]["data_fingerprint"] = "sha256:" + "0" * 64  # as if made from another copy of the data
    (part / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="made with data_fingerprint="):
        train(cfg_of(), tmp_path / "run", partition_dir=part)
    with pytest.raises(ValueError, match="no identity record"):
        check_identity(part, {"dataset": "digits"}, {})


# ------------------------------------------------------------------------------------------ item 2
def test_aggregate_refuses_same_seed_runs_with_different_configs(tmp_path, capsys):
    train(cfg_of(rounds=1), tmp_path / "runs" / "a")
    train(cfg_of(rounds=1, lr=0.05), tmp_path / "runs" / "b")
    with pytest.raises(agg.MixedSeedsError) as info:
        agg.collect(str(tmp_path / "runs" / "**" / METRICS))
    text = str(info.value)
    assert str(tmp_path / "runs" / "a") in text and str(tmp_path / "runs" / "b") in text and "lr: 0.1 vs 0.05" in text
    err = one_line_error(capsys, cli_main(["aggregate", "--runs", str(tmp_path / "runs" / "**" / METRICS),
                                           "--out", str(tmp_path / "tables")]))
    assert "lr" in err and not (tmp_path / "tables" / "main.md").exists()
    # different seeds of one config are a cell's seeds, as before
    shutil.rmtree(tmp_path / "runs" / "b")
    train(cfg_of(rounds=1, seed=1), tmp_path / "runs" / "b")
    summary = agg.summarize(agg.collect(str(tmp_path / "runs" / "**" / METRICS)))
    assert summary["n"].tolist() == [2]


# ------------------------------------------------------------------------------------------ item 3
def test_data_location_is_not_part_of_a_run(tmp_path):
    a, b = cfg_of(data_root="x"), cfg_of(data_root="elsewhere/y")
    assert a.config_hash() == b.config_hash() and a.canonical_json() == b.canonical_json()
    assert "data_root" not in a.canonical_json()
    p1 = cfg_of(dataset_options={"test_fraction": 0.3})
    assert p1.config_hash() != cfg_of().config_hash()  # a loader option that changes the data still counts


def _image_tree(root: Path, shade: int) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(6 if split == "train" else 2):
                Image.new("RGB", (8, 8), (shade + i, 10 * (c == "dog"), 3)).save(d / f"{i}.png")
    return root


def test_data_identified_by_content_moved_copy_same_changed_copy_refused(tmp_path):
    src = _image_tree(tmp_path / "imgs", 50)
    cfg = from_dict({**TINY, "dataset": "imagefolder", "partition": "iid", "alpha": None, "num_clients": 2,
                     "rounds": 2, "dataset_options": {"path": str(src), "image_size": 8}})
    fp = fingerprint(load_dataset("imagefolder", tmp_path / "d1", path=str(src), image_size=8))
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    assert fingerprint(load_dataset("imagefolder", tmp_path / "d2", path=str(moved), image_size=8)) == fp
    assert cfg.replace(dataset_options={"path": str(moved), "image_size": 8}).config_hash() == cfg.config_hash()
    train(cfg, tmp_path / "run", stop_after_round=1)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_fingerprint"] == fp
    # other data under the same name: the resumed run refuses it instead of mixing two datasets
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 200, 200)).save(src / "train" / "cat" / "0.png")
    assert fingerprint(load_dataset("imagefolder", tmp_path / "d3", path=str(src), image_size=8)) != fp
    with pytest.raises(ConfigError, match="trained on other data"):
        train(cfg, tmp_path / "run")


def _tiny_workflow(tmp_path: Path, data_root: str) -> Path:
    from test_pipeline import copy_workflow

    config = {"data_root": data_root, "defaults": {"rounds": 1, "num_clients": 3, "device": "cpu"},
              "datasets": {"digits": {}}, "heterogeneity": [{"partition": "iid"}],
              "methods": {"fedavg": {"default": {}}}, "seeds": [0], "reporting": {"rule": "final"}}
    return copy_workflow(tmp_path, config)


def test_workflow_moving_data_root_reruns_nothing(tmp_path):
    from test_pipeline import planned, smk

    wf = _tiny_workflow(tmp_path, "data_a")
    proc = smk(wf, "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = next((wf / "results" / "runs").glob("**/metrics.parquet"))
    before = metrics.stat().st_mtime_ns
    text = (wf / "config" / "config.yaml").read_text().replace("data_a", "data_b")
    (wf / "config" / "config.yaml").write_text(text)
    proc = smk(wf, "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, planned(proc)
    # the partition job recorded the data's content fingerprint, which the run checked
    meta = json.loads(next((wf / "results" / "partitions").glob("**/meta.json")).read_text())
    assert meta["identity"]["data_fingerprint"] == fingerprint(load_dataset("digits"))
    assert metrics.stat().st_mtime_ns == before


@pytest.mark.slow  # six Snakemake runs (about 90 s on 2 cores); the default suite keeps the area covered by
# test_workflow_moving_data_root_reruns_nothing (the workflow reruns nothing for moved data),
# test_data_identified_by_content_moved_copy_same_changed_copy_refused (content identity, other data refused) and
# test_content_identities_are_cached_by_file_stats_and_follow_the_bytes
def test_workflow_reruns_what_other_data_under_the_same_path_makes_out_of_date(tmp_path):
    """Data given by path is identified by its content at workflow load: a touched or moved but equal copy
    reruns nothing; other data under the same path reruns the partition and the run, whose checkpoint of the
    earlier data is kept aside (not mixed in, not deleted)."""
    from PIL import Image
    from test_pipeline import copy_workflow, planned, smk

    src = _image_tree(tmp_path / "imgs", 50)
    config = {"data_root": "data", "defaults": {"rounds": 2, "num_clients": 2, "device": "cpu", "batch_size": 8},
              "datasets": {"imagefolder": {"dataset_options": {"path": str(src), "image_size": 8}}},
              "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}}, "seeds": [0],
              "reporting": {"rule": "final"}}
    wf = copy_workflow(tmp_path, config)
    proc = smk(wf, "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((wf / "results" / "runs").glob("**/metrics.parquet")).parent
    first = json.loads((run / "config.json").read_text())["data_fingerprint"]
    assert (run / "checkpoint.pt").exists()  # a finished run keeps its last checkpoint
    # equal data: touched, then moved (the path is not part of any identity): nothing to do
    for f in src.rglob("*.png"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    proc = smk(wf, "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, planned(proc)
    moved = tmp_path / "moved"
    shutil.move(src, moved)
    (wf / "config" / "config.yaml").write_text((wf / "config" / "config.yaml").read_text().replace(str(src), str(moved)))
    proc = smk(wf, "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, planned(proc)
    # other data under the same path: the partition and the run are rerun, the old checkpoint set aside
    Image.new("RGB", (8, 8), (200, 200, 200)).save(moved / "train" / "cat" / "0.png")
    jobs = planned(smk(wf, "-n"))
    assert len(jobs.get("partition", [])) == 1 and len(jobs.get("train", [])) == 1, jobs
    proc = smk(wf, "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run / "config.json").read_text())
    second = fingerprint(load_dataset("imagefolder", tmp_path / "d", path=str(moved), image_size=8))
    assert info["data_fingerprint"] == second != first
    assert metrics_identity(run / METRICS)["data_fingerprint"] == second
    assert [s["data_fingerprint"] for s in info["superseded"]] == [first]
    assert (run / info["superseded"][0]["moved_to"] / "checkpoint.pt").is_file()
    assert [a.get("resumed_from_round") for a in info["attempts"]] == [None, None]  # started over, not resumed
    meta = json.loads(next((wf / "results" / "partitions").glob("**/meta.json")).read_text())
    assert meta["identity"]["data_fingerprint"] == second
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(smk(wf, "-n"))


def test_content_identities_are_cached_by_file_stats_and_follow_the_bytes(tmp_path):
    import hashlib

    from fedhpro.data import cached_by_stat
    from fedhpro.runtable import hand_placed_checksums

    cache = tmp_path / "cache.json"
    folder = _image_tree(tmp_path / "imgs", 50)
    calls = []

    def compute():
        calls.append(1)
        return f"value{len(calls)}"

    assert cached_by_stat(cache, {"k": 1}, folder, compute) == "value1"
    assert cached_by_stat(cache, {"k": 1}, folder, compute) == "value1" and len(calls) == 1  # read back
    assert cached_by_stat(cache, {"k": 2}, folder, compute) == "value2"  # another key
    f = folder / "train" / "cat" / "0.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert cached_by_stat(cache, {"k": 1}, folder, compute) == "value3"  # a touched file: computed again
    cache.write_text("[not json")
    assert cached_by_stat(cache, {"k": 1}, folder, compute) == "value4"  # a broken cache is ignored
    # a file without a published checksum placed by hand: its bytes are its identity
    raw = tmp_path / "data" / "syndigits" / "raw"
    raw.mkdir(parents=True)
    (raw / "SynthDigits.zip").write_bytes(b"first copy")
    ids = hand_placed_checksums("syndigits", {"SynthDigits.zip": None}, str(tmp_path / "data"), {}, str(cache))
    assert ids == {"SynthDigits.zip": "sha256:" + hashlib.sha256(b"first copy").hexdigest()}
    (raw / "SynthDigits.zip").write_bytes(b"other copy")
    assert hand_placed_checksums("syndigits", {"SynthDigits.zip": None}, str(tmp_path / "data"), {}, str(cache)) \
        == {"SynthDigits.zip": "sha256:" + hashlib.sha256(b"other copy").hexdigest()}
    assert hand_placed_checksums("syndigits", {"SynthDigits.zip": "md5:" + "0" * 32}, str(tmp_path / "data"), {},
                                 str(cache)) == {}  # verified files are identified by their checksum already


def test_partition_job_refuses_data_that_changed_since_the_workflow_loaded(tmp_path):
    from fedhpro.jobs import write_partition

    src = _image_tree(tmp_path / "imgs", 50)
    cfg = from_dict({**TINY, "dataset": "imagefolder", "partition": "iid", "alpha": None, "num_clients": 2,
                     "dataset_options": {"path": str(src), "image_size": 8}, "data_root": str(tmp_path / "d")})
    fp = fingerprint(load_dataset("imagefolder", tmp_path / "d", path=str(src), image_size=8))
    assert fp in write_partition(cfg, tmp_path / "p1", {"scheme": "iid"}, None, fp)
    with pytest.raises(RuntimeError, match="changed since the workflow was loaded"):
        write_partition(cfg, tmp_path / "p2", {"scheme": "iid"}, None, "sha256:" + "0" * 64)
    assert not (tmp_path / "p2" / "meta.json").exists()


def test_workflow_path_that_cannot_be_loaded_is_refused_at_load(tmp_path):
    from test_pipeline import copy_workflow, smk

    config = {"data_root": "data", "defaults": {"rounds": 1, "num_clients": 2, "device": "cpu"},
              "datasets": {"imagefolder": {"dataset_options": {"path": str(tmp_path / "nowhere")}}},
              "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}}, "seeds": [0],
              "reporting": {"rule": "final"}}
    proc = smk(copy_workflow(tmp_path, config), "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "datasets.imagefolder.dataset_options.path: cannot load" in out, out[-2000:]
    assert "Traceback" not in out


# ------------------------------------------------------------------------------------------ item 4
def test_threads_recorded_and_resume_with_other_threads_refused(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        train(cfg_of(rounds=3), tmp_path / "run", stop_after_round=1, threads=1)
        info = json.loads((tmp_path / "run" / "config.json").read_text())
        assert info["threads"] == 1 and info["attempts"][0]["threads"] == 1
        with pytest.raises(ConfigError, match=r"trained with 1 thread\(s\) and would resume with 2.*--threads 1"):
            train(cfg_of(rounds=3), tmp_path / "run", threads=2)
        df = train(cfg_of(rounds=3), tmp_path / "run", threads=1)
        assert len(df) == 3
        assert metrics_identity(tmp_path / "run" / METRICS)["threads"] == "1"
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ item 5
def test_swapped_in_metrics_parquet_is_refused(tmp_path, capsys):
    train(cfg_of(rounds=1), tmp_path / "a")
    train(cfg_of(rounds=1, seed=1), tmp_path / "b")
    shutil.copy2(tmp_path / "a" / METRICS, tmp_path / "b" / METRICS)
    with pytest.raises(ValueError, match="belongs to another run"):
        train(cfg_of(rounds=1, seed=1), tmp_path / "b")
    with pytest.raises(agg.MetricsFileError, match="belongs to another run"):
        agg.collect([tmp_path / "a", tmp_path / "b"])
    cfg_file = tmp_path / "b.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "rounds": 1, "seed": 1}))
    err = one_line_error(capsys, cli_main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "b"),
                                           "--quiet"]))
    assert "metrics.parquet" in err


def test_metrics_of_the_same_config_on_other_data_or_threads_are_refused(tmp_path):
    """Same config hash, but the metrics file was computed on other data (or with another thread count) than
    config.json records: refused by train and aggregate alike."""
    src = _image_tree(tmp_path / "imgs", 50)
    other = _image_tree(tmp_path / "other", 90)
    base = {**TINY, "dataset": "imagefolder", "partition": "iid", "alpha": None, "num_clients": 2, "rounds": 1}
    cfg_a = from_dict({**base, "dataset_options": {"path": str(src), "image_size": 8}})
    cfg_b = from_dict({**base, "dataset_options": {"path": str(other), "image_size": 8}})
    assert cfg_a.config_hash() == cfg_b.config_hash()
    train(cfg_a, tmp_path / "a")
    train(cfg_b, tmp_path / "b")
    shutil.copy2(tmp_path / "a" / METRICS, tmp_path / "b" / METRICS)
    with pytest.raises(ValueError, match="belongs to another run .data_fingerprint"):
        train(cfg_b, tmp_path / "b")
    with pytest.raises(agg.MetricsFileError, match="belongs to another run .data_fingerprint"):
        agg.collect([tmp_path / "b"])
    info = json.loads((tmp_path / "a" / "config.json").read_text())
    atomic_write_text(tmp_path / "a" / "config.json", json.dumps({**info, "threads": info["threads"] + 1}))
    with pytest.raises(ValueError, match="belongs to another run .threads"):
        train(cfg_a, tmp_path / "a")


# ------------------------------------------------------------------------------------------ item 6
def test_provenance_original_kept_and_one_record_per_attempt(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    train(cfg_of(rounds=3), run, stop_after_round=1)
    first = json.loads((run / "config.json").read_text())
    monkeypatch.setenv("SLURM_JOB_ID", "222")
    monkeypatch.setattr("fedhpro.runio.git_sha", lambda: "feedbeef")  # as if resumed under a newer checkout
    train(cfg_of(rounds=3), run)
    info = json.loads((run / "config.json").read_text())
    for key in ("git_sha", "host", "versions", "slurm_job_id", "started", "config_hash"):
        assert info[key] == first[key], key
    assert [a["slurm_job_id"] for a in info["attempts"]] == ["111", "222"]
    assert [a["resumed_from_round"] for a in info["attempts"]] == [None, 1]
    assert info["attempts"][1]["git_sha"] == "feedbeef" and info["attempts"][0]["git_sha"] != "feedbeef"
    assert [a["outcome"] for a in info["attempts"]] == ["stopped", "finished"]
    assert all(a["started"] and a["ended"] and a["threads"] >= 1 for a in info["attempts"])
    # calling a finished run again changes nothing on disk
    text = (run / "config.json").read_text()
    train(cfg_of(rounds=3), run)
    assert (run / "config.json").read_text() == text


# ------------------------------------------------------------------------------------------ item 7
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "x.txt", "hi")
        assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == mode
    finally:
        os.umask(old)


def test_run_and_partition_files_readable_by_the_group(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        part = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5")
        train(cfg_of(rounds=1), tmp_path / "run", partition_dir=part)
        files = [p for d in (part, tmp_path / "run") for p in d.iterdir() if p.is_file() and p.name != ".lock"]
        assert {p.name for p in files} >= {"partition.npz", "meta.json", "config.json", METRICS}
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------ one-line errors
def test_cli_errors_are_one_line(tmp_path, capsys):
    good = tmp_path / "run.yaml"
    good.write_text(yaml.safe_dump({**TINY, "rounds": 1}))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "partition.npz").write_bytes(os.urandom(200))
    (garbage / "meta.json").write_text("{}")
    cases = [
        (["train", "--config", str(good), "--out", str(tmp_path / "o"), "--threads", "0"], "--threads"),
        (["bench", "--threads", "0"], "--threads"),
        (["train", "--config", str(good), "--out", str(a_file)], "a_file"),
        (["train", "--config", str(good), "--out", str(a_file / "sub")], "a_file"),
        (["aggregate", "--runs", str(tmp_path), "--out", str(a_file)], "a_file"),
        (["partition", "--dataset", "digits", "--scheme", "iid", "--num-clients", "2", "--out", str(a_file)],
         "a_file"),
        (["train", "--config", str(good), "--out", str(listed)], "listed/config.json"),
        (["train", "--config", str(good), "--out", str(broken)], "broken/config.json"),
        (["partition", "--dataset", "nope", "--scheme", "iid", "--num-clients", "2"], "nope"),
        (["train", "--config", str(good), "--out", str(tmp_path / "g"), "--partition-dir", str(garbage)],
         "partition"),
        (["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "m")], "missing.yaml"),
        (["train", "--config", str(good), "--out", str(tmp_path / "s"), "--set", "lr"], "--set"),
    ]
    for argv, needle in cases:
        err = one_line_error(capsys, cli_main(argv))
        assert needle in err, (argv, err)
        assert "allow_pickle" not in err


def test_garbage_partition_names_the_file(tmp_path, capsys):
    part = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5")
    (part / "partition.npz").write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(ValueError, match=r"partition file .*partition.npz"):
        train(cfg_of(), tmp_path / "run", partition_dir=part)


def test_image_folder_with_link_loop_or_dangling_link_is_one_line(tmp_path, capsys):
    src = _image_tree(tmp_path / "imgs", 50)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "dataset": "imagefolder", "partition": "iid", "num_clients": 2,
                                   "dataset_options": {"path": str(src), "image_size": 8}}))
    (src / "train" / "cat" / "loop").symlink_to(src / "train")
    err = one_line_error(capsys, cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert "symlink loop" in err
    (src / "train" / "cat" / "loop").unlink()
    (src / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    err = one_line_error(capsys, cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert "dangling" in err and "gone.png" in err


def test_ctrl_c_prints_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "rounds": 2}))
    from fedhpro.engine import Engine

    real = Engine.run_round

    def interrupted(self, r):
        if r == 2:
            raise KeyboardInterrupt
        return real(self, r)

    monkeypatch.setattr(Engine, "run_round", interrupted)
    rc = cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err == INTERRUPTED
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert info["attempts"][-1]["outcome"] == "interrupted"
    monkeypatch.setattr(Engine, "run_round", real)
    assert cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert [a["resumed_from_round"] for a in info["attempts"]] == [None, 1]


def test_ctrl_c_while_the_package_loads_is_one_line_and_says_resume_only_for_train(monkeypatch, capsys):
    import sys
    import types

    class Loading(types.ModuleType):
        def __getattr__(self, name):  # Ctrl-C arriving while `from fedhpro.runio import ...` imports torch
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "fedhpro.runio", Loading("fedhpro.runio"))
    assert cli_main(["train", "--config", "x.yaml", "--out", "o"]) == 130
    assert capsys.readouterr().err.strip() == INTERRUPTED
    monkeypatch.undo()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agg, "collect", interrupted)
    assert cli_main(["aggregate", "--runs", "r", "--out", "o"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"  # nothing to resume: not promised


def test_config_file_that_is_empty_a_directory_or_bad_method_params_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    (tmp_path / "dir.yaml").mkdir()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TINY))
    for args, expect in (([str(tmp_path / "empty.yaml")], "is empty"), ([str(tmp_path / "dir.yaml")], "is a directory"),
                         ([str(good), "--set", "method_params=[1,2]"], "--set method_params must be a mapping"),
                         ([str(good), "--set", "method_params=5"], "--set method_params must be a mapping")):
        err = one_line_error(capsys, cli_main(["train", "--config", *args, "--out", str(tmp_path / "o"), "--quiet"]))
        assert expect in err, err


def test_run_record_that_is_a_directory_is_one_line(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    (tmp_path / "run" / "config.json").mkdir(parents=True)
    err = one_line_error(capsys, cli_main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "run"),
                                           "--quiet"]))
    assert "config.json is a directory" in err


def test_bench_refuses_a_bad_out_or_rounds_before_it_runs(tmp_path, capsys):
    import time

    afile = tmp_path / "afile"
    afile.write_text("x")
    t0 = time.perf_counter()
    err = one_line_error(capsys, cli_main(["bench", "--quick", "--out", str(afile)]))
    assert "is a file" in err and time.perf_counter() - t0 < 20  # refused up front, not after the benchmark
    err = one_line_error(capsys, cli_main(["bench", "--quick", "--rounds", "0"]))
    assert "--rounds" in err and "expected an integer >= 1" in err


def test_fedhpro_help_lists_every_subcommand(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "partition", "aggregate", "bench", "methods", "datasets", "fingerprint"):
        assert name in out


# ------------------------------------------------------------------------------------------ numbers and keys
def test_exponent_numbers_are_numbers_and_duplicate_keys_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-4\n")
    assert (load_config(path).lr, load_config(path).weight_decay) == (0.001, 0.0005)
    path.write_text(json.dumps({"lr": 1e-2}).replace("0.01", "1e-2"))
    assert load_config(path).lr == 0.01
    assert load_config(path, {"lr": "1e-3"}).lr == 0.001  # as --set lr=1e-3 or a YAML 1.1 loader delivers it
    path.write_text("lr: 0.1\nrounds: 2\nlr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'.*line 1.*line 3"):
        load_config(path)
    with pytest.raises(ConfigError, match="must be a number"):
        from_dict({"lr": "fast"})


# ------------------------------------------------------------------------------------------ workflow load
WF = {"defaults": {"rounds": 5, "num_clients": 3}, "datasets": {"digits": {}},
      "heterogeneity": [{"partition": "iid"}], "methods": {"fedavg": {"default": {}}}, "seeds": [0],
      "reporting": {"rule": "last_k", "last_k": 3}}


def wf(**changes):
    out = json.loads(json.dumps(WF))
    for key, value in changes.items():
        out[key] = value
    return out


def test_workflow_asks_engines_and_methods_what_they_support():
    with pytest.raises(SweepConfigError, match="defaults.engine.*batched.*fedhpro"):
        validate_workflow_config(wf(defaults={"rounds": 5, "num_clients": 10, "engine": "batched"},
                                    methods={"fedhpro": {"default": {}}}))
    assert validate_workflow_config(wf(defaults={"rounds": 5, "num_clients": 3, "engine": "batched"}))
    with pytest.raises(SweepConfigError, match="local_test_fraction"):
        validate_workflow_config(wf(defaults={"rounds": 5, "num_clients": 3, "eval_mode": "personalized",
                                              "local_test_fraction": 0}, methods={"fedproto": {"default": {}}}))


def test_workflow_numbers_and_warnings():
    runs = validate_workflow_config(wf(defaults={"rounds": 5, "num_clients": 3, "lr": "1e-3"},
                                       methods={"fedprox": {"default": {"mu": "1e-2"}}}))
    assert runs[0].config.lr == 0.001 and runs[0].config.method_params["mu"] == 0.01
    warnings = []
    validate_workflow_config(wf(defaults={"rounds": 2, "num_clients": 3}), warn=warnings.append)
    assert any("last_k" in w and "2 round" in w for w in warnings)
    warnings.clear()
    validate_workflow_config(wf(heterogeneity=[{"partition": "iid", "imbalance_ratio": 1000}]), warn=warnings.append)
    assert any("no sample" in w for w in warnings)


def test_long_tail_that_empties_classes_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="imbalance_ratio.*no training sample"):
        train(cfg_of(imbalance_ratio=1000), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_workflow_config_file_with_duplicate_keys_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seeds: [0]\nmethods: {fedavg: {default: {}}}\nseeds: [1]\n")
    with pytest.raises(SweepConfigError, match="duplicate key 'seeds'"):
        check_config_files([path])
    with pytest.raises(SweepConfigError, match="missing.yaml"):
        check_config_files([tmp_path / "missing.yaml"])


# ------------------------------------------------------------------------------------------ own copy of a dataset
def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _fashion_like(folder: Path, level: int, seed: int = 0) -> Path:
    """The four Fashion-MNIST IDX files (tiny), gzip-compressed at `level` (so the .gz bytes differ)."""
    from fedhpro.data.mnist_family import IDX_FILES

    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10, rng.integers(0, 256, (10, 28, 28)),
              np.arange(10) % 10]
    folder.mkdir(parents=True)
    for name, arr in zip(IDX_FILES, arrays):
        (folder / name).write_bytes(gzip.compress(_idx(arr), compresslevel=level, mtime=level))
    return folder


def test_own_copy_given_by_path_needs_no_download_and_is_recorded(tmp_path):
    copy = _fashion_like(tmp_path / "debian-fashion-mnist", level=1)
    assert plan_downloads([("fashion_mnist", {"path": str(copy)})], tmp_path / "data") == {}
    assert plan_downloads([("fashion_mnist", {})], tmp_path / "data")  # without path: the upstream files
    cfg = from_dict({**TINY, "dataset": "fashion_mnist", "partition": "iid", "num_clients": 2, "rounds": 1,
                     "dataset_options": {"path": str(copy)}})
    train(cfg, tmp_path / "run")
    fp = fingerprint(load_dataset("fashion_mnist", tmp_path, path=str(copy)))
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["data_fingerprint"] == fp and info["attempts"][0]["data_fingerprint"] == fp
    assert metrics_identity(tmp_path / "run" / METRICS)["data_fingerprint"] == fp


def test_recompressed_copy_accepted_by_content_with_one_key(tmp_path):
    from fedhpro.data.mnist_family import FASHION_REMOTES

    original = _fashion_like(tmp_path / "upstream", level=9)
    recompressed = _fashion_like(tmp_path / "debian", level=1)
    assert (original / FASHION_REMOTES[0].filename).read_bytes() != (recompressed / FASHION_REMOTES[0].filename
                                                                     ).read_bytes()
    fp = fingerprint(load_dataset("fashion_mnist", tmp_path, path=str(original)))
    root = tmp_path / "data"
    raw = prepare_by_content("fashion_mnist", FASHION_REMOTES, root, {"*": str(recompressed) + "/",
                                                                        "fingerprint": fp}, fp)
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(
        r.filename for r in FASHION_REMOTES)
    assert fingerprint(load_dataset("fashion_mnist", root)) == fp
    other = _fashion_like(tmp_path / "other", level=1, seed=1)  # other data: refused, raw/ untouched
    shutil.rmtree(raw)
    with pytest.raises(ValueError, match="content fingerprint .* other data"):
        prepare_by_content("fashion_mnist", FASHION_REMOTES, root, {"*": str(other) + "/"}, fp)
    assert not any(p for p in raw.iterdir() if not p.name.startswith("."))
    with pytest.raises(ValueError, match="mirrors.fashion_mnist.fingerprint"):
        plan_downloads([("fashion_mnist", {})], root, {"fashion_mnist": {"fingerprint": "md5:abc"}})


# ---- audit A
# Found by an audit after the items above: (1) seeds of one cell from different configs, (2) a partition.npz
# swapped in under another partition's meta.json, (3) an explicit default min_size refused, (4) the partition
# CLI silent about emptied classes, (5) image caches keyed on a restorable mtime, (6) image loader options
# unchecked, (7) raw PIL/OS errors for non-images and missing folders.
def test_audit_aggregate_refuses_cell_seeds_of_different_configs(tmp_path, capsys):
    runs = tmp_path / "runs"
    train(cfg_of(rounds=1, lr=0.05, seed=0), runs / "a")
    train(cfg_of(rounds=1, lr=0.1, seed=1), runs / "b")
    with pytest.raises(agg.MixedSeedsError) as info:
        agg.collect(str(runs / "**" / METRICS))
    text = str(info.value)
    assert str(runs / "a") in text and str(runs / "b") in text and "lr: 0.05 vs 0.1" in text
    assert "seed" not in text.split("differ in")[1].split(";")[0]  # the seeds are not named as a difference
    err = one_line_error(capsys, cli_main(["aggregate", "--runs", str(runs / "**" / METRICS),
                                           "--out", str(tmp_path / "tables")]))
    assert "lr: 0.05 vs 0.1" in err and not (tmp_path / "tables" / "main.md").exists()
    # seeds and partition seeds of one config are one cell's seeds
    shutil.rmtree(runs / "b")
    train(cfg_of(rounds=1, lr=0.05, seed=1), runs / "b")
    train(cfg_of(rounds=1, lr=0.05, seed=0, partition_seed=1), runs / "c")
    summary = agg.summarize(agg.collect(str(runs / "**" / METRICS)))
    assert summary["n"].tolist() == [3]


def test_audit_partition_npz_swapped_in_from_another_partition_is_refused(tmp_path, capsys):
    from fedhpro.partition import PARTS_HASH_KEY, load_partition

    part = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5")
    other = tmp_path / "other"
    assert partition_main(["--dataset", "digits", "--num-clients", "3", "--data-root", str(tmp_path / "data"),
                           "--out", str(other), "--scheme", "dirichlet", "--alpha", "0.5", "--seed", "7"]) == 0
    capsys.readouterr()
    meta = json.loads((part / "meta.json").read_text())
    assert meta[PARTS_HASH_KEY].startswith("sha256:")
    own = (part / "partition.npz").read_bytes()
    shutil.copy(other / "partition.npz", part / "partition.npz")  # meta.json kept: its identity still matches
    with pytest.raises(ValueError, match=r"partition file .*partition\.npz does not match its meta\.json"):
        train(cfg_of(), tmp_path / "run", partition_dir=part)
    assert not (tmp_path / "run" / "config.json").exists()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    err = one_line_error(capsys, cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                                           "--partition-dir", str(part)]))
    assert "partition.npz does not match its meta.json" in err
    # a partition saved before the digest existed (no hash in meta.json) still loads
    (part / "partition.npz").write_bytes(own)
    del meta[PARTS_HASH_KEY]
    (part / "meta.json").write_text(json.dumps(meta))
    assert len(load_partition(part)) == 3


def test_audit_partition_check_names_the_run_config_key(tmp_path, capsys):
    part = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5", "--seed", "1")
    with pytest.raises(ConfigError, match=r"made with seed=1, but the run needs partition_seed=0"):
        train(cfg_of(), tmp_path / "run", partition_dir=part)
    shutil.rmtree(part)
    part = make_partition(tmp_path, capsys, "--scheme", "iid")
    with pytest.raises(ConfigError, match=r"made with scheme='iid', but the run needs partition='dirichlet'"):
        train(cfg_of(), tmp_path / "run", partition_dir=part)


def test_audit_explicit_default_min_size_is_the_same_split(tmp_path, capsys):
    from fedhpro.partition import load_partition

    explicit = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5", "--min-size", "10")
    default = tmp_path / "default"
    assert partition_main(["--dataset", "digits", "--num-clients", "3", "--data-root", str(tmp_path / "data"),
                           "--out", str(default), "--scheme", "dirichlet", "--alpha", "0.5"]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(load_partition(explicit), load_partition(default)))
    a = train(cfg_of(rounds=1), tmp_path / "a", partition_dir=explicit)  # accepted: the run's own split
    b = train(cfg_of(rounds=1), tmp_path / "b")
    assert a["test_acc"].tolist() == b["test_acc"].tolist()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config_hash"] == cfg_of(rounds=1).config_hash()
    # another min_size is another split: still refused, naming the default it was compared with
    shutil.rmtree(explicit)
    explicit = make_partition(tmp_path, capsys, "--scheme", "dirichlet", "--alpha", "0.5", "--min-size", "11")
    with pytest.raises(ConfigError, match=r"made with min_size=11, but the run needs min_size=10"):
        train(cfg_of(), tmp_path / "run", partition_dir=explicit)


def test_audit_partition_cli_warns_of_a_long_tail_that_empties_classes(tmp_path, capsys):
    rc = partition_main(["--dataset", "digits", "--num-clients", "3", "--data-root", str(tmp_path / "data"),
                         "--scheme", "iid", "--rho", "10000"])
    err = capsys.readouterr().err
    assert rc == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no training sample" in warnings[0] and "--rho 10000" in warnings[0], err
    rc = partition_main(["--dataset", "digits", "--num-clients", "3", "--data-root", str(tmp_path / "data"),
                         "--scheme", "iid", "--rho", "2"])
    assert rc == 0 and "warning" not in capsys.readouterr().err


def _png_bytes(seed: int) -> bytes:
    """An uncompressed 8x8 RGB PNG of random pixels: every seed gives other bytes of the same size."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        buf, format="PNG", compress_level=0)
    return buf.getvalue()


def test_audit_image_overwritten_with_same_size_and_restored_mtime_is_decoded_again(tmp_path):
    src = _image_tree(tmp_path / "imgs", 50)
    f = src / "train" / "cat" / "0.png"
    f.write_bytes(_png_bytes(1))
    first = load_dataset("imagefolder", tmp_path / "d", path=str(src), image_size=8)  # decoded, cached
    fp = fingerprint(first)
    st = f.stat()
    other = _png_bytes(2)
    assert len(other) == st.st_size and other != f.read_bytes()
    f.write_bytes(other)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -a leave it
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = load_dataset("imagefolder", tmp_path / "d", path=str(src), image_size=8)
    assert not np.array_equal(first.train_x.numpy(), second.train_x.numpy())
    assert fingerprint(second) != fp
    fresh = load_dataset("imagefolder", tmp_path / "d", path=str(src), image_size=8, cache=False)
    assert np.array_equal(fresh.train_x.numpy(), second.train_x.numpy())


@pytest.mark.parametrize("options, needle", [
    ({"image_size": "8"}, "image_size must be a positive integer or null"),
    ({"image_size": 2.5}, "image_size must be a positive integer or null"),
    ({"image_size": -3}, "image_size must be a positive integer or null"),
    ({"image_size": 0}, "image_size must be a positive integer or null"),
    ({"image_size": True}, "image_size must be a positive integer or null"),
    ({"channels": 2}, "channels must be 1"),
    ({"channels": "3"}, "channels must be 1"),
])
def test_audit_image_folder_options_checked_up_front(tmp_path, capsys, options, needle):
    src = _image_tree(tmp_path / "imgs", 50)
    with pytest.raises(ValueError, match=needle):
        load_dataset("imagefolder", tmp_path / "d", path=str(src), **options)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "dataset": "imagefolder", "partition": "iid", "num_clients": 2,
                                   "data_root": str(tmp_path / "d"),
                                   "dataset_options": {"path": str(src), **options}}))
    err = one_line_error(capsys, cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert needle in err and "cannot decode" not in err


def test_audit_image_folder_valid_options_keep_their_meaning(tmp_path):
    src = _image_tree(tmp_path / "imgs", 50)
    grey = load_dataset("imagefolder", tmp_path / "d", path=str(src), image_size=None, channels=1)
    assert tuple(grey.train_x.shape) == (12, 1, 8, 8)
    big = load_dataset("imagefolder", tmp_path / "d", path=str(src), image_size=np.int64(16))
    assert tuple(big.train_x.shape) == (12, 3, 16, 16)


def test_audit_non_image_file_and_missing_folder_are_named_plainly(tmp_path, capsys):
    src = _image_tree(tmp_path / "imgs", 50)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "dataset": "imagefolder", "partition": "iid", "num_clients": 2,
                                   "data_root": str(tmp_path / "d"),
                                   "dataset_options": {"path": str(src), "image_size": 8}}))
    for content in (b"", b"not a picture at all"):
        (src / "train" / "cat" / "9.png").write_bytes(content)
        err = one_line_error(capsys, cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
        assert f"9.png: not an image file ({len(content)} bytes)" in err and "0x" not in err, err
    (src / "train" / "cat" / "9.png").unlink()
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"image folder {missing} does not exist"):
        load_dataset("imagefolder", tmp_path / "d", path=str(missing))
    cfg.write_text(yaml.safe_dump({**TINY, "dataset": "imagefolder", "partition": "iid", "num_clients": 2,
                                   "data_root": str(tmp_path / "d"),
                                   "dataset_options": {"path": str(missing)}}))
    err = one_line_error(capsys, cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert "does not exist" in err and "Errno" not in err, err
