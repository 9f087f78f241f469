"""Local training without a host sync per step (the GPU path) gives the CPU path's numbers, bit for bit."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import digits_run
from fedhpro import local as local_mod
from fedhpro.config import from_dict
from fedhpro.data import load_dataset
from fedhpro.engine import Engine
from fedhpro.methods import METHODS
from fedhpro.train import build_context, train

BASE = digits_run(num_clients=4, batch_size=48, rounds=2, local_epochs=2, momentum=0.9, device="cpu")


@pytest.mark.parametrize("method", ["fedavg", "fedproto"])
def test_the_per_epoch_check_trains_the_same_numbers(tmp_path, monkeypatch, method):
    cfg = from_dict({**BASE, "method": method})
    train(cfg, tmp_path / "step", threads=1, progress=False)
    monkeypatch.setattr(local_mod, "STEP_CHECK_DEVICES", ())  # the GPU path, on the CPU
    assert not local_mod.check_each_step(torch.device("cpu"))
    train(cfg, tmp_path / "epoch", threads=1, progress=False)
    a, b = (pd.read_parquet(tmp_path / d / "metrics.parquet") for d in ("step", "epoch"))
    cols = ["train_loss", "test_acc", "test_loss", "bytes_up"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)


def test_the_per_epoch_check_still_stops_a_diverged_client(monkeypatch):
    monkeypatch.setattr(local_mod, "STEP_CHECK_DEVICES", ())
    cfg = from_dict({**BASE, "method": "fedavg"})
    engine = Engine(build_context(cfg, data=load_dataset("digits")), METHODS["fedavg"])
    calls = []
    real_loss = engine.client.loss

    def loss(model, x, y):  # the third step of the epoch is non-finite, the others are not
        calls.append(1)
        out = real_loss(model, x, y)
        return out * float("inf") if len(calls) == 3 else out

    engine.client.loss = loss
    with pytest.raises(local_mod.Diverged, match=r"client \d+: loss is inf"):
        engine.run_round(1)
