"""GFPL: Bhattacharyya fusion, moment matching, ETF, dot regression, GMM prototypes, runs on digits."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import METHOD_BASE
from fedhpro.config import from_dict
from fedhpro.engine import Engine, tensor_bytes
from fedhpro.methods import METHODS
from fedhpro.methods.gfpl import (Client, Server, bhattacharyya_diag, client_gmm_prototypes, dot_regression_loss,
                                  fuse_components, fuse_uploads, hybrid_loss, merge_pair, retrain_heads,
                                  sample_pseudo_features, simplex_etf)
from fedhpro.nets import DualClassifierNet
from fedhpro.train import build_context, train

BASE = {**METHOD_BASE, "method": "gfpl",
        "method_params": {"start_round": 1, "interval": 1}}


# ---- Bhattacharyya distance and fusion ---------------------------------------------------------------------

def test_bhattacharyya_matches_closed_forms():
    mu1, var1 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    mu2, var2 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 0.5, 0.25], dtype=torch.float64)
    got = bhattacharyya_diag(mu1, var1, mu2, var2)
    # Eq. 7, univariate, summed over the independent dimensions
    uni = sum(0.25 * (a - b) ** 2 / (s + t) + 0.5 * math.log((s + t) / (2 * math.sqrt(s * t)))
              for a, b, s, t in zip(mu1.tolist(), mu2.tolist(), var1.tolist(), var2.tolist()))
    assert got.item() == pytest.approx(uni, rel=1e-12)
    # Eq. 8 with full (diagonal) covariance matrices
    s1, s2 = torch.diag(var1), torch.diag(var2)
    s = (s1 + s2) / 2
    dm = (mu1 - mu2)[:, None]
    full = (dm.T @ torch.linalg.inv(s) @ dm).item() / 8 + 0.5 * math.log(
        torch.det(s).item() / math.sqrt(torch.det(s1).item() * torch.det(s2).item()))
    assert got.item() == pytest.approx(full, rel=1e-12)
    # by hand, first dimension alone: 1/4 * 1/3 + 1/2 ln(3 / (2 sqrt 2))
    first = bhattacharyya_diag(mu1[:1], var1[:1], mu2[:1], var2[:1]).item()
    assert first == pytest.approx(1 / 12 + 0.5 * math.log(3 / (2 * math.sqrt(2))), rel=1e-12)
    assert bhattacharyya_diag(mu1, var1, mu1, var1).item() == 0.0
    assert got.item() == bhattacharyya_diag(mu2, var2, mu1, var1).item()
    assert got.item() > 0


def test_moment_matching_merge_preserves_pooled_mean_and_variance():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, generator=gen, dtype=torch.float64) + 1.0
    b = 2.0 * torch.randn(50, 4, generator=gen, dtype=torch.float64) - 3.0
    both = torch.cat([a, b])
    w, mu, var = merge_pair(torch.tensor(30.0, dtype=torch.float64), a.mean(0), a.var(0, unbiased=False),
                            torch.tensor(50.0, dtype=torch.float64), b.mean(0), b.var(0, unbiased=False))
    assert w.item() == 80.0
    assert torch.allclose(mu, both.mean(0))
    assert torch.allclose(var, both.var(0, unbiased=False))
    # the paper's literal "weighted average" of means and standard deviations
    _, mu2, var2 = merge_pair(torch.tensor(1.0), torch.zeros(2), torch.tensor([1.0, 4.0]),
                              torch.tensor(3.0), torch.ones(2), torch.tensor([9.0, 4.0]), rule="average")
    assert torch.allclose(mu2, torch.full((2,), 0.75))
    assert torch.allclose(var2, torch.tensor([(0.25 * 1 + 0.75 * 3) ** 2, 4.0]))


def test_fusion_merges_close_components_and_keeps_valid_mixtures():
    means = torch.tensor([[0.0, 0.0], [0.05, 0.0], [10.0, 10.0], [0.0, 0.1]])
    variances = torch.tensor([[1.0, 1.0], [1.0, 1.2], [0.5, 0.5], [0.9, 1.0]])
    weights = torch.tensor([10.0, 30.0, 20.0, 40.0])
    w, mu, var = fuse_components(weights, means, variances, threshold=1.0)
    assert len(w) == 2  # the three overlapping components become one, the far one is kept
    assert w.sum().item() == pytest.approx(1.0)
    assert (var > 0).all()
    assert w.tolist() == pytest.approx([0.8, 0.2])
    pooled_mean = (weights[[0, 1, 3], None] * means[[0, 1, 3]]).sum(0) / 80
    assert torch.allclose(mu[0], pooled_mean, atol=1e-6)
    # threshold 0: nothing merges; infinite threshold: one component with the mixture's moments
    w0, mu0, _ = fuse_components(weights, means, variances, threshold=0.0)
    assert len(w0) == 4 and torch.allclose(mu0, means) and torch.allclose(w0, weights / 100)
    w1, mu1, var1 = fuse_components(weights, means, variances, threshold=math.inf)
    pi = (weights / 100)[:, None]
    mix_mean = (pi * means).sum(0)
    mix_var = (pi * (variances + means ** 2)).sum(0) - mix_mean ** 2
    assert len(w1) == 1 and torch.allclose(mu1[0], mix_mean, atol=1e-5) and torch.allclose(var1[0], mix_var,
                                                                                            atol=1e-4)


def test_fuse_uploads_per_class_weights_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    ups = []
    for classes in ([0, 0, 1], [1, 1, 1, 2]):
        n = len(classes)
        ups.append({"component_classes": torch.tensor(classes), "component_weights": torch.rand(n, generator=gen) * 10,
                    "component_means": torch.randn(n, 3, generator=gen), "component_variances":
                    torch.rand(n, 3, generator=gen) + 0.1})
    out = fuse_uploads(ups + [{}], threshold=1.0, rule="moment")
    assert out["gmm_classes"].unique().tolist() == [0, 1, 2]
    for c in (0, 1, 2):
        rows = out["gmm_classes"] == c
        assert out["gmm_weights"][rows].sum().item() == pytest.approx(1.0)
    assert (out["gmm_variances"] > 0).all()
    assert fuse_uploads([{}], 1.0, "moment") is None


# ---- ETF and losses -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,c", [(10, 10), (80, 10), (128, 62)])
def test_simplex_etf_equal_norms_and_equiangular(dim, c):
    m = simplex_etf(dim, c, torch.Generator().manual_seed(3))
    assert m.shape == (dim, c)
    assert torch.allclose(m.norm(dim=0), torch.ones(c), atol=1e-5)
    cos = F.normalize(m, dim=0).T @ F.normalize(m, dim=0)
    off = cos[~torch.eye(c, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (c - 1)), atol=1e-5)
    assert torch.equal(m, simplex_etf(dim, c, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError):
        simplex_etf(c - 1, c, torch.Generator())


def test_dot_regression_and_hybrid_loss_by_hand():
    etf = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # columns m_0 = e1, m_1 = e2
    h = torch.tensor([[0.6, 0.8], [0.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    # 0.5 * mean((m_y.h - |m_y||h|)^2 / |h|): (0.6 - 1)^2 / 1, 0, (2 - 2)^2 / 2
    assert dot_regression_loss(h, y, etf).item() == pytest.approx(0.5 * (0.16 + 0 + 0) / 3)
    unit = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    assert dot_regression_loss(unit, torch.tensor([1]), etf).item() == pytest.approx(0.5 * (1 / math.sqrt(2) - 1) ** 2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    want = F.cross_entropy(logits, y).item() + 2.0 * 0.5 * 0.16 / 3
    assert hybrid_loss(h, logits, y, etf, 2.0).item() == pytest.approx(want)


# ---- GMM prototypes and pseudo-features ---------------------------------------------------------------------

def test_client_gmm_prototypes_shapes_weights_and_determinism():
    gen = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(40, 6, generator=gen), torch.randn(2, 6, generator=gen) + 5,
                       torch.randn(1, 6, generator=gen)])
    labels = torch.tensor([0] * 40 + [3] * 2 + [7])
    out = client_gmm_prototypes(feats, labels, 3, 1e-4, (0, 1, 2))
    assert out["component_classes"].tolist() == [0, 0, 0, 3, 3, 7]  # K_c = min(K, n_c)
    for c, n in ((0, 40), (3, 2), (7, 1)):
        assert out["component_weights"][out["component_classes"] == c].sum().item() == pytest.approx(n, rel=1e-5)
    assert (out["component_variances"] >= 1e-4 * 0.999).all()
    assert torch.allclose(out["component_means"][-1], feats[-1])  # one sample: its own mean
    again = client_gmm_prototypes(feats, labels, 3, 1e-4, (0, 1, 2))
    assert all(torch.equal(out[k], again[k]) for k in out)
    # bytes: only weights, means, variances count (component_classes is declared header metadata)
    assert tensor_bytes(out, Client.UPLOAD_METADATA) == 6 * (2 * 6 + 1) * 4
    assert tensor_bytes(out) == 6 * (2 * 6 + 1) * 4 + 6 * 8


def test_pseudo_features_are_class_balanced_and_follow_the_components():
    gmm = {"gmm_classes": torch.tensor([0, 0, 2]), "gmm_weights": torch.tensor([1.0, 0.0, 1.0]),
           "gmm_means": torch.tensor([[1.0, 2.0], [50.0, 50.0], [-3.0, 0.0]]),
           "gmm_variances": torch.tensor([[1e-6, 1e-6], [1.0, 1.0], [4.0, 4.0]])}
    z, y = sample_pseudo_features(gmm, 500, torch.Generator().manual_seed(0))
    assert z.shape == (1000, 2) and (y == 0).sum() == 500 and (y == 2).sum() == 500
    assert torch.allclose(z[y == 0], torch.tensor([1.0, 2.0]).expand(500, 2), atol=0.01)  # zero-weight never used
    assert torch.allclose(z[y == 2].mean(0), torch.tensor([-3.0, 0.0]), atol=0.3)
    assert z[y == 2].std(0).sub(2.0).abs().max() < 0.2


@pytest.mark.parametrize("classifier_input", ["feature", "projection"])
def test_retraining_updates_only_projection_and_classifier(classifier_input):
    cfg = from_dict({**BASE, "eval_mode": "personalized",
                     "method_params": {"classifier_input": classifier_input, "projection_dim": 4}})
    ctx = build_context(cfg)
    model = ctx.make_model()  # the run's context applies GFPL's model_wrapper hook
    p = 10  # projection_dim 4 is raised to C = 10 (the ETF needs p >= C)
    assert model.etf.shape == (p, 10)
    assert model.classifier.in_features == (ctx.feature_dim if classifier_input == "feature" else p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    gmm = {"gmm_classes": torch.arange(10), "gmm_weights": torch.ones(10),
           "gmm_means": torch.rand(10, ctx.feature_dim, generator=gen),
           "gmm_variances": torch.full((10, ctx.feature_dim), 0.01)}
    z, y = sample_pseudo_features(gmm, 8, gen)
    retrain_heads(model, z, y, 1, 32, 0.01, 0.5, 1.0, gen)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"projector.0.weight", "base.classifier.weight"} <= changed
    assert all(k.startswith(("projector.", "base.classifier.")) for k in changed)  # the extractor is frozen


# ---- engine integration -------------------------------------------------------------------------------------

def test_global_mode_learns_with_wrapped_models_and_exact_bytes():
    cfg = from_dict({**BASE, "eval_mode": "global"})
    ctx = build_context(cfg)
    torch.manual_seed(0)
    engine = Engine(ctx, METHODS["gfpl"])
    model = ctx.make_model()
    assert isinstance(model, DualClassifierNet) and isinstance(engine.server.model, DualClassifierNet)
    state = model.state_dict()
    assert any(k.startswith("projector.") for k in state) and "etf" not in state
    assert model.etf.shape == (80, 10)
    assert torch.equal(model.etf, engine.server.model.etf)  # one shared ETF
    weights = tensor_bytes(state)
    d = ctx.feature_dim
    r1 = engine.run_round(1)
    comps = sum(min(3, int(n)) for c in ctx.clients for n in c.class_counts if n > 0)
    assert r1.bytes_up == 6 * weights + comps * (2 * d + 1) * 4
    assert r1.bytes_down == 6 * weights
    fused = len(engine.server.gmm["gmm_weights"])
    assert 10 <= fused <= comps
    r2 = engine.run_round(2)
    assert r2.bytes_down == 6 * (weights + fused * (2 * d + 1) * 4)
    r3 = engine.run_round(3)
    assert r3.test_acc > r1.test_acc


def test_interaction_schedule_start_round_and_interval():
    cfg = from_dict({**BASE, "eval_mode": "personalized", "method_params": {"start_round": 2, "interval": 3}})
    server = Server(build_context(cfg))
    assert [server.broadcast(r)["collect_prototypes"] for r in range(1, 10)] == [
        False, True, False, False, True, False, False, True, False]
    server.gmm = {"gmm_classes": torch.tensor([0])}
    server.fused_round = 2
    assert "gmm_classes" in server.broadcast(3) and "gmm_classes" not in server.broadcast(4)


@pytest.fixture(scope="module")
def personalized_run(tmp_path_factory):
    cfg = from_dict({**BASE, "eval_mode": "personalized"})
    return cfg, train(cfg, tmp_path_factory.mktemp("gfpl") / "run")


def test_personalized_learns_and_counts_gmm_bytes(personalized_run):
    cfg, df = personalized_run
    assert (df["status"] == "finished").all() and list(df["round"]) == [1, 2, 3]
    assert df["client_acc_mean"].iloc[-1] > df["client_acc_mean"].iloc[0]
    assert df["client_acc_mean"].iloc[-1] > 0.6
    ctx = build_context(cfg)
    per_comp = (2 * ctx.feature_dim + 1) * 4
    comps = sum(min(3, int(n)) for c in ctx.clients for n in c.class_counts if n > 0)
    assert (df["bytes_up"] == comps * per_comp).all()  # no weights in personalized mode
    assert df["bytes_down"].iloc[0] == 0
    for down in df["bytes_down"].iloc[1:]:  # fused global GMMs (all 10 classes) to each of the 6 clients
        assert down % (6 * per_comp) == 0 and 10 <= down // (6 * per_comp) <= comps


def test_heterogeneous_models_personalized(tmp_path):
    cfg = from_dict({**BASE, "eval_mode": "personalized", "client_models": ["cnn", "resnet10"],
                     "method_params": {"start_round": 1, "interval": 1, "eval_rule": "etf"}})
    df = train(cfg, tmp_path / "h")
    assert df["client_acc_mean"].iloc[-1] > df["client_acc_mean"].iloc[0]
    ctx = build_context(cfg)
    comps = sum(min(3, int(n)) for c in ctx.clients for n in c.class_counts if n > 0)
    assert (df["bytes_up"] == comps * (2 * 512 + 1) * 4).all()
