"""FedProto: regulariser and server step by hand; both modes and heterogeneous models on digits; bytes."""

import pytest
import torch

from conftest import METHOD_BASE
from fedhpro.config import from_dict
from fedhpro.methods.fedproto import prototype_regulariser
from fedhpro.methods.prototypes import PrototypeAccumulator, mean_over_clients, nearest_prototype_scores
from fedhpro.train import build_context, train

BASE = {**METHOD_BASE, "method": "fedproto"}


def test_regulariser_mse_targets_own_feature_when_prototype_missing():
    f = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    targets = torch.tensor([[0.0, 0.0], [9.0, 9.0]])
    present = torch.tensor([True, False])
    y = torch.tensor([0, 1])
    # row 0 vs (0,0): 1 + 4; row 1 targets itself: 0; MSE divides by B*d = 4
    assert prototype_regulariser(f, y, targets, present, "mse").item() == pytest.approx(5 / 4)
    assert prototype_regulariser(f, y, targets, present, "euclidean").item() == pytest.approx(5 ** 0.5 / 2)


def test_accumulator_server_mean_and_nearest_prototype():
    acc = PrototypeAccumulator(3)
    acc.add(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]))
    acc.add(torch.tensor([[0.0, 4.0]]), torch.tensor([2]))
    classes, means = acc.means()
    assert classes.tolist() == [0, 2] and torch.allclose(means, torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    uploads = [{"prototype_classes": classes, "prototypes": means},
               {"prototype_classes": torch.tensor([0]), "prototypes": torch.tensor([[4.0, 2.0]])}]
    protos, present = mean_over_clients(uploads, "prototypes", 3, "prototype_classes")
    assert present.tolist() == [True, False, True]
    assert torch.allclose(protos[0], torch.tensor([3.0, 1.0]))  # unweighted over clients
    weighted, _ = mean_over_clients(uploads, "prototypes", 3, "prototype_classes",
                                    weights=[torch.tensor([2.0, 1.0]), torch.tensor([6.0])])
    assert torch.allclose(weighted[0], torch.tensor([3.5, 1.5]))
    scores = nearest_prototype_scores(torch.tensor([[0.1, 3.0]]), protos, present)
    assert scores.argmax(1).item() == 2  # class 1 has no prototype and never wins


@pytest.mark.parametrize("mode, models", [("personalized", []), ("global", []), ("personalized", ["cnn", "resnet10"])])
def test_learns_with_exact_bytes(tmp_path, mode, models):
    cfg = from_dict({**BASE, "eval_mode": mode, "client_models": models})
    df = train(cfg, tmp_path / "a")
    acc = df["client_acc_mean"] if mode == "personalized" else df["test_acc"]
    assert acc.iloc[-1] > acc.iloc[0]
    ctx = build_context(cfg)
    d = ctx.feature_dim
    local_classes = sum(int((c.class_counts > 0).sum()) for c in ctx.clients)
    weights = sum(v.numel() * v.element_size() for v in ctx.make_model().state_dict().values())
    per_round_weights = len(ctx.clients) * weights if mode == "global" else 0
    assert (df["bytes_up"] == local_classes * d * 4 + per_round_weights).all()
    assert df["bytes_down"].iloc[0] == per_round_weights  # no global prototypes before the first upload
    assert (df["bytes_down"].iloc[1:] > per_round_weights).all()


