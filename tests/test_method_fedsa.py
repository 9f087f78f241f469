"""FedSA: anchors, gaps, loss terms and the EMA server step by hand; digits runs in both modes (+ heterogeneous
models) and communication bytes by formula (determinism and resume: test_method_contract.py)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import METHOD_BASE, MODES
from fedhpro.config import ConfigError, from_dict
from fedhpro.engine import tensor_bytes
from fedhpro.methods.fedsa import (Client, Params, Server, anchor_loss_terms, ema_anchors, init_anchors,
                                   mean_nearest_gap)
from fedhpro.nets import FeatureClassifier
from fedhpro.train import build_context, train

BASE = {**METHOD_BASE, "method": "fedsa"}


def _ctx(num_classes=2, dim=2, **params) -> SimpleNamespace:
    cfg = SimpleNamespace(eval_mode="personalized", lr=0.1, batch_size=4)
    return SimpleNamespace(cfg=cfg, params=Params(**params), num_classes=num_classes, feature_dim=dim,
                           device=torch.device("cpu"))


# ---- unit tests --------------------------------------------------------------------------------------------


def test_anchors_are_a_batchnorm_mlp_of_gaussian_rows():
    torch.manual_seed(0)
    a = init_anchors(10, 16)
    torch.manual_seed(0)
    assert torch.equal(a, init_anchors(10, 16))
    assert a.shape == (10, 16) and not a.requires_grad and (a >= 0).all()
    # by hand: same draws (Linear inits, then R), train-mode BN = batch statistics over the C rows
    torch.manual_seed(0)
    l1, bn1, l2, bn2 = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.BatchNorm1d(16)
    r = torch.randn(10, 16)

    def bn(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    expected = torch.relu(bn(l2(torch.relu(bn(l1(r))))))
    assert torch.allclose(a, expected, atol=1e-5)


def test_gaps_zero_before_first_upload_minus_inf_for_one_class():
    assert mean_nearest_gap(None) == 0.0
    assert mean_nearest_gap(torch.tensor([[1.0, 2.0]])) == float("-inf")
    rows = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 10.0]])  # nearest gaps 3, 3, 10
    assert mean_nearest_gap(rows) == pytest.approx(16 / 3)


def test_client_gap_is_max_of_local_and_global_and_local_prototypes_persist_in_state():
    ctx = _ctx(num_classes=3, dim=2)
    client, model = Client(ctx), FeatureClassifier(nn.Identity(), 2, 3)
    anchors = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # nearest gaps 3, 3, 4 -> mean 10/3
    data = SimpleNamespace(cid=0)
    state: dict = {}
    client.setup(data, model, {"anchors": anchors}, state, None, 1)
    assert client.local_gap == 0.0 and client.global_gap == pytest.approx(10 / 3) and client.gap == client.global_gap
    state["prototypes"] = torch.tensor([[5.0, 5.0]])  # one class -> -inf
    client.setup(data, model, {"anchors": anchors}, state, None, 1)
    assert client.local_gap == float("-inf") and client.gap == pytest.approx(10 / 3)
    state["prototypes"] = torch.tensor([[0.0, 0.0], [0.0, 20.0]])  # local gap 20 wins
    client.setup(data, model, {"anchors": anchors}, state, None, 1)
    assert client.gap == pytest.approx(20.0)
    # local prototypes: mean of the (detached) training features per class, kept in the state
    client.setup(data, model, {"anchors": anchors}, {}, None, 1)
    x, y = torch.tensor([[1.0, 1.0], [3.0, 5.0], [2.0, 0.0]]), torch.tensor([0, 0, 2])
    client.loss(model, x, y)
    up = client.upload(data, model, state, 1)
    assert up["prototype_classes"].tolist() == [0, 2]
    assert torch.allclose(up["prototypes"], torch.tensor([[2.0, 3.0], [2.0, 0.0]]))
    assert torch.equal(state["prototypes"], up["prototypes"]) and state["prototype_classes"].tolist() == [0, 2]
    assert mean_nearest_gap(state["prototypes"]) == pytest.approx(3.0)


def test_loss_terms_by_hand_and_weighted_sum():
    anchors = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    features = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    terms = anchor_loss_terms(features, logits, labels, anchors, head, gap=1.0)
    assert terms["ce"].item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2, abs=1e-5)
    # h(A) = A: rows [0, 0] (class 0) and [3, 4] (class 1)
    assert terms["cc"].item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-1))) / 2, abs=1e-5)
    # MSE over B*d: only row 1 differs from A_1 by (0, -4) -> 16 / 4
    assert terms["reg"].item() == pytest.approx(4.0, abs=1e-5)
    # distances [0, 5] and [3, 4], +1 on the true class: CE(-[1, 5], 0) and CE(-[3, 5], 1)
    mcl = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(2))) / 2
    assert terms["mcl"].item() == pytest.approx(mcl, abs=1e-4)
    # the client's loss: ce + cc*CC + lambda*REG + mcl*MCL with the model's own head
    ctx = _ctx(num_classes=2, dim=2, lamda=3.0, mcl=0.5, cc=2.0)
    client, model = Client(ctx), FeatureClassifier(nn.Identity(), 2, 2)
    client.setup(SimpleNamespace(cid=0), model, {"anchors": anchors}, {}, None, 1)
    assert client.gap == pytest.approx(5.0)
    loss = client.loss(model, features, labels)
    t = anchor_loss_terms(features, model(features)[1], labels, anchors, model.classifier, 5.0)
    assert loss.item() == pytest.approx((t["ce"] + 2 * t["cc"] + 3 * t["reg"] + 0.5 * t["mcl"]).item(), rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_ema_updates_only_received_classes():
    anchors = torch.ones(3, 2)
    protos = torch.tensor([[11.0, 11.0], [0.0, 0.0], [21.0, 21.0]])
    out = ema_anchors(anchors, protos, torch.tensor([True, False, True]), 0.9)
    assert torch.allclose(out, torch.tensor([[2.0, 2.0], [1.0, 1.0], [3.0, 3.0]]))
    assert torch.equal(anchors, torch.ones(3, 2))  # not in place


def test_server_step_means_uploads_then_moves_anchors_by_ema():
    torch.manual_seed(0)
    server = Server(_ctx(num_classes=3, dim=2))
    a0 = server.anchors.clone()
    payload = server.broadcast(1)
    assert torch.equal(payload["anchors"], a0) and "prototypes" not in payload  # no P-bar yet
    uploads = [{"prototype_classes": torch.tensor([0, 1]), "prototypes": torch.tensor([[1.0, 0.0], [2.0, 2.0]])},
               {"prototype_classes": torch.tensor([1]), "prototypes": torch.tensor([[4.0, 0.0]])}]
    server.aggregate(1, uploads)
    pbar = torch.tensor([[1.0, 0.0], [3.0, 1.0]])  # unweighted mean over uploading clients
    assert server.present.tolist() == [True, True, False] and torch.allclose(server.prototypes[:2], pbar)
    assert torch.allclose(server.anchors[:2], 0.9999 * a0[:2] + 0.0001 * pbar)
    assert torch.equal(server.anchors[2], a0[2])
    payload = server.broadcast(2)
    assert payload["prototype_classes"].tolist() == [0, 1]
    assert tensor_bytes(payload, Server.BROADCAST_METADATA) == (3 * 2 + 2 * 2) * 4  # anchors C x d + P-bar of the received classes
    # evaluation: nearest P-bar (not the anchors) in personalized mode
    model = FeatureClassifier(nn.Identity(), 2, 3)
    scores = server.scores(model, torch.tensor([[1.1, 0.0], [2.9, 1.2]]))
    assert scores.argmax(1).tolist() == [0, 1]
    other = Server(_ctx(num_classes=3, dim=2))
    other.load_state_dict(server.state_dict())
    assert torch.equal(other.anchors, server.anchors) and torch.equal(other.prototypes, server.prototypes)


def test_params_validated():
    with pytest.raises(ConfigError):
        from_dict({**BASE, "method_params": {"anchor_momentum": 1.5}})
    with pytest.raises(ConfigError):
        from_dict({**BASE, "method_params": {"mcl": -1}})
    assert from_dict({**BASE, "method_params": {"cc": 0}}).method_params["cc"] == 0


# ---- runs on digits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_digits_run_sends_the_expected_bytes(mode, tmp_path):
    """Bytes by the method's formula (learning, determinism, resume: test_method_contract.py). One local epoch:
    what is sent depends on the partition and the round, not on how long clients train (a third of the time)."""
    cfg = from_dict({**BASE, **MODES[mode], "local_epochs": 1})
    df = train(cfg, tmp_path / "run")
    # up: sum_i |local classes_i| x d x 4; down: anchors C x d x 4, + P-bar (classes received last round) when
    # evaluation uses it (personalized), + weights both ways in global mode
    ctx = build_context(cfg)
    d, c, n = ctx.feature_dim, ctx.num_classes, cfg.num_clients
    assert d == (512 if cfg.client_models else 128)
    local = [int((cl.class_counts > 0).sum()) for cl in ctx.clients]
    union = int((sum(cl.class_counts for cl in ctx.clients) > 0).sum())
    weights = tensor_bytes(ctx.make_model().state_dict()) if cfg.eval_mode == "global" else 0
    assert (df["bytes_up"] == sum(local) * d * 4 + n * weights).all()
    pbar = union * d * 4 if cfg.eval_mode == "personalized" else 0
    assert df["bytes_down"].tolist() == [n * (c * d * 4 + weights)] + [n * (c * d * 4 + pbar + weights)] * 2


