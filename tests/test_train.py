"""End-to-end runs on real data (scikit-learn digits): learning, Parquet, determinism, resume, kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import digits_run, numbers
from fedhpro.config import ConfigError, from_dict
from fedhpro.engine import fedavg, tensor_bytes
from fedhpro.runio import CheckpointError, RunLockedError, load_checkpoint, read_metrics_meta, run_lock
from fedhpro.train import train

BASE = digits_run(num_clients=10, seed=3, local_epochs=1)


def test_fedavg_weighted_average_with_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(6)}
    out = fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 5  # (3*1 + 6*3)/4 = 5.25 -> 5
    assert tensor_bytes({"w": a["w"], "x": [a["n"]]}) == 2 * 4 + 8


def test_fedhpro_learns_on_digits_and_writes_typed_parquet(tmp_path):
    cfg = from_dict({**BASE, "method": "fedhpro", "rounds": 4})
    df = train(cfg, tmp_path / "run")
    assert list(df["round"]) == [1, 2, 3, 4]
    assert df["test_acc"].iloc[-1] > 0.3  # chance is 0.1
    assert df["test_acc"].iloc[-1] > df["test_acc"].iloc[0]
    assert (df["status"] == "finished").all()
    schema = pq.read_schema(tmp_path / "run" / "metrics.parquet")
    assert str(schema.field("test_acc").type) == "double"
    assert str(schema.field("round").type) == "int64"
    assert str(schema.field("bytes_up").type) == "int64"
    assert pa.types.is_string(schema.field("method").type) or pa.types.is_large_string(schema.field("method").type)
    version, meta_cfg = read_metrics_meta(tmp_path / "run" / "metrics.parquet")
    assert version == 1 and meta_cfg["method"] == "fedhpro"
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["config_hash"] == cfg.config_hash()
    assert info["git_sha"] and "torch" in info["versions"]
    # communication: up = weights + per-class gradients; down = weights + hyper-prototypes + meta classifier
    assert (df["bytes_up"] > 0).all() and (df["bytes_down"] > 0).all()


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "creff"])
def test_baselines_learn_on_digits(tmp_path, method):
    df = train(from_dict({**BASE, "method": method, "rounds": 4}), tmp_path / method)
    assert df["test_acc"].iloc[-1] > 0.3


def test_same_seed_same_numbers_and_seed_matters(tmp_path):
    cfg = from_dict({**BASE, "method": "fedhpro", "rounds": 2})
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    pd.testing.assert_frame_equal(numbers(a), numbers(b))
    c = train(cfg.replace(seed=4), tmp_path / "c")
    assert not numbers(a)["test_acc"].equals(numbers(c)["test_acc"])


@pytest.mark.parametrize("method", ["fedhpro", "creff"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, method):
    cfg = from_dict({**BASE, "method": method, "rounds": 4, "clients_per_round": 6})
    full = train(cfg, tmp_path / "full")
    partial = train(cfg, tmp_path / "resumed", stop_after_round=2)
    assert len(partial) == 2 and not (tmp_path / "resumed" / "metrics.parquet").exists()
    assert load_checkpoint(tmp_path / "resumed")["round"] == 2
    resumed = train(cfg, tmp_path / "resumed")
    pd.testing.assert_frame_equal(numbers(full), numbers(resumed))


def test_completed_run_is_not_retrained_and_other_config_is_refused(tmp_path):
    cfg = from_dict({**BASE, "method": "fedavg", "rounds": 1})
    train(cfg, tmp_path / "r")
    mtime = (tmp_path / "r" / "metrics.parquet").stat().st_mtime_ns
    train(cfg, tmp_path / "r")
    assert (tmp_path / "r" / "metrics.parquet").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="different run"):
        train(cfg.replace(lr=0.01), tmp_path / "r")
    assert (tmp_path / "r" / "metrics.parquet").stat().st_mtime_ns == mtime


def test_tampered_checkpoint_is_refused(tmp_path):
    cfg = from_dict({**BASE, "method": "fedavg", "rounds": 3})
    train(cfg, tmp_path / "r", stop_after_round=1)
    path = tmp_path / "r" / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or tampered"):
        train(cfg, tmp_path / "r")


def test_second_writer_is_locked_out(tmp_path):
    with run_lock(tmp_path / "r"):
        with pytest.raises(RunLockedError, match="in use"):
            train(from_dict({**BASE, "method": "fedavg", "rounds": 1}), tmp_path / "r")


def test_personalized_mode_reports_client_accuracy(tmp_path):
    cfg = from_dict({**BASE, "method": "fedavg", "rounds": 1})
    assert cfg.effective_local_test_fraction == 0.0
    # FedAvg is global-only; personalized mode is for prototype methods (validated).
    with pytest.raises(ConfigError):
        cfg.replace(eval_mode="personalized")


def _cli(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedhpro.cli", "train", "--config", str(config), "--out", str(out),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.faults
def test_kill_9_mid_run_then_rerun_gives_identical_metrics(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "method": "fedhpro", "rounds": 6}))
    ref = _cli(config, tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()
    killed_at = []
    proc = _cli(config, tmp_path / "killed")
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(tmp_path / "killed")["round"] >= 2:
            time.sleep(0.3)  # land somewhere inside round 3
            os.kill(proc.pid, signal.SIGKILL)
            killed_at.append(True)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "metrics.parquet").exists()
    again = _cli(config, tmp_path / "killed")
    assert again.wait(timeout=600) == 0, again.stdout.read().decode()
    a = pd.read_parquet(tmp_path / "ref" / "metrics.parquet")
    b = pd.read_parquet(tmp_path / "killed" / "metrics.parquet")
    pd.testing.assert_frame_equal(numbers(a), numbers(b))


def test_cli_bad_config_is_one_line_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("method: fedavg\nalpha: -1\n")
    out = subprocess.run([sys.executable, "-m", "fedhpro.cli", "train", "--config", str(config), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: config key 'alpha'")
    assert "Traceback" not in out.stderr


# ---- per-client results (clients.parquet) ------------------------------------------------------------------


def test_personalized_run_writes_per_client_results_identically_after_resume(tmp_path):
    """clients.parquet: every evaluated round and client, consistent with the metrics' client columns; absent
    while the run is unfinished; bit-identical after a stop and resume; checked against config.json."""
    import numpy as np

    from fedhpro.runio import CLIENT_COLUMNS, read_client_results

    cfg = from_dict({**BASE, "method": "fedproto", "eval_mode": "personalized", "num_clients": 5, "rounds": 3,
                     "clients_per_round": 3})
    full = train(cfg, tmp_path / "full")
    clients = read_client_results(tmp_path / "full")
    assert list(clients.columns) == [name for name, _ in CLIENT_COLUMNS]
    schema = pq.read_schema(tmp_path / "full" / "clients.parquet")
    assert [str(schema.field(n).type) for n, _ in CLIENT_COLUMNS] == ["string", "int64", "int64", "double", "int64",
                                                                      "int64"]
    assert len(clients) == 3 * 5 and set(clients["round"]) == {1, 2, 3}
    assert (clients["run_id"] == cfg.config_hash()).all()
    assert (clients["client_acc"] == clients["client_correct"] / clients["client_test_size"]).all()
    for r, grp in clients.groupby("round"):  # the metrics' mean / std / weighted come from these rows
        row = full[full["round"] == r].iloc[0]
        assert row["client_acc_mean"] == pytest.approx(grp["client_acc"].mean(), abs=1e-7)  # fp32 means
        assert row["client_acc_std"] == pytest.approx(np.std(grp["client_acc"]), abs=1e-7)
        assert row["client_acc_weighted"] == pytest.approx(grp["client_correct"].sum() / grp["client_test_size"].sum())
    train(cfg, tmp_path / "resumed", stop_after_round=2)
    assert not (tmp_path / "resumed" / "clients.parquet").exists()  # unfinished: no file
    with pytest.raises(ValueError, match="has not finished"):
        read_client_results(tmp_path / "resumed")
    train(cfg, tmp_path / "resumed")
    resumed_bytes = (tmp_path / "resumed" / "clients.parquet").read_bytes()
    assert resumed_bytes == (tmp_path / "full" / "clients.parquet").read_bytes()
    # a file of another run is refused by the reader
    other = from_dict({**BASE, "method": "fedproto", "eval_mode": "personalized", "num_clients": 5, "rounds": 1})
    train(other, tmp_path / "other")
    (tmp_path / "other" / "clients.parquet").replace(tmp_path / "full" / "clients.parquet")
    with pytest.raises(ValueError, match="belong to another run .*config_hash"):
        read_client_results(tmp_path / "full")


def test_global_run_without_local_splits_writes_an_empty_per_client_file(tmp_path):
    from fedhpro.runio import CLIENT_COLUMNS, read_client_results

    cfg = from_dict({**BASE, "method": "fedavg", "rounds": 1, "num_clients": 4})
    train(cfg, tmp_path / "r")
    empty = read_client_results(tmp_path / "r")
    assert empty.empty and list(empty.columns) == [name for name, _ in CLIENT_COLUMNS]
    split = train(cfg.replace(local_test_fraction=0.2), tmp_path / "split")  # the global model on local splits
    rows = read_client_results(tmp_path / "split")
    assert len(rows) == 4 and rows["client_acc"].between(0, 1).all() and (rows["client_test_size"] > 0).all()
    assert split["client_acc_mean"].isna().all()  # the metrics columns are unchanged
