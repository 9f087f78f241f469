"""Prototype diagnostics per evaluated round: separation of the global class signal and consistency of the
clients' local class prototypes with it (the FedHPro paper's "more semantically consistent global signal",
ProtoNorm's separation claim).

Definitions (the Parquet columns written by `fedhpro.train.result_row`):

- global class signal: one d-vector per class plus a presence mask, from the method's
  `ServerBase.global_class_signal()` hook, read after the round's server step (what clients receive next
  round). None (non-prototype methods, or no signal yet) gives NaN columns. Per method: FedProto and
  ProtoNorm their global prototypes (ProtoNorm: the aligned unit prototypes), FedTGP the trainable global
  prototypes, FedSA the semantic anchors (the target of its regulariser; its mean prototypes only serve
  evaluation), FPL per class the mean of its cluster prototypes (its "unbiased prototype"), GFPL per class the
  mean of its fused global GMM (sum_k pi_k mu_k), FedHPro per class the mean of its L hyper-prototypes;
- `proto_sep_mean_deg`, `proto_sep_min_deg`: mean and minimum angle, in degrees, over all pairs of present
  classes of the global signal (NaN with fewer than two present classes);
- local prototype of client k for class c: the mean feature (`model.features`, eval mode, no augmentation,
  fp32) over client k's training samples of class c, computed with
  - `eval_mode: global`: the global model (`Server.eval_model()`, the model every client receives next
    round), so it shows where the shared model puts each client's classes;
  - `eval_mode: personalized`: client k's own model as stored after its last local training (its initial
    model if it was never sampled);
- `proto_consistency`: per client, the mean cosine between its local prototype and the global signal over
  its classes (those with training samples) that have a global signal; then the mean over clients (each
  client counts once; clients without such a class are left out).

These passes are no-grad and in eval mode: they draw no random numbers and change no model or BN state,
so training numbers are unchanged (`RunConfig.diagnostics: false` skips them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # type hints only: the engine imports this module
    from fedhpro.engine import ClientData, Context

ClassSignal = tuple[torch.Tensor, torch.Tensor]  # (C x d rows, (C,) bool presence mask)


def separation_angles(signal: torch.Tensor, present: torch.Tensor) -> tuple[float, float]:
    """(mean, min) pairwise angle in degrees between the present rows of `signal` (NaN, NaN with < 2 rows)."""
    rows = signal[present.to(signal.device)].detach().double()
    if rows.shape[0] < 2:
        return float("nan"), float("nan")
    unit = F.normalize(rows, dim=1)
    cos = (unit @ unit.T).clamp(-1.0, 1.0)
    iu = torch.triu_indices(len(rows), len(rows), 1, device=rows.device)
    angles = torch.rad2deg(torch.arccos(cos[iu[0], iu[1]]))
    return float(angles.mean()), float(angles.min())


def mean_cosine(local: torch.Tensor, local_present: torch.Tensor, signal: torch.Tensor,
                present: torch.Tensor) -> float:
    """Mean cosine between `local` and `signal` rows over the classes present in both (NaN if none)."""
    both = local_present.to(signal.device) & present.to(signal.device)
    if not bool(both.any()):
        return float("nan")
    cos = F.cosine_similarity(local[both].detach().double(), signal[both].detach().double(), dim=1, eps=1e-12)
    return float(cos.mean())


@torch.no_grad()
def class_means(model: nn.Module, ctx: "Context", client: "ClientData", batch_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of `model.features` (eval mode, fp32) over the client's training data -> ((C, d), (C,))."""
    model.eval()
    sums = counts = None
    for start in range(0, client.num_samples, batch_size):
        f = model.features(ctx.prepare(client.x[start:start + batch_size], train=False)).float()
        if sums is None:
            sums = torch.zeros(ctx.num_classes, f.shape[1], dtype=f.dtype, device=f.device)
            counts = torch.zeros(ctx.num_classes, dtype=f.dtype, device=f.device)
        y = client.y[start:start + batch_size]
        sums.index_add_(0, y, f)
        counts.index_add_(0, y, torch.ones_like(y, dtype=f.dtype))
    assert sums is not None and counts is not None, f"client {client.cid} has no training data"
    present = counts > 0
    sums[present] /= counts[present, None]
    return sums, present


class ConsistencyMeter:
    """Collects one consistency value per client (`add`) and reports their mean (`value`)."""

    def __init__(self, signal: ClassSignal, ctx: "Context", batch_size: int):
        self.signal, self.present = signal[0].detach().float(), signal[1].bool()
        self.ctx, self.batch_size = ctx, batch_size
        self.values: list[float] = []

    def add(self, model: nn.Module, client: "ClientData") -> None:
        local, local_present = class_means(model, self.ctx, client, self.batch_size)
        value = mean_cosine(local, local_present, self.signal, self.present)
        if not math.isnan(value):
            self.values.append(value)

    def value(self) -> float:
        return float(sum(self.values) / len(self.values)) if self.values else float("nan")


def weighted_accuracy(correct_counts: list[int], sizes: list[int]) -> float:
    """Total correct over total test samples (HtFLlib's personalized accuracy); NaN without samples."""
    total = sum(sizes)
    return sum(correct_counts) / total if total else float("nan")
