"""FedHPro's `aggregation` switch: `last_client` (what the official code computes) and `fedavg`.

The official `FedHPro()` appends `local_model.state_dict()` (references into one reused model) without a
deep copy, so its "weighted average" returns the last sampled client's trained model; `fedavg` is the mean
the code was written to compute. Both: every client uploads, the re-trained classifier replaces
`classifier.*`, determinism and bit-identical resume hold.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import digits_run, numbers
from fedhpro.aggregate import StaleRunError, collect
from fedhpro.labels import method_label
from fedhpro.config import ConfigError, from_dict
from fedhpro.engine import Engine, fedavg
from fedhpro.methods import METHODS, method_revision
from fedhpro.runio import write_metrics
from fedhpro.train import build_context, train

BASE = digits_run(num_clients=10, seed=4, local_epochs=1, method="fedhpro")
FAST = {"matching_steps": 3, "feature_matching_steps": 3, "retrain_epochs": 2, "real_batch": 20}


def round_with_uploads(aggregation: str, clients_per_round: int | None = None):
    """One round of FedHPro on digits; the uploads the server aggregated (in order) and its new state."""
    cfg = from_dict({**BASE, "rounds": 1, "clients_per_round": clients_per_round,
                     "method_params": {**FAST, "aggregation": aggregation}})
    torch.manual_seed(cfg.seed)
    engine = Engine(build_context(cfg), METHODS["fedhpro"])
    seen = {}
    original = engine.server.aggregate_weights

    def record(uploads):
        seen["uploads"] = uploads
        seen["result"] = {k: v.clone() for k, v in original(uploads).items()}
        return original(uploads)

    engine.server.aggregate_weights = record
    result = engine.run_round(1)
    state = {k: v.clone() for k, v in engine.server.model.state_dict().items()}
    return cfg, result, seen, state, engine


def test_last_client_is_the_last_sampled_clients_trained_state_on_every_key():
    cfg, result, seen, state, engine = round_with_uploads("last_client")
    uploads = seen["uploads"]
    assert [u["cid"] for u in uploads] == result.selected  # trained (and uploaded) in the sampling order
    last = uploads[-1]["weights"]
    assert set(state) == set(last)
    for key, value in state.items():
        if key.startswith("classifier."):  # replaced by the CReFF re-trained classifier, as in the official code
            assert torch.equal(value, engine.server.meta_weight if key.endswith("weight") else engine.server.meta_bias)
        else:
            assert torch.equal(value, last[key]), key  # bit for bit, BN statistics and num_batches_tracked too
    # the last client is not the average: the clients really differ
    mean = fedavg([u["weights"] for u in uploads], [u["num_samples"] for u in uploads])
    assert any(not torch.equal(mean[k], last[k]) for k in last if k.endswith("weight"))
    # every client's upload is counted, not just the one that became the global model
    assert result.bytes_up >= len(uploads) * sum(v.numel() * v.element_size() for v in last.values())


def test_fedavg_is_the_sample_weighted_mean():
    _, _, seen, state, _ = round_with_uploads("fedavg")
    uploads = seen["uploads"]
    mean = fedavg([u["weights"] for u in uploads], [u["num_samples"] for u in uploads])
    for key, value in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(value, mean[key]), key


def test_sampling_order_decides_who_is_last():
    cfg, result, seen, state, _ = round_with_uploads("last_client", clients_per_round=4)
    expected = np.random.RandomState(cfg.seed).choice(cfg.num_clients, 4, replace=False)
    assert result.selected == [int(c) for c in expected]
    last_cid = int(expected[-1])
    assert seen["uploads"][-1]["cid"] == last_cid
    last = seen["uploads"][-1]["weights"]
    assert all(torch.equal(state[k], last[k]) for k in state if not k.startswith("classifier."))


@pytest.mark.parametrize("aggregation", ["last_client", "fedavg"])
def test_deterministic_and_resume_bit_identical(tmp_path, aggregation):
    cfg = from_dict({**BASE, "rounds": 3, "method_params": {**FAST, "aggregation": aggregation}})
    full = numbers(train(cfg, tmp_path / "full"))
    # a second run from scratch, stopped after round 2: its rounds are the first run's (its rows say "running",
    # status is not a number); then resumed from its checkpoint for round 3 (a third run cost a third more)
    stopped = numbers(train(cfg, tmp_path / "resumed", stop_after_round=2))
    assert list(stopped["round"]) == [1, 2]
    pd.testing.assert_frame_equal(full.iloc[:2].drop(columns="status"), stopped.drop(columns="status"))
    resumed = numbers(train(cfg, tmp_path / "resumed"))
    pd.testing.assert_frame_equal(full, resumed)
    assert (full["aggregation"] == aggregation).all()


def test_the_two_aggregations_give_different_runs(tmp_path):
    a = from_dict({**BASE, "rounds": 2, "method_params": {**FAST, "aggregation": "last_client"}})
    b = from_dict({**BASE, "rounds": 2, "method_params": {**FAST, "aggregation": "fedavg"}})
    assert a.config_hash() != b.config_hash()
    da, db = train(a, tmp_path / "a"), train(b, tmp_path / "b")
    assert not np.array_equal(da["test_acc"].to_numpy(), db["test_acc"].to_numpy())


# ---- stale results: a behaviour revision enters the hash, old records are refused with the reason

def test_revision_enters_hash_and_canonical_json_round_trips():
    cfg = from_dict({**BASE, "method_params": FAST})
    assert method_revision("fedhpro") >= 1 and method_revision("fedavg") == 0
    canonical = json.loads(cfg.canonical_json())
    assert canonical["method_revision"] == method_revision("fedhpro")
    assert from_dict(canonical).config_hash() == cfg.config_hash()  # Snakemake's params -> the job's config
    assert "method_revision" not in json.loads(from_dict({**BASE, "method": "fedavg"}).canonical_json())
    old = {k: v for k, v in canonical.items() if k != "method_revision"}
    assert from_dict(old).config_hash() == cfg.config_hash()  # a config file states no revision: the current
    with pytest.raises(ConfigError, match="behaviour revision 0 of method 'fedhpro'.*last sampled client"):
        from_dict({**canonical, "method_revision": 0})


def test_run_directory_of_an_older_revision_is_refused_with_the_reason(tmp_path):
    cfg = from_dict({**BASE, "rounds": 1, "method_params": FAST})
    run = tmp_path / "run"
    train(cfg, run)
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["method_revision"] == method_revision("fedhpro")
    # what a run made before the change looks like: no revision, another hash
    del info["config"]["method_revision"]
    info["config_hash"] = "0123456789abcdef"
    (run / "config.json").write_text(json.dumps(info))
    (run / "metrics.parquet").unlink()
    with pytest.raises(ConfigError, match="revision 0 of method 'fedhpro'.*stale"):
        train(cfg, run)


def test_aggregate_refuses_metrics_of_an_older_revision(tmp_path):
    cfg = from_dict({**BASE, "rounds": 1, "method_params": FAST})
    train(cfg, tmp_path / "new")
    collect(str(tmp_path / "new" / "metrics.parquet"))  # the current revision is accepted
    df = pd.read_parquet(tmp_path / "new" / "metrics.parquet").drop(columns=["aggregation"])
    old = tmp_path / "old"
    old.mkdir()
    write_metrics(old / "metrics.parquet", df.assign(run_id="0123456789abcdef").to_dict("records"), cfg.to_dict())
    with pytest.raises(StaleRunError, match="revision 0 of method 'fedhpro'"):
        collect(str(old / "metrics.parquet"))


def test_labels_say_which_aggregation():
    assert method_label("fedhpro", "default", "last_client") == "FedHPro (official code)"
    assert method_label("fedhpro", "fedavg", "fedavg") == "FedHPro (FedAvg aggregation)"
    assert method_label("fedhpro", "paper", "last_client") == "FedHPro (paper, last-client aggregation)"
    assert method_label("fedhpro", "paper_fedavg", "fedavg") == "FedHPro (paper, FedAvg aggregation)"
    assert method_label("fedavg", "default", "fedavg") == "FedAvg"
    # personalized FedHPro (heterogeneous models) is a reconstruction: never labelled "official code"
    assert method_label("fedhpro", "default", "last_client_head") == "FedHPro [recon] (last-client head aggregation)"
    assert method_label("fedhpro", "fedavg", "fedavg_head") == "FedHPro [recon] (fedavg, FedAvg head aggregation)"
    assert method_label("fedhpro", "default", "retrained_head") == "FedHPro [recon] (re-trained head, not aggregated)"


def test_metrics_record_the_aggregation_per_mode():
    from fedhpro.train import weight_aggregation

    assert weight_aggregation(from_dict({**BASE})) == "last_client"
    assert weight_aggregation(from_dict({**BASE, "method_params": {"aggregation": "fedavg"}})) == "fedavg"
    # personalized defaults: the re-trained classifier is the head, no client head is aggregated
    assert weight_aggregation(from_dict({**BASE, "eval_mode": "personalized"})) == "retrained_head"
    assert weight_aggregation(from_dict({**BASE, "eval_mode": "personalized", "method_params": {
        "send_retrained_classifier": False}})) == "last_client_head"
    assert weight_aggregation(from_dict({**BASE, "method": "fedproto", "eval_mode": "personalized"})) == "none"
    assert weight_aggregation(from_dict({**BASE, "method": "fedavg"})) == "fedavg"


def test_checkpoint_without_declared_server_state_is_refused_with_a_message():
    _, _, _, _, engine = round_with_uploads("last_client")
    state = engine.server.state_dict()
    state["features"] = state.pop("federated.features")  # how FedHPro checkpoints named it before STATE
    with pytest.raises(RuntimeError, match="lacks the server state federated.features.*delete checkpoint.pt"):
        engine.server.load_state_dict(state)
