"""ProtoNorm: Thomson solver (forces, energy switch, early stop), upscaled loss, server step, runs on digits."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import METHOD_BASE
from fedhpro.config import from_dict
from fedhpro.engine import tensor_bytes
from fedhpro.methods.protonorm import Client, Server, pairwise_forces, riesz_energy, thomson_align
from fedhpro.train import build_context, train

BASE = {**METHOD_BASE, "method": "protonorm"}


def min_distance(p: torch.Tensor) -> float:
    d = torch.cdist(p, p)
    return d[~torch.eye(len(p), dtype=torch.bool)].min().item()


# ---- server step ----------------------------------------------------------------------------------------

def test_forces_and_energy_exponent_switch():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # log energy (code): F_i = sum_j (p_i - p_j) / |p_i - p_j|^2
    f0 = pairwise_forces(p, 0.0)
    want = torch.stack([(p[0] - p[1]) / 2 + (p[0] - p[2]) / 4,
                        (p[1] - p[0]) / 2 + (p[1] - p[2]) / 2,
                        (p[2] - p[0]) / 4 + (p[2] - p[1]) / 2])
    assert torch.allclose(f0, want, atol=1e-6)
    assert torch.allclose(f0[0], torch.tensor([1.0, -0.5]), atol=1e-6)  # (0.5, -0.5) + (2, 0)/4
    # Coulomb: F_i = sum_j (p_i - p_j) / |p_i - p_j|^3
    f1 = pairwise_forces(p, 1.0)
    want1 = torch.stack([(p[0] - p[1]) / 2 ** 1.5 + (p[0] - p[2]) / 8,
                         (p[1] - p[0]) / 2 ** 1.5 + (p[1] - p[2]) / 2 ** 1.5,
                         (p[2] - p[0]) / 8 + (p[2] - p[1]) / 2 ** 1.5])
    assert torch.allclose(f1, want1, atol=1e-6)
    # the force is the negative gradient of the energy it belongs to
    for s in (0.0, 1.0):
        q = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_(True)
        (grad,) = torch.autograd.grad(riesz_energy(q, s), q)
        assert torch.allclose(pairwise_forces(q.detach(), s), -grad, atol=1e-6)


def test_one_solver_step_by_hand():
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised first: (1,0), (0,1)
    out, last = thomson_align(p, iterations=1, lr=0.1, momentum=0.9)
    # diff = (1,-1), r^2 = 2 -> F_0 = (0.5, -0.5); v = 0.1 F; p_0 = (1.05, -0.05)/norm
    want0 = torch.tensor([1.05, -0.05]) / math.hypot(1.05, 0.05)
    want1 = torch.tensor([-0.05, 1.05]) / math.hypot(1.05, 0.05)
    assert last == 0
    assert torch.allclose(out, torch.stack([want0, want1]), atol=1e-6)


@pytest.mark.parametrize("exponent", [0.0, 1.0])
def test_alignment_keeps_unit_norm_and_spreads_prototypes(exponent):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, generator=gen)
    protos = 5.0 * (base + 0.3 * torch.randn(8, 16, generator=gen))  # clustered class means
    start = F.normalize(protos, dim=1)
    out, last = thomson_align(protos, energy_exponent=exponent)
    assert torch.allclose(out.norm(dim=1), torch.ones(8), atol=1e-5)
    assert min_distance(out) > min_distance(start) + 0.3
    assert riesz_energy(out, exponent) < riesz_energy(start, exponent)
    assert last <= 499


def test_early_stop_on_a_balanced_configuration():
    # An equilateral triangle is an equilibrium: the mean force stays constant from t = 10 on, so the
    # solver stops after 10 unchanged values, at t = 20.
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    tri = torch.stack([angles.cos(), angles.sin()], dim=1)
    out, last = thomson_align(tri, iterations=500)
    assert last == 20
    assert torch.allclose(out, tri, atol=1e-5)
    _, last = thomson_align(tri, iterations=500, early_stop_start=30, patience=5)
    assert last == 35
    _, last = thomson_align(tri, iterations=15)
    assert last == 14


def test_server_aligns_only_present_classes_and_scores_by_nearest_unit_prototype():
    ctx = build_context(from_dict({**BASE, "eval_mode": "personalized"}))
    server = Server(ctx)
    d = ctx.feature_dim
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, d, generator=gen), torch.rand(3, d, generator=gen)
    uploads = [{"prototype_classes": torch.tensor([0, 2, 5]), "prototypes": a},
               {"prototype_classes": torch.tensor([2, 5, 7]), "prototypes": b}]
    server.aggregate(1, uploads)
    assert server.present.tolist() == [c in (0, 2, 5, 7) for c in range(10)]
    means = torch.stack([a[0], (a[1] + b[0]) / 2, (a[2] + b[1]) / 2, b[2]])
    want, _ = thomson_align(means)
    assert torch.allclose(server.prototypes[[0, 2, 5, 7]], want)
    assert torch.allclose(server.prototypes[[0, 2, 5, 7]].norm(dim=1), torch.ones(4), atol=1e-5)
    assert (server.prototypes[~server.present] == 0).all()
    payload = server.broadcast(2)
    assert payload["prototype_classes"].tolist() == [0, 2, 5, 7]
    # evaluation: argmin mean((r - u_c)^2) over present classes == argmax r.u_c
    model = ctx.make_model()
    model.eval()
    x = ctx.prepare(ctx.test_x[:20], train=False)
    scores = server.scores(model, x)
    r = model.features(x)
    dots = r @ server.prototypes.T
    dots[:, ~server.present] = -math.inf
    assert torch.equal(scores.argmax(1), dots.argmax(1))


@pytest.mark.parametrize("upscale", [True, False])
def test_client_loss_is_ce_plus_lambda_mse_to_scaled_unit_prototype(upscale):
    cfg = from_dict({**BASE, "eval_mode": "personalized", "method_params": {"upscale": upscale}})
    ctx = build_context(cfg)
    model = ctx.make_model()
    d = ctx.feature_dim
    units = F.normalize(torch.rand(2, d, generator=torch.Generator().manual_seed(1)), dim=1)
    client = Client(ctx)
    payload = {"prototype_classes": torch.tensor([1, 3]), "prototypes": units}
    client.setup(ctx.clients[0], model, payload, {}, torch.Generator().manual_seed(0), 1)
    x = ctx.prepare(ctx.test_x[:16], train=False)
    y = ctx.test_y[:16]
    loss = client.loss(model, x, y)
    r, logits = model(x)
    target = r.detach().clone()
    s = 80.0 if upscale else 1.0
    target[y == 1] = s * units[0]
    target[y == 3] = s * units[1]
    want = F.cross_entropy(logits, y) + 10.0 * ((r - target) ** 2).sum() / (16 * d)
    assert torch.allclose(loss, want, rtol=1e-5)
    assert ((y == 1) | (y == 3)).any()


# ---- runs on digits ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def personalized_run(tmp_path_factory):
    cfg = from_dict({**BASE, "eval_mode": "personalized"})
    return cfg, train(cfg, tmp_path_factory.mktemp("pn") / "run")


def proto_bytes(ctx, d: int) -> int:
    return sum(int((c.class_counts > 0).sum()) for c in ctx.clients) * d * 4


def test_personalized_learns_and_counts_prototype_bytes(personalized_run):
    cfg, df = personalized_run
    assert (df["status"] == "finished").all() and list(df["round"]) == [1, 2, 3]
    assert df["client_acc_mean"].iloc[-1] > df["client_acc_mean"].iloc[0]
    assert df["client_acc_mean"].iloc[-1] > 0.6
    ctx = build_context(cfg)
    up = proto_bytes(ctx, ctx.feature_dim)
    assert (df["bytes_up"] == up).all()
    # down: unit prototypes of the classes uploaded last round (all 10 here), to every client
    assert df["bytes_down"].tolist() == [0, 6 * 10 * ctx.feature_dim * 4, 6 * 10 * ctx.feature_dim * 4]


def test_global_mode_learns_and_adds_weight_bytes(tmp_path):
    cfg = from_dict({**BASE, "eval_mode": "global"})
    df = train(cfg, tmp_path / "g")
    assert df["test_acc"].iloc[-1] > df["test_acc"].iloc[0]
    ctx = build_context(cfg)
    weights = tensor_bytes(ctx.make_model().state_dict())
    d = ctx.feature_dim
    assert (df["bytes_up"] == 6 * weights + proto_bytes(ctx, d)).all()
    assert df["bytes_down"].tolist() == [6 * weights] + [6 * (weights + 10 * d * 4)] * 2


def test_heterogeneous_models_personalized(tmp_path):
    cfg = from_dict({**BASE, "eval_mode": "personalized", "client_models": ["cnn", "resnet10"]})
    df = train(cfg, tmp_path / "h")
    assert df["client_acc_mean"].iloc[-1] > df["client_acc_mean"].iloc[0]
    assert (df["bytes_up"] == proto_bytes(build_context(cfg), 512)).all()  # shared d = 512
