"""The one batching rule (`fedhpro.local.keeps_batch`): an epoch over n samples trains every mini-batch but a
trailing batch of a single sample (BatchNorm cannot train on one), unless the client has only that sample; and
every place that batches or counts batches agrees with it."""

import pytest
import torch
from torch import nn

from fedhpro.batched import steps_per_round
from fedhpro.bench import trained_samples
from fedhpro.bench.rounds import bare_loop
from fedhpro.local import batch_sizes, batches, keeps_batch
from fedhpro.methods.gfpl import retrain_heads

B = 4
# n -> the batch sizes of one epoch at batch size B
EXPECTED = {1: [1], B: [B], B + 1: [B], 2 * B + 1: [B, B], 2 * B + 2: [B, B, 2], 3: [3], 0: []}


def drawn_sizes(n: int, batch_size: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [idx.numel() for idx in batches(n, batch_size, gen, torch.device("cpu"))]


@pytest.mark.parametrize("n", sorted(EXPECTED))
def test_the_rule_at_the_edges(n):
    assert batch_sizes(n, B) == EXPECTED[n]
    assert drawn_sizes(n, B) == EXPECTED[n]


def test_batches_are_disjoint_samples_of_one_permutation():
    gen = torch.Generator().manual_seed(3)
    idx = torch.cat(list(batches(2 * B + 1, B, gen, torch.device("cpu"))))
    perm = torch.randperm(2 * B + 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx, perm[:2 * B])  # the dropped sample is the permutation's last


def test_keeps_batch():
    assert keeps_batch(1, 1) and keeps_batch(2, 5) and not keeps_batch(1, 5)


@pytest.mark.parametrize("n", [1, 2, 7, B, B + 1, 2 * B + 1, 2 * B + 2, 33])
@pytest.mark.parametrize("batch_size", [2, 3, B, 64])
def test_every_user_agrees(n, batch_size):
    sizes = drawn_sizes(n, batch_size)
    assert batch_sizes(n, batch_size) == sizes
    epochs = 3
    # the batched engine's step count, the benchmark's sample count
    assert steps_per_round(n, batch_size, epochs) == epochs * len(sizes)
    assert trained_samples(n, batch_size, epochs) == epochs * sum(sizes)
    # the benchmark's bare PyTorch loop
    model = nn.Linear(2, 2)
    data = [(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))]
    samples = bare_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                        lambda m, x, y: nn.functional.cross_entropy(m(x), y), epochs=epochs,
                        batch_size=batch_size, augment="none", augment_per_sample=False,
                        gen=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert samples == epochs * sum(sizes)
    # GFPL's head retraining on pseudo-features
    heads = RecordingHeads()
    retrain_heads(heads, torch.randn(n, 2), torch.zeros(n, dtype=torch.long), epochs, batch_size,
                  0.01, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert heads.seen == sizes * epochs


class RecordingHeads(nn.Module):
    """The part of `DualClassifierNet` that `retrain_heads` uses, recording each batch's size."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.etf = torch.eye(2)
        self.seen: list[int] = []

    def head_parameters(self):
        return self.linear.parameters()

    def heads(self, z):
        self.seen.append(len(z))
        h = self.linear(z)
        return h, h @ self.etf
