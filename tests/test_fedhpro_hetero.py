"""FedHPro in personalized mode with heterogeneous client models ([recon], see `fedhpro.methods.fedhpro`).

Local extractors (a small CNN and the official ResNet-10, both projected to d = 512) never leave the
clients; the classifier head is shared: the CReFF re-trained classifier (by default; no client head is then
uploaded or aggregated), or the clients' heads aggregated with `aggregation`, and the hyper-prototypes are
matched through it. Also the `predict: nearest_hyperprototype` rule. Checked on digits: learning, determinism,
bit-identical resume, bytes against a hand count, both head aggregations, the client's use of the received
head, and evaluation with the shared head; one slow run on the shared CIFAR-10 copy.
"""

import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA
from fedhpro.config import from_dict
from fedhpro.engine import Engine, derive_seed, evaluate
from fedhpro.methods import METHODS
from fedhpro.methods.creff import client_class_gradients
from fedhpro.train import build_context, train

TIME_COLUMNS = ["time_local", "time_server", "time_eval", "time_io"]
MODELS = ["cnn", "resnet10"]  # both take 8x8 digits; different architectures and feature sizes (128, 256)
BASE = {"dataset": "digits", "num_clients": 6, "partition": "dirichlet", "alpha": 0.5, "rounds": 3,
        "local_epochs": 2, "batch_size": 32, "lr": 0.05, "seed": 0, "method": "fedhpro",
        "eval_mode": "personalized", "client_models": MODELS}
FAST = {"matching_steps": 3, "feature_matching_steps": 3, "retrain_epochs": 2, "real_batch": 20}
HEAD = ("classifier.weight", "classifier.bias")
SHARED_TAR = SHARED_DATA / "cifar10-jpeg.tar"


def numbers(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=TIME_COLUMNS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same heterogeneous run twice: straight, and from scratch in another directory stopped after round 2
    then resumed. The stopped run's two rounds are a second independent run from scratch (the determinism
    check), the resumed round 3 the resume check: no third full run is needed (it cost a third of the setup)."""
    cfg = from_dict(BASE)
    root = tmp_path_factory.mktemp("hetero")
    full = train(cfg, root / "full", threads=1)
    stopped = train(cfg, root / "resumed", stop_after_round=2, threads=1)
    resumed = train(cfg, root / "resumed", threads=1)
    return cfg, full, stopped, resumed


def one_round(overrides: dict, method_params: dict | None = None):
    """Round 1 of a small heterogeneous run -> (engine, result, uploads in aggregation order)."""
    cfg = from_dict({**BASE, "rounds": 1, "local_epochs": 1, **overrides,
                     "method_params": {**FAST, **(method_params or {})}})
    torch.manual_seed(cfg.seed)
    engine = Engine(build_context(cfg), METHODS["fedhpro"])
    seen = {}
    original = engine.server.aggregate

    def record(round_idx, uploads):
        seen["uploads"] = uploads
        seen["head_before"] = {k: v.clone() for k, v in engine.server.head.items()}
        return original(round_idx, uploads)

    engine.server.aggregate = record
    seen["payload"] = engine.server.broadcast(1)
    result = engine.run_round(1)
    return engine, result, seen


# ---- whole runs -----------------------------------------------------------------------------------------


def test_config_accepts_personalized_and_mixed_models():
    cfg = from_dict(BASE)
    assert cfg.eval_mode == "personalized" and list(cfg.client_models) == MODELS
    assert "personalized" in METHODS["fedhpro"].modes and METHODS["fedhpro"].heterogeneous_models
    assert "[recon]" in sys.modules[METHODS["fedhpro"].Server.__module__].__doc__


def test_learns_well_above_chance(runs):
    _, full, *_ = runs
    assert (full["status"] == "finished").all() and list(full["round"]) == [1, 2, 3]
    acc = full["client_acc_mean"].to_numpy()
    assert np.isfinite(acc).all()
    assert acc[-1] > 0.6  # chance: 0.1 (ten digits); measured 0.82 at round 3
    assert acc[-1] > acc[0] + 0.3
    assert full["test_acc"].isna().all()  # no global model: the personalized protocol reports client accuracy


def test_deterministic(runs):
    _, full, stopped, _ = runs  # two runs from scratch in two directories: rounds 1 and 2 bit-identical
    assert list(stopped["round"]) == [1, 2]
    # (the stopped run's rows say "running": status is not a number of the run)
    pd.testing.assert_frame_equal(numbers(full.iloc[:2]).drop(columns="status"),
                                  numbers(stopped).drop(columns="status"))


def test_resume_is_bit_identical(runs):
    _, full, stopped, resumed = runs
    assert list(stopped["round"]) == [1, 2]
    pd.testing.assert_frame_equal(numbers(full), numbers(resumed))


def test_bytes_are_the_head_the_prototypes_and_the_gradients(runs):
    cfg, full, *_ = runs
    ctx = build_context(cfg)
    c, d, length = ctx.num_classes, ctx.feature_dim, 5
    assert d == 512  # mixed backbones are projected to one shared feature size
    head = (c * d + c) * 4
    down = cfg.num_clients * (head + c * length * d * 4)  # head + C*L hyper-prototypes; no extractor
    up = 0
    for client in ctx.clients:  # per present class: feature gradient (d), dW (C x d), db (C); no head (unread)
        k = int((client.class_counts > 0).sum())
        up += k * d * 4 + k * c * d * 4 + k * c * 4
    assert (full["bytes_down"] == down).all()
    assert (full["bytes_up"] == up).all()


def test_uploads_hold_no_extractor_weights_and_payload_follows_the_switches():
    _, result, seen = one_round({"clients_per_round": 4})
    assert set(seen["payload"]) == {"head", "hyper_prototypes"}  # the re-trained head is the one sent
    for u in seen["uploads"]:  # the re-trained head replaces any aggregate: no client head travels
        assert set(u) == {"num_samples", "cid", "classes", "feature_grad", "grad_w", "grad_b"}
    # send_retrained_classifier off: clients train with the aggregated head and compute their gradients
    # through the re-trained one, which is then sent as well (and counted)
    engine, result2, seen2 = one_round({"clients_per_round": 4}, {"send_retrained_classifier": False})
    assert set(seen2["payload"]) == {"head", "hyper_prototypes", "meta_weight", "meta_bias"}
    extra = sum(t.numel() * 4 for t in (engine.server.meta_weight, engine.server.meta_bias))
    assert result2.bytes_down == result.bytes_down + 4 * extra
    for u in seen2["uploads"]:  # here the aggregated head is the one clients train with: it is uploaded
        assert set(u["head"]) == set(HEAD)
    assert result2.bytes_up == result.bytes_up + 4 * extra  # head (C x d + C floats) per client, and nothing else
    # without classifier re-training no classifier gradients travel
    engine, result3, seen3 = one_round({"clients_per_round": 4}, {"classifier_retraining": False})
    assert set(seen3["payload"]) == {"head", "hyper_prototypes"}
    assert all(set(u) == {"num_samples", "cid", "classes", "feature_grad", "head"} for u in seen3["uploads"])


def test_aggregation_switch_is_moot_and_labelled_so_when_the_retrained_head_is_sent(tmp_path):
    """Defaults: the re-trained classifier is the head, so last_client and fedavg give identical numbers, no head
    is uploaded and the label says so; with `send_retrained_classifier: false` the aggregated head is used, the
    switch changes the results and the upload carries the head."""
    from fedhpro.train import weight_aggregation

    small = {**BASE, "rounds": 2, "local_epochs": 1}
    runs = {}
    for send in (True, False):
        for agg in ("last_client", "fedavg"):
            cfg = from_dict({**small, "method_params": {**FAST, "aggregation": agg, "send_retrained_classifier": send}})
            runs[send, agg] = train(cfg, tmp_path / f"{send}-{agg}", threads=1)
            assert weight_aggregation(cfg) == ("retrained_head" if send else f"{agg}_head")
            assert (runs[send, agg]["aggregation"] == weight_aggregation(cfg)).all()
    keep = [c for c in runs[True, "fedavg"].columns if c not in [*TIME_COLUMNS, "run_id"]]
    pd.testing.assert_frame_equal(runs[True, "last_client"][keep], runs[True, "fedavg"][keep], check_exact=True)
    assert not np.allclose(runs[False, "last_client"]["client_acc_mean"], runs[False, "fedavg"]["client_acc_mean"])
    head_bytes = 6 * (10 * 512 + 10) * 4  # every client's head when it is aggregated
    assert (runs[False, "fedavg"]["bytes_up"] - runs[True, "fedavg"]["bytes_up"] == head_bytes).all()


@pytest.mark.slow  # two full heterogeneous runs (~33 s); the module's `runs` fixture keeps heterogeneous FedHPro learning, determinism and resume in the default suite
def test_nearest_hyperprototype_prediction_changes_predictions_and_beats_chance(tmp_path):
    """`predict: nearest_hyperprototype` scores each client's features against the hyper-prototype class centres;
    training is unchanged (same losses and bytes), accuracy differs from the classifier's and is above chance."""
    small = {**BASE, "rounds": 3, "local_epochs": 2}
    clf = train(from_dict({**small, "method_params": FAST}), tmp_path / "clf", threads=1)
    near = train(from_dict({**small, "method_params": {**FAST, "predict": "nearest_hyperprototype"}}),
                 tmp_path / "near", threads=1)
    pd.testing.assert_series_equal(clf["train_loss"], near["train_loss"], check_exact=True)
    assert (clf["bytes_up"] == near["bytes_up"]).all()
    assert not np.allclose(clf["client_acc_mean"], near["client_acc_mean"])
    assert near["client_acc_mean"].iloc[-1] > 0.3  # chance 0.1 (ten digits)



# ---- the shared head ------------------------------------------------------------------------------------


@pytest.mark.parametrize("isolate", [{"classifier_retraining": False}, {"send_retrained_classifier": False}])
def test_last_client_head_is_the_last_sampled_clients(isolate):
    engine, result, seen = one_round({"clients_per_round": 4}, {**isolate, "aggregation": "last_client"})
    uploads = seen["uploads"]
    assert [u["cid"] for u in uploads] == result.selected  # uploaded in the sampling order
    last = result.selected[-1]
    trained = engine.client_states.get(last)["model"]  # the last client's model after local training
    for key in HEAD:
        assert torch.equal(engine.server.head[key], uploads[-1]["head"][key])
        assert torch.equal(engine.server.head[key].cpu(), trained[key])
    heads = [u["head"]["classifier.weight"] for u in uploads]
    assert not torch.equal(heads[0], heads[-1])  # the clients' heads really differ


@pytest.mark.parametrize("isolate", [{"classifier_retraining": False}, {"send_retrained_classifier": False}])
def test_fedavg_head_is_the_sample_weighted_mean(isolate):
    engine, _, seen = one_round({"clients_per_round": 4}, {**isolate, "aggregation": "fedavg"})
    uploads = seen["uploads"]
    n = [u["num_samples"] for u in uploads]
    assert len(set(n)) > 1  # unequal clients: a weighted mean differs from a plain one
    for key in HEAD:
        by_hand = sum(u["head"][key].double() * w for u, w in zip(uploads, n)) / sum(n)
        assert torch.allclose(engine.server.head[key].double(), by_hand, atol=1e-7)
        plain = sum(u["head"][key].double() for u in uploads) / len(uploads)
        assert not torch.allclose(engine.server.head[key].double(), plain, atol=1e-7)


def test_retrained_head_replaces_the_aggregate_when_sent():
    engine, result, seen = one_round({}, {"aggregation": "last_client"})
    server = engine.server
    assert torch.equal(server.head["classifier.weight"], server.meta_weight)
    assert torch.equal(server.head["classifier.bias"], server.meta_bias)
    assert all("head" not in u for u in seen["uploads"])  # nobody reads the clients' heads: none is sent
    trained = engine.client_states.get(result.selected[-1])["model"]["classifier.weight"]
    assert not torch.equal(server.meta_weight.cpu(), trained)
    # round 1: the head clients received is the round-1 meta classifier (one random nn.Linear(d, C))
    assert seen["head_before"]["classifier.weight"].shape == (10, 512)


def test_client_trains_with_and_computes_gradients_through_the_received_head():
    engine, result, seen = one_round({"clients_per_round": 2})
    ctx, payload = engine.ctx, seen["payload"]
    cid = result.selected[0]
    upload = next(u for u in seen["uploads"] if u["cid"] == cid)
    model = ctx.make_model(ctx.model_names[cid])
    model.load_state_dict(engine.models.initial_state(cid))  # its extractor before training
    gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, 1, cid))
    p = ctx.params
    g = client_class_gradients(ctx, ctx.clients[cid], model, payload["head"]["classifier.weight"],
                               payload["head"]["classifier.bias"], p.real_batch, p.repeats, p.dsa, gen)
    for key in ("feature_grad", "grad_w", "grad_b"):
        assert torch.equal(g[key], upload[key]), key
    # the client's own random classifier was replaced: its trained head started from the received one
    own = engine.models.initial_state(cid)["classifier.weight"]
    assert not torch.equal(own, payload["head"]["classifier.weight"].cpu())


def test_evaluation_uses_each_clients_extractor_with_the_shared_head():
    engine, result, _ = one_round({"clients_per_round": 4}, {"send_retrained_classifier": False})
    ctx, head = engine.ctx, engine.server.head
    accs = []
    for client in ctx.clients:
        model = ctx.make_model(ctx.model_names[client.cid])
        state = engine.client_states.get(client.cid) or {}
        model.load_state_dict(state["model"] if "model" in state else engine.models.initial_state(client.cid))
        model.eval()
        correct, _ = evaluate(lambda x: F.linear(model.features(x), head["classifier.weight"],
                                                 head["classifier.bias"]), ctx, client.test_x, client.test_y, 500)
        accs.append(correct.float().mean().item())
    assert result.client_acc_mean == pytest.approx(float(np.mean(accs)), abs=1e-12)


def test_checkpoint_holds_the_head():
    engine, _, _ = one_round({"clients_per_round": 2})
    state = engine.server.state_dict()
    assert set(state["head"]) == set(HEAD) and state["model"] is None
    fresh = METHODS["fedhpro"].Server(engine.ctx)
    fresh.load_state_dict(state)
    for key in HEAD:
        assert torch.equal(fresh.head[key], engine.server.head[key])


def test_global_mode_has_no_head():
    cfg = from_dict({**BASE, "eval_mode": "global", "client_models": [], "rounds": 1, "method_params": FAST})
    server = METHODS["fedhpro"].Server(build_context(cfg))
    assert server.head is None and server.state_dict()["head"] is None  # declared STATE: saved as None
    assert set(server.broadcast(1)) == {"weights", "hyper_prototypes", "meta_weight", "meta_bias"}


# ---- real data ------------------------------------------------------------------------------------------


def cifar_subset(tar: Path, dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """The first images (by file name) of every class of the shared CIFAR-10 JPEG tar, as an image-folder tree."""
    limit = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(tar) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        for m in members:
            split, cls, name = Path(m.name).parts[-3:]
            if taken.get((split, cls), 0) < limit.get(split, 0):
                taken[(split, cls)] = taken.get((split, cls), 0) + 1
                out = dest / split / cls / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
    return dest


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TAR.exists(), reason="../shared/data/cifar10-jpeg.tar not present")
def test_heterogeneous_fedhpro_on_real_cifar10_rises_above_chance(tmp_path):
    """A balanced subset of the real CIFAR-10 (100 training images per class, through the image-folder
    loader), four clients with near-IID splits (Dirichlet alpha 100), so each local test split is near
    balanced and chance is about 0.1; small CNN and ResNet-10 clients. About 3 CPU-minutes (2 threads); the
    full split with ResNet-10 takes minutes per round on a 2-core CPU."""
    subset = cifar_subset(SHARED_TAR, tmp_path / "cifar10-subset", 100, 20)
    cfg = from_dict({"method": "fedhpro", "dataset": "cifar10", "data_root": str(tmp_path / "data"),
                     "dataset_options": {"path": str(subset)}, "partition": "dirichlet", "alpha": 100.0,
                     "num_clients": 4, "eval_mode": "personalized", "client_models": ["cnn", "resnet10"],
                     "rounds": 3, "local_epochs": 2, "batch_size": 32, "lr": 0.05, "seed": 0,
                     "method_params": {"feature_matching_steps": 20, "retrain_epochs": 20, "matching_steps": 10,
                                       "real_batch": 20}})
    df = train(cfg, tmp_path / "run", threads=2)
    assert (df["status"] == "finished").all() and len(df) == 3
    ctx = build_context(cfg)
    majority = np.mean([(c.test_y == int(c.class_counts.argmax())).float().mean().item() for c in ctx.clients])
    assert majority < 0.2  # near-balanced local test splits
    # ~250 local test images in all: 0.15 is about 2.6 binomial standard deviations above 0.1; measured 0.184
    assert df["client_acc_mean"].iloc[-1] > max(majority, 0.1) + 0.05
