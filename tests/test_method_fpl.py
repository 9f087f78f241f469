"""FPL and FINCH: clustering on hand-made cases and against a direct transcription of the reference algorithm,
CPCL/UPCL by hand, the server clustering step, digits runs, bytes (resume: test_method_contract.py)."""

import math

import numpy as np
import pytest
import torch

from conftest import METHOD_BASE
from fedhpro.config import ConfigError, from_dict
from fedhpro.engine import Engine
from fedhpro.finch import connected_components, finch
from fedhpro.methods import METHODS
from fedhpro.methods.fpl import cluster_prototypes, fpl_terms, unbiased_prototypes
from fedhpro.train import build_context, train

BASE = METHOD_BASE


def angles(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


# ---------------------------------------------------------------------------------------------- FINCH
def test_connected_components_numbered_by_smallest_member():
    assert connected_components(torch.tensor([3, 2, 1, 0])).tolist() == [0, 1, 1, 0]
    assert connected_components(torch.tensor([1, 2, 3, 3, 5, 4])).tolist() == [0, 0, 0, 0, 1, 1]
    assert connected_components(torch.tensor([4, 0, 3, 2, 1])).tolist() == [0, 0, 1, 1, 0]
    assert connected_components(torch.tensor([0])).tolist() == [0]


def test_finch_finds_two_separated_groups():
    x = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, -0.1], [-0.1, 1.0]])
    parts, counts = finch(x)
    assert counts == [2] and parts[:, -1].tolist() == [0, 1, 0, 1, 0, 1]
    # cosine ignores scale
    scaled = x * torch.tensor([[1.0], [7.0], [0.2], [3.0], [50.0], [0.5]])
    assert torch.equal(finch(scaled)[0], parts)


def test_finch_hierarchy_keeps_partitions_until_one_cluster():
    # four tight pairs, two pairs near 0-11 degrees, two near 80-91 degrees
    parts, counts = finch(angles(0, 1, 80, 81, 10, 11, 90, 91))
    assert counts == [4, 2]
    assert parts[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert parts[:, -1].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_finch_degenerate_inputs():
    parts, counts = finch(torch.tensor([[0.3, -2.0, 1.0]]))
    assert counts == [1] and parts.tolist() == [[0]]
    parts, counts = finch(torch.ones(5, 3))  # identical points
    assert counts == [1] and parts[:, -1].tolist() == [0] * 5
    parts, counts = finch(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # two points are each other's neighbour
    assert counts == [1] and parts[:, -1].tolist() == [0, 0]
    parts, counts = finch(torch.tensor([[0.0], [1.0], [10.0], [11.0]]), distance="euclidean")
    assert counts == [2] and parts[:, -1].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        finch(torch.zeros(0, 3))


def reference_finch(data: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Direct transcription of the reference algorithm (sklearn distances, scipy components, cluster means)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components as scipy_components
    from sklearn.metrics import pairwise_distances

    def rank(mat):
        dist = pairwise_distances(mat, mat, metric="cosine")
        np.fill_diagonal(dist, 1e12)
        first = np.argmin(dist, axis=1)
        n = len(mat)
        a = sp.csr_matrix((np.ones(n), (np.arange(n), first)), shape=(n, n)) + sp.eye(n, format="csr")
        return scipy_components(a @ a.T, directed=True, connection="weak", return_labels=True)

    def means(labels):
        return np.stack([data[labels == k].mean(0) for k in range(labels.max() + 1)])

    n0, c = rank(data)
    cols, counts = [c], [n0]
    while True:
        k, u = rank(means(cols[-1]))
        if k == 1 or counts[-1] - k < 1:
            break
        cols.append(u[cols[-1]])
        counts.append(k)
    return np.stack(cols, 1), counts


@pytest.mark.parametrize("seed", range(6))
def test_finch_matches_reference_transcription(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 8))
    data = centres[rng.integers(0, 5, size=60)] + 0.3 * rng.normal(size=(60, 8))
    parts, counts = finch(torch.from_numpy(data))
    ref_parts, ref_counts = reference_finch(data.astype(np.float32).astype(np.float64))
    assert counts == ref_counts
    assert np.array_equal(parts.numpy(), ref_parts)


# ---------------------------------------------------------------------------------------------- losses
def test_cpcl_and_upcl_by_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    classes = torch.tensor([0, 0, 1])
    unbiased, present = unbiased_prototypes(protos, classes, num_classes=3)
    assert unbiased.tolist() == [[0.5, 0.5], [-1.0, 0.0], [0.0, 0.0]] and present.tolist() == [True, True, False]
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2])  # class 2 has no prototype: contributes 0, but counts in the batch size
    cpcl, upcl = fpl_terms(features, labels, protos, classes, unbiased, present, temperature=1.0)
    e = math.e
    c1 = -math.log((e + 1) / (e + 1 + 1 / e))  # cosines 1, 0 (positives), -1
    c2 = -math.log(1 / (1 + e + 1))  # cosines 0, 1, 0 (positive last)
    assert cpcl.item() == pytest.approx((c1 + c2) / 3, rel=1e-6)
    u1 = ((2 - 0.5) ** 2 + (0 - 0.5) ** 2) / 2
    u2 = ((0 + 1) ** 2 + (3 - 0) ** 2) / 2
    assert upcl.item() == pytest.approx((u1 + u2) / 3, rel=1e-6)
    (cpcl + upcl).backward()
    assert torch.isfinite(features.grad).all() and features.grad[2].abs().max() == 0


def test_cpcl_matches_official_exp_formula_at_tau_002():
    torch.manual_seed(0)
    protos = torch.randn(7, 5, dtype=torch.float64)
    classes = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    unbiased, present = unbiased_prototypes(protos, classes, 5)
    features = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    cpcl, upcl = fpl_terms(features, labels, protos, classes, unbiased, present, temperature=0.02)
    total_c, total_u = 0.0, 0.0
    for r, y in zip(features, labels.tolist()):  # the official per-sample loop
        if y not in classes.tolist():
            continue
        sims = torch.exp(torch.cosine_similarity(r[None], protos, dim=1) / 0.02)
        total_c += -torch.log(sims[classes == y].sum() / sims.sum()).item()
        total_u += torch.nn.functional.mse_loss(r[None], protos[classes == y].mean(0, keepdim=True)).item()
    assert cpcl.item() == pytest.approx(total_c / 6, rel=1e-9)
    assert upcl.item() == pytest.approx(total_u / 6, rel=1e-9)


def test_server_clusters_each_class():
    uploads = [
        {"prototype_classes": torch.tensor([0, 1]), "prototypes": torch.tensor([[1.0, 0.1], [5.0, 5.0]])},
        {"prototype_classes": torch.tensor([0]), "prototypes": torch.tensor([[1.0, -0.1]])},
        {"prototype_classes": torch.tensor([0, 2]), "prototypes": torch.tensor([[0.1, 1.0], [1.0, 2.0]])},
        {"prototype_classes": torch.tensor([0, 2]), "prototypes": torch.tensor([[-0.1, 1.0], [3.0, 4.0]])},
    ]
    protos, classes = cluster_prototypes(uploads)
    assert classes.tolist() == [0, 0, 1, 2]  # class 0: two domains; 1: a single client; 2: two points -> one cluster
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [2.0, 3.0]]))


# ---------------------------------------------------------------------------------------------- runs
def test_learns_and_round_one_is_fedavg(tmp_path):
    cfg = from_dict({**BASE, "method": "fpl"})
    a = train(cfg, tmp_path / "a")
    assert (tmp_path / "a" / "metrics.parquet").exists()
    assert list(a["round"]) == [1, 2, 3] and (a["status"] == "finished").all()
    assert a["test_acc"].iloc[-1] > a["test_acc"].iloc[0]
    # Round 1 has no prototypes yet: exactly FedAvg (same architecture, CE only).
    avg = train(from_dict({**BASE, "method": "fedavg", "rounds": 1}), tmp_path / "fedavg")
    assert avg["test_acc"].iloc[0] == a["test_acc"].iloc[0] and avg["train_loss"].iloc[0] == a["train_loss"].iloc[0]


def test_bytes_and_last_epoch_prototypes():
    cfg = from_dict({**BASE, "method": "fpl", "rounds": 2, "clients_per_round": 4})
    ctx = build_context(cfg)
    torch.manual_seed(cfg.seed)
    engine = Engine(ctx, METHODS["fpl"])
    server, client = engine.server, engine.client
    w = sum(v.numel() * v.element_size() for v in server.model.state_dict().values())
    d = ctx.feature_dim
    for r in (1, 2):
        k_down = len(server.classes)
        assert (k_down == 0) == (r == 1)
        res = engine.run_round(r)
        n = len(res.selected)
        local_classes = sum(int((ctx.clients[c].class_counts > 0).sum()) for c in res.selected)
        assert res.bytes_down == n * (w + k_down * d * 4)
        assert res.bytes_up == n * w + local_classes * d * 4
        # the last client's prototypes came from its last local epoch only (each sample once)
        last = ctx.clients[res.selected[-1]]
        counts = client.accumulator.counts.cpu()
        per_epoch = last.num_samples - (1 if last.num_samples % cfg.batch_size == 1 else 0)
        assert counts.sum().item() == per_epoch and (counts <= last.class_counts).all()
        # the server's cluster prototypes cover exactly the classes uploaded this round
        uploaded = set().union(*(torch.nonzero(ctx.clients[c].class_counts).flatten().tolist() for c in res.selected))
        assert set(server.classes.tolist()) == uploaded and server.prototypes.shape == (len(server.classes), d)


def test_heterogeneous_models_refused():
    for mode in ("personalized", "global"):
        with pytest.raises(ConfigError):
            from_dict({**BASE, "method": "fpl", "eval_mode": mode, "client_models": ["cnn", "resnet10"]})
    with pytest.raises(ConfigError, match="supports global"):
        from_dict({**BASE, "method": "fpl", "eval_mode": "personalized"})
    with pytest.raises(ConfigError):
        from_dict({**BASE, "method": "fpl", "method_params": {"prototype_epochs": "first"}})
