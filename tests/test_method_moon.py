"""MOON: the contrastive loss by hand, the projection head, previous-model state, digits runs, bytes (resume: test_method_contract.py)."""

import math

import pandas as pd
import pytest
import torch

from conftest import METHOD_BASE
from fedhpro.config import ConfigError, from_dict
from fedhpro.engine import Engine, fedavg
from fedhpro.methods import METHODS
from fedhpro.methods.moon import Server, moon_contrastive
from fedhpro.train import build_context, train

BASE = METHOD_BASE
METRIC_COLUMNS = ["round", "train_loss", "test_acc", "test_loss", "bytes_up", "bytes_down"]


def state_bytes(model: torch.nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def test_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z_global = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    z_prev = torch.tensor([[0.0, 3.0], [-1.0, -1.0]])
    # sample 1: cos(z,z_g) = 1, cos(z,z_prev) = 0 -> logits [2, 0] at tau 0.5
    # sample 2: cos(z,z_g) = 1/sqrt(2), cos(z,z_prev) = -1 -> logits [sqrt(2), -2]
    l1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    l2 = -math.log(math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + math.exp(-2)))
    got = moon_contrastive(z, z_global, z_prev, 0.5)
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    # tau = 1: logits are the cosines themselves
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-1 - 1 / math.sqrt(2)))) / 2
    assert moon_contrastive(z, z_global, z_prev, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # same global and previous representation: log 2 whatever z is, and no gradient
    zz = torch.randn(5, 4, requires_grad=True)
    g = torch.randn(5, 4)
    loss = moon_contrastive(zz, g, g.clone(), 0.5)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    loss.backward()
    assert zz.grad.abs().max().item() < 1e-6
    # the gradient pulls z towards z_global and away from z_prev
    z = torch.tensor([[1.0, 1.0]], requires_grad=True)
    moon_contrastive(z, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.5).backward()
    assert z.grad[0, 0] < 0 < z.grad[0, 1]


def test_projection_head_is_part_of_every_model():
    base_dim = build_context(from_dict({**BASE, "method": "fedavg"})).feature_dim
    ctx = build_context(from_dict({**BASE, "method": "moon"}))  # applies MOON's model_wrapper hook
    server = Server(ctx)
    Server(ctx)  # a second server on the same context does not stack a second head
    model = server.model
    head = model.projection
    assert [type(m).__name__ for m in head] == ["Identity", "Linear", "ReLU", "Linear"]
    assert (head[1].in_features, head[1].out_features, head[3].out_features) == (base_dim, base_dim, 256)
    assert model.classifier.in_features == 256 and model.feature_dim == 256 and ctx.feature_dim == 256
    x = ctx.prepare(ctx.test_x[:4], train=False)
    model.eval()
    z, logits = model(x)
    assert z.shape == (4, 256) and torch.equal(logits, model.classifier(z))
    assert ctx.make_model().state_dict().keys() == model.state_dict().keys()
    # without the head: the plain (FedAvg) architecture, contrast on the base features
    plain = build_context(from_dict({**BASE, "method": "moon", "method_params": {"projection_head": False}}))
    server = Server(plain)
    assert server.model.state_dict().keys() == build_context(from_dict({**BASE, "method": "fedavg"})).make_model(
    ).state_dict().keys()


@pytest.mark.slow
def test_learns_with_bytes_and_previous_models(tmp_path):
    cfg = from_dict({**BASE, "method": "moon"})
    a = train(cfg, tmp_path / "a")
    assert (tmp_path / "a" / "metrics.parquet").exists()
    assert list(a["round"]) == [1, 2, 3] and (a["status"] == "finished").all()
    assert a["test_acc"].iloc[-1] > a["test_acc"].iloc[0]

    # Replay two rounds by hand: bytes = weights (with the head) both ways, previous models in the state.
    ctx = build_context(cfg)
    torch.manual_seed(cfg.seed)
    engine = Engine(ctx, METHODS["moon"])
    w = state_bytes(engine.server.model)
    for r in (1, 2):
        res = engine.run_round(r)
        assert res.bytes_up == res.bytes_down == cfg.num_clients * w
        assert res.test_acc == a["test_acc"].iloc[r - 1] and res.train_loss == a["train_loss"].iloc[r - 1]
        # full participation: the FedAvg of the clients' kept previous models is the new global model
        states = [engine.client_states[c]["previous"] for c in range(cfg.num_clients)]
        avg = fedavg(states, [ctx.clients[c].num_samples for c in range(cfg.num_clients)])
        for key, value in engine.server.model.state_dict().items():
            torch.testing.assert_close(avg[key].to(value.device), value, rtol=1e-5, atol=1e-6)


def test_mu_zero_without_head_is_fedavg(tmp_path):
    cfg = {**BASE, "rounds": 2}
    moon = train(from_dict({**cfg, "method": "moon", "method_params": {"mu": 0.0, "projection_head": False}}),
                 tmp_path / "moon")
    avg = train(from_dict({**cfg, "method": "fedavg"}), tmp_path / "fedavg")
    pd.testing.assert_frame_equal(moon[METRIC_COLUMNS], avg[METRIC_COLUMNS])


def test_contrastive_term_changes_training_after_first_round(tmp_path):
    # No previous model in round 1 -> CE only (official: empty model pool); mu changes rounds >= 2 only.
    cfg = {**BASE, "rounds": 2, "local_epochs": 1}
    small = train(from_dict({**cfg, "method": "moon", "method_params": {"mu": 0.0}}), tmp_path / "m0")
    big = train(from_dict({**cfg, "method": "moon", "method_params": {"mu": 5.0}}), tmp_path / "m5")
    assert small["train_loss"].iloc[0] == big["train_loss"].iloc[0]
    assert small["test_acc"].iloc[0] == big["test_acc"].iloc[0]
    assert big["train_loss"].iloc[1] > small["train_loss"].iloc[1]  # + mu * l_con, l_con > 0


def test_heterogeneous_models_refused():
    for mode in ("personalized", "global"):
        with pytest.raises(ConfigError):
            from_dict({**BASE, "method": "moon", "eval_mode": mode, "client_models": ["cnn", "resnet10"]})
    with pytest.raises(ConfigError, match="supports global"):
        from_dict({**BASE, "method": "moon", "eval_mode": "personalized"})
