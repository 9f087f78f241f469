"""FedTGP: distance, adaptive margin, server step by hand; digits runs in both modes (+ heterogeneous models),
communication bytes by formula (determinism and resume: test_method_contract.py)."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import METHOD_BASE, MODES
from fedhpro.config import ConfigError, from_dict
from fedhpro.engine import tensor_bytes
from fedhpro.methods.fedtgp import Params, Server, adaptive_margin, euclidean_distances, margin_contrastive_loss
from fedhpro.nets import TrainablePrototypes
from fedhpro.train import build_context, train

BASE = {**METHOD_BASE, "method": "fedtgp"}


# ---- unit tests --------------------------------------------------------------------------------------------


def test_distance_matches_cdist_and_has_finite_gradients_at_zero():
    torch.manual_seed(0)
    p, g = torch.randn(5, 3), torch.randn(4, 3)
    assert torch.allclose(euclidean_distances(p, g), torch.cdist(p, g), atol=1e-4)
    # zero distance: a point equal to its centre
    points = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    centres = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]], requires_grad=True)
    loss = margin_contrastive_loss(points, torch.tensor([0, 1]), centres, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(points.grad).all() and torch.isfinite(centres.grad).all()
    # the code's bare sqrt of the expanded form is not safe there
    naive_p = points.detach().clone().requires_grad_(True)
    sq = naive_p.pow(2).sum(1, keepdim=True) - 2 * naive_p @ centres.detach().T + centres.detach().pow(2).sum(1)
    torch.sqrt(sq).sum().backward()
    assert not torch.isfinite(naive_p.grad).all()


def test_margin_contrastive_loss_by_hand():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # distances: row 0 -> [0, 5], row 1 -> [3, 4]; margin 1 on the true class
    loss = margin_contrastive_loss(points, torch.tensor([0, 1]), centres, 1.0)
    row0 = math.log(1 + math.exp(-4))  # logits -[1, 5], class 0
    row1 = math.log(1 + math.exp(2))  # logits -[3, 5], class 1
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-4)


def _code_margin(means: torch.Tensor, present: torch.Tensor, tau: float) -> float:
    """servertgp.receive_protos, literally: 1e9 sentinel, k1 > k2 pairs, absent classes get the min gap."""
    gap = torch.ones(len(means)) * 1e9
    keys = torch.nonzero(present).flatten().tolist()
    for k1 in keys:
        for k2 in keys:
            if k1 > k2:
                dis = torch.norm(means[k1] - means[k2], p=2)
                gap[k1] = torch.min(gap[k1], dis)
                gap[k2] = torch.min(gap[k2], dis)
    min_gap = torch.min(gap)
    gap[gap > 1e8] = min_gap
    return min(torch.max(gap).item(), tau)


def test_adaptive_margin_code_formula_and_cap():
    means = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 10.0], [7.0, 7.0]])
    present = torch.tensor([True, True, True, False])
    delta, gaps = adaptive_margin(means, present, 100.0)
    # nearest-class gaps 3, 3, 10; the absent class gets the smallest (3); delta = max = 10 < tau
    assert torch.allclose(gaps, torch.tensor([3.0, 3.0, 10.0, 3.0]))
    assert delta == pytest.approx(10.0) and delta == pytest.approx(_code_margin(means, present, 100.0))
    assert adaptive_margin(means, present, 5.0)[0] == 5.0
    # prototypes farther apart than tau: capped
    far = means * 100
    assert adaptive_margin(far, present, 100.0)[0] == 100.0 == _code_margin(far, present, 100.0)
    # fewer than two classes: the code's sentinel is capped, i.e. tau
    one = torch.tensor([True, False, False, False])
    assert adaptive_margin(means, one, 100.0)[0] == 100.0 == _code_margin(means, one, 100.0)
    torch.manual_seed(1)
    rand, mask = torch.randn(8, 5) * 3, torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert adaptive_margin(rand, mask, 100.0)[0] == pytest.approx(_code_margin(rand, mask, 100.0), rel=1e-6)


def _server(num_classes=3, dim=4, epochs=1, lr=0.05, batch_size=8, tau=100.0) -> Server:
    cfg = SimpleNamespace(eval_mode="personalized", lr=lr, batch_size=batch_size)
    ctx = SimpleNamespace(cfg=cfg, params=Params(server_epochs=epochs, margin_threshold=tau),
                          num_classes=num_classes, feature_dim=dim, device=torch.device("cpu"))
    return Server(ctx)


def test_server_step_is_one_sgd_step_on_the_margin_loss():
    torch.manual_seed(0)
    server = _server(epochs=1, batch_size=8)
    assert server.broadcast(1) == {}  # no global prototypes before the first update (code: None)
    uploads = [{"prototype_classes": torch.tensor([0, 1]), "prototypes": torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0]])},
               {"prototype_classes": torch.tensor([1, 2]), "prototypes": torch.tensor([[0, 4.0, 0, 0], [0, 0, 6, 0]])}]
    # class means (1,0,0,0), (0,3,0,0), (0,0,6,0): nearest gaps sqrt(10), sqrt(10), sqrt(37) -> delta = sqrt(37)
    before = TrainablePrototypes(3, 4)
    before.load_state_dict(server.generator.state_dict())
    server.aggregate(1, uploads)
    assert server.margin == pytest.approx(math.sqrt(37), rel=1e-6)
    # by hand: all four pairs fit one batch -> exactly one SGD step (lr 0.05) on CE(-(dist + delta onehot))
    points = torch.cat([u["prototypes"] for u in uploads])
    labels = torch.tensor([0, 1, 1, 2])
    loss = margin_contrastive_loss(points, labels, before(torch.arange(3)), math.sqrt(37))
    grads = torch.autograd.grad(loss, list(before.parameters()))
    for (name, p), g in zip(before.named_parameters(), grads):
        assert torch.allclose(server.generator.state_dict()[name], p - 0.05 * g, atol=1e-6), name
    # broadcast: G^c = TGP(c) for all C classes, detached
    payload = server.broadcast(2)
    assert payload["prototype_classes"].tolist() == [0, 1, 2]
    with torch.no_grad():
        assert torch.allclose(payload["prototypes"], server.generator(torch.arange(3)))
    assert not payload["prototypes"].requires_grad
    assert tensor_bytes(payload, Server.BROADCAST_METADATA) == 3 * 4 * 4  # C x d floats; the class ids are header metadata


def test_server_training_separates_the_prototypes_and_checkpoints():
    torch.manual_seed(0)
    server = _server(num_classes=4, dim=8, epochs=200, lr=0.1, batch_size=3)
    protos = torch.eye(4, 8) * 5 + 0.3 * torch.randn(4, 8)
    uploads = [{"prototype_classes": torch.arange(4), "prototypes": protos + 0.1 * torch.randn(4, 8)}
               for _ in range(3)]
    server.aggregate(1, uploads)
    nearest = torch.cdist(protos, server.prototypes).argmin(1)
    assert nearest.tolist() == [0, 1, 2, 3]
    state = torch.load(_save(server.state_dict()), weights_only=True)
    other = _server(num_classes=4, dim=8)
    other.load_state_dict(state)
    assert torch.equal(other.prototypes, server.prototypes) and bool(other.trained)
    for a, b in zip(other.generator.parameters(), server.generator.parameters()):
        assert torch.equal(a, b)


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_params_validated():
    with pytest.raises(ConfigError):
        from_dict({**BASE, "method_params": {"prototype_timing": "sometimes"}})
    with pytest.raises(ConfigError):
        from_dict({**BASE, "method_params": {"server_epochs": -1}})
    assert from_dict({**BASE, "method_params": {"margin_threshold": 50}}).method_params["margin_threshold"] == 50


# ---- runs on digits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_digits_run_sends_the_expected_bytes(mode, tmp_path):
    """Bytes by the method's formula (learning, determinism, resume: test_method_contract.py). One local epoch:
    what is sent depends on the partition and the round, not on how long clients train (a third of the time)."""
    cfg = from_dict({**BASE, **MODES[mode], "local_epochs": 1})
    df = train(cfg, tmp_path / "run")
    # communication: up = sum_i |local classes_i| x d x 4; down = C x d x 4 from round 2 (+ weights both ways)
    ctx = build_context(cfg)
    d, c, n = ctx.feature_dim, ctx.num_classes, cfg.num_clients
    assert d == (512 if cfg.client_models else 128)
    up = sum(int((cl.class_counts > 0).sum()) for cl in ctx.clients) * d * 4
    weights = tensor_bytes(ctx.make_model().state_dict()) if cfg.eval_mode == "global" else 0
    assert (df["bytes_up"] == up + n * weights).all()
    assert df["bytes_down"].tolist() == [n * weights] + [n * (c * d * 4 + weights)] * 2


