"""Prototype diagnostics per evaluated round: how the clients' local class prototypes relate to the method's global
class signal and to each other (the FedHPro paper's "more semantically consistent global signal", ProtoNorm's
separation claim). What each column measures and what it cannot: docs/diagnostics.md.

Inputs:

- global class signal: one d-vector per class plus a presence mask, from the method's
  `ServerBase.global_class_signal()` hook, read after the round's server step (what clients receive next
  round). None (non-prototype methods, or no signal yet) gives NaN in the columns that need it. Per method:
  FedProto and ProtoNorm their global prototypes (ProtoNorm: the aligned unit prototypes), FedTGP the trainable
  global prototypes, FedSA the semantic anchors, FPL per class the mean of its cluster prototypes, GFPL per class
  the mean of its fused global GMM (sum_k pi_k mu_k), FedHPro per class the mean of its L hyper-prototypes;
- local prototype P[k, c] of client k for class c: the mean feature (`model.features`, eval mode, no
  augmentation, fp32) over the first `SAMPLES_PER_CLASS` training samples of class c of client k (in the
  client's index order: no random draw), computed with the global model (`eval_mode: global`, the model every
  client receives next round) or client k's own model as stored after its last local training
  (`eval_mode: personalized`; its initial model if never sampled). The cap keeps the cost within a few percent
  of a round (docs/diagnostics.md has the measurement); every method gets the same samples.

Columns (`DIAGNOSTIC_COLUMNS`, written by `fedhpro.train.result_row`):

- `proto_sep_mean_deg`, `proto_sep_min_deg`: mean and minimum angle (degrees) over pairs of present classes of
  the raw global signal (NaN with fewer than two);
- `proto_consistency`: raw cosine between P[k, c] and the signal of class c, mean over a client's classes, then
  over clients (the original column; fooled by the non-negative offset of post-ReLU features and rewarded by
  collapse: kept for continuity);
- centred quantities: local prototypes minus their grand mean (over all present (k, c)), the signal minus its
  mean over present classes, so a shared offset (the positive orthant, a collapsed solution) carries no credit:
  - `proto_cons_centred`: mean centred cosine between P[k, c] and signal c over all present (k, c);
  - `proto_margin`: mean of (centred cosine to its own class's signal - the largest to another class's);
  - `proto_nearest`: share of the P[k, c] whose nearest signal class (centred cosine) is c (chance 1/C);
- global-signal-free (so FedAvg and every other method have them too):
  - `proto_agree`: mean centred cosine between same-class prototypes of different clients minus that between
    different-class prototypes of different clients (0: clients' classes no more alike than any two classes);
  - `proto_agree_nearest`: share of P[k, c] whose nearest class among the other clients' per-class mean
    prototypes (leave client k out; centred cosine) is c (chance 1/C).

These passes are no-grad and in eval mode: they draw no random numbers and change no model or BN state, so
training numbers are unchanged (`RunConfig.diagnostics: false` skips them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fedhpro.lazy import lazy_module, no_grad

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

if TYPE_CHECKING:  # type hints only: the engine imports this module
    from torch import nn

    from fedhpro.engine import ClientData, Context

ClassSignal = tuple["torch.Tensor", "torch.Tensor"]  # (C x d rows, (C,) bool presence mask)

SAMPLES_PER_CLASS = 8  # training samples per client and class that form a local prototype (cost cap)
SIGNAL_COLUMNS = ("proto_sep_mean_deg", "proto_sep_min_deg", "proto_consistency", "proto_cons_centred",
                  "proto_margin", "proto_nearest")  # need the method's global class signal
AGREEMENT_COLUMNS = ("proto_agree", "proto_agree_nearest")  # need none: every method has them
DIAGNOSTIC_COLUMNS = SIGNAL_COLUMNS + AGREEMENT_COLUMNS  # the metrics columns, in table order


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


@no_grad
def first_per_class(y: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices (ascending) of the first `per_class` samples of every class in `y`: a fixed, draw-free subsample."""
    order = torch.argsort(y, stable=True)
    sorted_y = y[order]
    start = torch.searchsorted(sorted_y, sorted_y, right=False)  # first position of each sample's class
    rank = torch.arange(len(y), device=y.device) - start
    return torch.sort(order[rank < per_class]).values


@no_grad
def class_means(model: nn.Module, ctx: "Context", client: "ClientData", batch_size: int,
                per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of `model.features` (eval mode, fp32) over the client's training data (its first
    `per_class` samples of each class when given) -> ((C, d), (C,))."""
    model.eval()
    sums = counts = None
    x_all, y_all = client.x, client.y
    if per_class is not None:
        keep = first_per_class(y_all, per_class)
        x_all, y_all = x_all[keep], y_all[keep]
    for start in range(0, len(y_all), batch_size):
        f = model.features(ctx.prepare(x_all[start:start + batch_size], train=False)).float()
        if sums is None:
            sums = torch.zeros(ctx.num_classes, f.shape[1], dtype=f.dtype, device=f.device)
            counts = torch.zeros(ctx.num_classes, dtype=f.dtype, device=f.device)
        y = y_all[start:start + batch_size]
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


class LocalPrototypes:
    """Collects every client's local prototypes (`add`, once per client) and reports the diagnostic columns
    (`columns`) against an optional global class signal."""

    def __init__(self, signal: ClassSignal | None, ctx: "Context", batch_size: int,
                 per_class: int | None = SAMPLES_PER_CLASS):
        self.signal = None if signal is None else (signal[0].detach().float(), signal[1].bool())
        self.ctx, self.batch_size, self.per_class = ctx, batch_size, per_class
        self.protos: list[torch.Tensor] = []
        self.present: list[torch.Tensor] = []

    def add(self, model: nn.Module, client: "ClientData") -> None:
        local, present = class_means(model, self.ctx, client, self.batch_size, self.per_class)
        self.protos.append(local)
        self.present.append(present)

    @no_grad
    def add_all(self, model: nn.Module, clients: list["ClientData"]) -> None:
        """`add` for every client with one shared model (global mode), in one batched pass over all samples."""
        model.eval()
        c = self.ctx.num_classes
        xs, keys = [], []
        for pos, client in enumerate(clients):
            keep = first_per_class(client.y, self.per_class) if self.per_class is not None else None
            xs.append(client.x if keep is None else client.x[keep])
            keys.append(pos * c + (client.y if keep is None else client.y[keep]))
        x, key = torch.cat(xs), torch.cat(keys)
        sums = counts = None
        for start in range(0, len(key), self.batch_size):
            f = model.features(self.ctx.prepare(x[start:start + self.batch_size], train=False)).float()
            if sums is None:
                sums = torch.zeros(len(clients) * c, f.shape[1], dtype=f.dtype, device=f.device)
                counts = torch.zeros(len(clients) * c, dtype=f.dtype, device=f.device)
            k = key[start:start + self.batch_size]
            sums.index_add_(0, k, f)
            counts.index_add_(0, k, torch.ones_like(k, dtype=f.dtype))
        present = counts > 0
        sums[present] /= counts[present, None]
        self.protos.extend(sums.view(len(clients), c, -1).unbind(0))
        self.present.extend(present.view(len(clients), c).unbind(0))

    def columns(self) -> dict[str, float]:
        if not self.protos:
            return dict.fromkeys(DIAGNOSTIC_COLUMNS, float("nan"))
        return prototype_diagnostics(torch.stack(self.protos), torch.stack(self.present), self.signal)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1, eps=1e-12)


def prototype_diagnostics(protos: torch.Tensor, present: torch.Tensor, signal: ClassSignal | None
                          ) -> dict[str, float]:
    """Every `DIAGNOSTIC_COLUMNS` value from local prototypes (K, C, d) with presence (K, C) and a signal (or None:
    the signal columns are NaN). Definitions in the module docstring."""
    nan = float("nan")
    out = dict.fromkeys(DIAGNOSTIC_COLUMNS, nan)
    protos, present = protos.double(), present.bool().to(protos.device)
    k_clients, c = present.shape
    centred = protos - protos[present].mean(0)
    unit = _unit(centred)
    # Across-client agreement: pairs of (client, class) prototypes from different clients.
    flat, flat_present = unit.reshape(k_clients * c, -1), present.reshape(-1)
    owner = torch.arange(k_clients, device=protos.device).repeat_interleave(c)
    label = torch.arange(c, device=protos.device).repeat(k_clients)
    rows = torch.nonzero(flat_present).flatten()
    cos = flat[rows] @ flat[rows].T
    other = owner[rows, None] != owner[None, rows]
    same = (label[rows, None] == label[None, rows]) & other
    diff = (label[rows, None] != label[None, rows]) & other
    if bool(same.any()) and bool(diff.any()):
        out["proto_agree"] = float(cos[same].mean() - cos[diff].mean())
    hits = []
    for k in range(k_clients):  # leave-one-client-out class centroids
        others = present.clone()
        others[k] = False
        counts = others.sum(0)
        if not bool(present[k].any()) or int((counts > 0).sum()) < 2:
            continue
        cent = (centred * others[..., None]).sum(0) / counts.clamp(min=1)[:, None]
        sim = unit[k] @ _unit(cent).T
        sim[:, counts == 0] = -math.inf
        for cls in torch.nonzero(present[k] & (counts > 0)).flatten().tolist():
            hits.append(float(int(sim[cls].argmax()) == cls))
    if hits:
        out["proto_agree_nearest"] = float(np.mean(hits))
    if signal is None:
        return out
    g, g_present = signal[0].double().to(protos.device), signal[1].bool().to(protos.device)
    out["proto_sep_mean_deg"], out["proto_sep_min_deg"] = separation_angles(g, g_present)
    raw = [mean_cosine(protos[k], present[k], g, g_present) for k in range(k_clients)]
    raw = [v for v in raw if not math.isnan(v)]
    out["proto_consistency"] = float(np.mean(raw)) if raw else nan
    if int(g_present.sum()) < 2:
        return out
    g_unit = _unit(g - g[g_present].mean(0))
    sim = unit @ g_unit.T  # (K, C, C): prototype (k, c) against signal class c'
    sim[..., ~g_present] = -math.inf
    both = present & g_present[None, :]
    if not bool(both.any()):
        return out
    own = torch.diagonal(sim, dim1=1, dim2=2)[both]
    rival = sim.clone()
    idx = torch.arange(c, device=protos.device)
    rival[:, idx, idx] = -math.inf
    out["proto_cons_centred"] = float(own.mean())
    out["proto_margin"] = float((own - rival.amax(2)[both]).mean())
    out["proto_nearest"] = float((sim.argmax(2) == idx[None, :])[both].double().mean())
    return out


def weighted_accuracy(correct_counts: list[int], sizes: list[int]) -> float:
    """Total correct over total test samples (HtFLlib's personalized accuracy); NaN without samples."""
    total = sum(sizes)
    return sum(correct_counts) / total if total else float("nan")
