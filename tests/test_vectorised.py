"""Vectorised/fast paths equal the straightforward versions they replace, on tiny inputs.

- FedHPro/CReFF classifier re-training (`FederatedFeatures.retrain_classifier`): closed-form CE steps
  against the nn.Linear + autograd + torch.optim.SGD loop, bit for bit, and a whole FedHPro round
  with either one;
- prototype and statistics gathering (`index_add_`) against per-sample Python loops.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhpro.config import from_dict
from fedhpro.data import load_dataset
from fedhpro.engine import Engine
from fedhpro.methods import METHODS
from fedhpro.methods.creff import FederatedFeatures
from fedhpro.methods.fedhpro import class_feature_means
from fedhpro.methods.prototypes import PrototypeAccumulator, mean_over_clients
from fedhpro.train import build_context


def reference_retrain(self, epochs, batch_size, lr, gen):
    """The straightforward `meta_revised` loop (the code before the closed-form version)."""
    dim = self.features.shape[1]
    head = nn.Linear(dim, self.num_classes).to(self.features.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr)
    n = len(self.labels)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(self.features.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(head(self.features[idx]), self.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head


@pytest.mark.parametrize("classes,per_class,dim,batch,epochs,lr,threads", [
    (10, 50, 16, 50, 5, 0.01, 1),   # FedHPro's shape (batch divides n)
    (3, 7, 5, 4, 6, 0.5, 1),        # partial last batch, large steps
    (4, 5, 9, 20, 3, 0.1, 1),       # one batch per epoch
    (5, 9, 12, 8, 4, 0.05, 2),      # two threads
])
def test_retrain_classifier_is_bit_identical_to_the_autograd_loop(classes, per_class, dim, batch, epochs, lr,
                                                                  threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in range(3):
            torch.manual_seed(seed)
            features = FederatedFeatures(classes, per_class, dim, 0.1, torch.device("cpu"))
            features.features = features.features * 3  # well away from a uniform softmax
            torch.manual_seed(100 + seed)
            fast = features.retrain_classifier(epochs, batch, lr, torch.Generator().manual_seed(seed))
            after_fast = torch.get_rng_state()
            torch.manual_seed(100 + seed)
            ref = reference_retrain(features, epochs, batch, lr, torch.Generator().manual_seed(seed))
            assert torch.equal(torch.get_rng_state(), after_fast)  # same global RNG use (the Linear init)
            assert torch.equal(fast.weight, ref.weight) and torch.equal(fast.bias, ref.bias)
            assert not torch.equal(ref.weight, nn.Linear(dim, classes).weight)
    finally:
        torch.set_num_threads(previous)


def test_fedhpro_rounds_identical_with_the_reference_retraining(monkeypatch):
    data = load_dataset("digits")
    cfg = from_dict({"dataset": "digits", "method": "fedhpro", "num_clients": 4, "device": "cpu", "batch_size": 64,
                     "local_epochs": 1, "seed": 2, "method_params": {"retrain_epochs": 5, "feature_matching_steps": 5,
                                                                      "matching_steps": 3, "real_batch": 8}})

    def run():
        ctx = build_context(cfg, data=data)
        torch.manual_seed(cfg.seed)
        engine = Engine(ctx, METHODS["fedhpro"])
        results = [engine.run_round(r) for r in (1, 2)]
        return results, engine.server.state_dict()

    fast_results, fast_state = run()
    monkeypatch.setattr(FederatedFeatures, "retrain_classifier", reference_retrain)
    ref_results, ref_state = run()
    for a, b in zip(fast_results, ref_results):
        assert (a.train_loss, a.test_acc, a.test_loss) == (b.train_loss, b.test_acc, b.test_loss)
    for key in ("prototypes", "federated.features", "meta_weight", "meta_bias"):
        assert torch.equal(fast_state[key], ref_state[key]), key
    for key, value in fast_state["model"].items():
        assert torch.equal(value, ref_state["model"][key]), key


# ---- prototype / statistics gathering: index_add_ against per-sample loops -----------------------------
def test_prototype_accumulator_equals_per_sample_loop():
    gen = torch.Generator().manual_seed(0)
    acc = PrototypeAccumulator(6)
    sums, counts = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for _ in range(3):
        f = torch.randn(11, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (11,), generator=gen)  # class 5 never appears
        acc.add(f, y)
        for i in range(len(y)):
            sums[y[i]] += f[i]
            counts[y[i]] += 1
    classes, means = acc.means()
    present = torch.nonzero(counts > 0).flatten()
    assert torch.equal(classes, present)
    torch.testing.assert_close(means, sums[present] / counts[present, None], rtol=1e-12, atol=1e-12)


def test_class_feature_means_equals_per_sample_loop():
    data = load_dataset("digits")
    cfg = from_dict({"dataset": "digits", "method": "fedhpro", "num_clients": 3, "device": "cpu"})
    ctx = build_context(cfg, data=data)
    torch.manual_seed(0)
    model = ctx.make_model().eval()
    client = ctx.clients[0]
    means, counts = class_feature_means(model, ctx, client.x, client.y, batch_size=37)
    with torch.no_grad():
        feats = model.features(ctx.prepare(client.x, train=False))
    for c in range(ctx.num_classes):
        rows = [feats[i] for i in range(len(client.y)) if int(client.y[i]) == c]
        assert counts[c] == len(rows)
        if rows:
            torch.testing.assert_close(means[c], torch.stack(rows).mean(0), rtol=1e-5, atol=1e-6)


def test_mean_over_clients_equals_loop_over_clients_and_rows():
    gen = torch.Generator().manual_seed(1)
    uploads = []
    for k in range(4):
        classes = torch.randperm(7, generator=gen)[:3 + k % 2]
        uploads.append({"classes": classes, "v": torch.randn(len(classes), 2, 3, generator=gen, dtype=torch.float64)})
    total, present = mean_over_clients(uploads, "v", 7)
    for c in range(7):
        rows = [u["v"][i] for u in uploads for i in range(len(u["classes"])) if int(u["classes"][i]) == c]
        assert bool(present[c]) == bool(rows)
        if rows:
            torch.testing.assert_close(total[c], torch.stack(rows).mean(0), rtol=1e-12, atol=1e-12)
