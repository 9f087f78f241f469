"""`client_store: disk`: same numbers as memory, memory follows participation, crash-consistent resume."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from conftest import digits_run, numbers
from fedhpro.clientstore import CLIENT_STATES_DIR, DiskClientStore
from fedhpro.config import from_dict
from fedhpro.engine import Engine, tensor_bytes
from fedhpro.methods import METHODS
from fedhpro.runio import CHECKPOINT, CheckpointError, load_checkpoint
from fedhpro.train import build_context, train

# Personalized FedProto: every sampled client keeps its own model (and local prototypes) across rounds.
BASE = digits_run(method="fedproto", eval_mode="personalized", num_clients=12, clients_per_round=4, rounds=4,
                  local_epochs=1, seed=5)
def same_numbers(df: pd.DataFrame) -> pd.DataFrame:
    """Metrics without timings; the run id too is the same (the client store is an execution key, not hashed)."""
    return numbers(df)


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    return train(from_dict(BASE), tmp_path_factory.mktemp("memory") / "run")


def test_disk_store_gives_the_memory_store_numbers(memory_run, tmp_path):
    disk = train(from_dict({**BASE, "client_store": "disk"}), tmp_path / "run")
    pd.testing.assert_frame_equal(same_numbers(memory_run), same_numbers(disk))
    files = sorted(p.name for p in (tmp_path / "run" / CLIENT_STATES_DIR).iterdir())
    # a finished run keeps one file per client ever sampled: its final state (older versions collected)
    cids = [int(name.split(".")[0]) for name in files]
    assert len(set(cids)) == len(cids) and BASE["clients_per_round"] < len(cids) <= BASE["num_clients"]
    assert sum(f".r{BASE['rounds']}." in name for name in files) == BASE["clients_per_round"]


def test_memory_and_checkpoint_follow_the_participating_clients(tmp_path):
    cfg = from_dict({**BASE, "client_store": "disk", "num_clients": 40, "clients_per_round": 4})
    engine = Engine(build_context(cfg), METHODS[cfg.method], client_dir=tmp_path / "states")
    for r in (1, 2, 3):
        engine.run_round(r)
        assert engine.client_states.nbytes_in_memory() == 0  # between rounds nothing is held
    trained = len(engine.client_states)
    assert trained > 4 and len(list((tmp_path / "states").iterdir())) >= trained
    state = engine.state_dict()
    assert state["clients"] == {} and len(state["client_index"]) == trained
    one = engine.client_states[next(iter(engine.client_states.keys()))]
    assert all(v.device.type == "cpu" for v in one["model"].values())  # off the accelerator
    # the memory store's checkpoint holds every trained client's model; the disk store's only the index
    memory = Engine(build_context(cfg.replace(client_store="memory")), METHODS[cfg.method])
    for r in (1, 2, 3):
        memory.run_round(r)
    assert memory.client_states.nbytes_in_memory() >= trained * tensor_bytes(one["model"]) > 0
    assert sorted(memory.client_states.keys()) == engine.client_states.keys()
    for cid in memory.client_states.keys():  # same states, bit for bit
        for key, value in memory.client_states[cid]["model"].items():
            assert torch.equal(value, engine.client_states[cid]["model"][key]), (cid, key)


def _cli(config, out, fault=None):
    env = {**os.environ, **({"FEDHPRO_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "fedhpro.cli", "train", "--config", str(config), "--out", str(out),
                           "--quiet", "--threads", "1"],  # the in-process reference runs on 1 thread (conftest)
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.faults
def test_kill_after_round_files_written_then_resume_is_identical(memory_run, tmp_path):
    """Killed in round 3 after some client files of round 3 were written (checkpoint is at round 2)."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "client_store": "disk", "checkpoint_every": 2}))
    run = tmp_path / "run"
    # client_state_write fires once per client file: 4 per round -> the 10th is round 3's second client
    killed = _cli(config, run, fault="client_state_write@10")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert load_checkpoint(run)["round"] == 2 and not (run / "metrics.parquet").exists()
    names = [p.name for p in (run / CLIENT_STATES_DIR).iterdir()]
    assert any(".r3." in n for n in names)  # round 3 had written a file (and left a temp) before the kill
    again = _cli(config, run)
    assert again.returncode == 0, again.stdout + again.stderr
    pd.testing.assert_frame_equal(same_numbers(memory_run), same_numbers(pd.read_parquet(run / "metrics.parquet")))


def test_tampered_client_state_is_refused(tmp_path):
    cfg = from_dict({**BASE, "client_store": "disk", "rounds": 3})
    train(cfg, tmp_path / "run", stop_after_round=2)
    files = sorted((tmp_path / "run" / CLIENT_STATES_DIR).iterdir())
    data = bytearray(files[0].read_bytes())
    data[-10] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or tampered"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.parquet").exists()
    assert (tmp_path / "run" / CHECKPOINT).exists()  # nothing computed was deleted


def test_missing_client_state_file_is_a_clear_error(tmp_path):
    store = DiskClientStore(tmp_path / "s")
    store.setdefault(3, {})["x"] = torch.ones(2)
    store.release(3, 1)
    saved = store.state_dict()
    (tmp_path / "s" / "3.r1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="client state files missing .* clients \\[3\\]"):
        DiskClientStore(tmp_path / "s").load_state_dict(saved)
    # a memory checkpoint resumed with 'disk' (an execution key: tests/test_run_identity.py) writes its states
    converted = DiskClientStore(tmp_path / "t")
    converted.load_state_dict({"clients": {4: {"x": torch.ones(2)}}})
    assert converted.keys() == [4] and torch.equal(converted[4]["x"], torch.ones(2))
