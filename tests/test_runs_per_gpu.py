"""`slurm.runs_per_gpu`: a job's runs trained side by side, each in its own process, give the numbers of each
run alone (same thread count), and a pack resumes an interrupted one from its checkpoint."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import digits_run
from fedhpro.config import from_dict
from fedhpro.launch import LaunchOptions, PackEntry, RunPack
from fedhpro.sweep import SweepConfigError, check_slurm
from fedhpro.train import train

BASE = digits_run(method="fedavg", num_clients=4, rounds=2, device="cpu")
NUMBERS = ["train_loss", "test_acc", "test_loss", "bytes_up"]


def test_two_runs_sharing_a_job_equal_each_run_alone(tmp_path):
    configs = [from_dict({**BASE, "seed": s}) for s in (1, 2)]
    entries = [PackEntry(c.canonical_json(), str(tmp_path / "pack" / f"s{i}"), None, str(tmp_path / f"s{i}.log"))
               for i, c in enumerate(configs)]
    # cpus 2 shared by 2 runs: 1 thread each, the thread count the reference runs use
    RunPack(entries, threads=2, runs_per_gpu=2)()
    for i, cfg in enumerate(configs):
        alone = train(cfg, tmp_path / "alone" / f"s{i}", threads=1, progress=False)
        packed = pd.read_parquet(tmp_path / "pack" / f"s{i}" / "metrics.parquet")
        pd.testing.assert_frame_equal(alone[NUMBERS].reset_index(drop=True), packed[NUMBERS], check_exact=True)
        assert json.loads((tmp_path / "pack" / f"s{i}" / "config.json").read_text())["threads"] == 1
        assert f"run {tmp_path / 'pack' / f's{i}'}" in (tmp_path / f"s{i}.log").read_text()


def test_a_failing_run_does_not_stop_the_other_and_is_named(tmp_path):
    good = from_dict({**BASE, "seed": 1})
    entries = [PackEntry(good.canonical_json(), str(tmp_path / "good"), None, str(tmp_path / "good.log")),
               PackEntry(good.canonical_json(), str(tmp_path / "bad"), str(tmp_path / "no-such-partition"),
                         str(tmp_path / "bad.log"))]
    with pytest.raises(RuntimeError, match=r"1 of 2 runs failed:\n.*bad"):
        RunPack(entries, threads=2, runs_per_gpu=2)()
    assert (tmp_path / "good" / "metrics.parquet").is_file()
    assert "Traceback" in (tmp_path / "bad.log").read_text()


def test_the_option_is_validated_and_widens_packs():
    assert check_slurm({})["runs_per_gpu"] == 1
    with pytest.raises(SweepConfigError, match="slurm.runs_per_gpu"):
        check_slurm({"runs_per_gpu": 0})
    runs = [(i, "digits") for i in range(8)]
    one = LaunchOptions(pack_minutes=10, run_minutes=4)
    four = LaunchOptions(pack_minutes=10, run_minutes=4, runs_per_gpu=4)
    assert [len(p) for p in one.plan_packs(runs)] == [2, 2, 2, 2]
    assert [len(p) for p in four.plan_packs(runs)] == [8]  # 4 at a time: 40 minutes of work in ~10 of wall
