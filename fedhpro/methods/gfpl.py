"""GFPL (Lu, He, Li, Wang, Gong, arXiv 2602.21873, 2026): generative federated prototype learning.

No public code exists; the paper text we have lost its formulas and most numbers in extraction
(`docs/baselines.md`, section 8). What we take from it, and what we reconstructed:

From the paper [paper]:
- per-class GMM prototypes of the extractor features z (weights, means, standard deviations / diagonal
  variances; Sec. 4.2), uploaded by clients; no model weights are exchanged (personalized mode);
- server fusion of the components of each class by the Bhattacharyya distance (Eq. 7-8, closed form
  for Gaussians) with a threshold T: closer than T -> merged into one, otherwise kept (Sec. 4.2);
  T = 1 on every dataset (App. C.2);
- dual-classifier structure: the extractor is followed by a learnable projection layer whose output is
  L2-normalised (Eq. 11) and scored by a fixed simplex ETF M = sqrt(C/(C-1)) U (I - 11^T/C), U from the
  reduced QR of a random d x C matrix (Eq. 9-10), trained with the dot-regression loss (Eq. 12), next
  to a conventional learnable classifier W trained with CE; hybrid loss CE + lambda * L_DR (Eq. 13);
- pseudo-feature generation: clients sample a class-balanced set of features from the fused global
  GMMs and retrain the projection layer (and W) on them with the same hybrid loss, the feature
  extractor frozen (Eq. 14, App. C.1);
- prototype interaction and retraining only from a delayed start round t0 and then every R rounds;
- SGD with momentum 0.5 and lr 0.01 for local training and retraining (App. C.1/C.2; local training
  uses the run config's `lr`/`momentum`, so set them there for the paper's values).

Reconstructed [recon] (the paper's values were lost in extraction or never stated):
- K = 3 GMM components per class (K = min(K, n_c)), scikit-learn `GaussianMixture(covariance_type='diag',
  reg_covar=1e-4)`, `random_state` derived from (run seed, round, client, class) -> deterministic;
  a single component (K = 1 or n_c = 1) is fitted in closed form (mean, variance + reg_covar);
- the upload carries w_k = pi_k * n_c instead of pi_k plus n_c (the same information, n_c = sum_k w_k,
  no extra bytes): up = sum_c K_c (2d + 1) floats per client;
- fusion: pool every client's components of a class with weights pi_k * n_c, greedily merge the closest
  pair while D_B < T, by moment matching (`merge_rule: moment`; pooled mean and variance preserved) or
  by the paper's literal "weighted average" of means and standard deviations (`merge_rule: average`);
  fused weights are normalised per class (sum to 1);
- t0 = 10, R = 5, N = 100 pseudo-features per class, 1 retraining epoch (batch = run batch size); the
  paper's values were lost. Clients upload GMMs in rounds t0, t0+R, ...; the server fuses them and sends
  the global GMMs in the following round only, when the receiving clients retrain (after their local
  training by default, `retrain_timing: before` retrains first);
- the projection layer is Linear(d, p) + BatchNorm1d(p) (the BN of the ETF reference code
  `ETF_Classifier.BN_H`; `projection_bn: false` drops it), p = 80 (the paper's CIFAR-10/100
  "projection dim"), raised to C when smaller (the ETF needs p >= C; the paper's CIFAR-100 setting
  violates this); W reads the extractor feature z (the "conventional classifier", the backbone's own
  head) by default, `classifier_input: projection` puts it on the projected feature instead;
- L_DR follows the widely copied `dot_loss(..., 'reg_dot_loss')`: 0.5 * mean((m_y.h - |m_y||h|)^2 / |h|),
  i.e. 0.5 * mean((m_y.h - 1)^2) for the unit vectors here; lambda = 1 (a table row of App. C.2 with
  value 2 lost its name: it may be lambda);
- the ETF comes from a generator seeded by the run seed, identical on the server and every client, and
  is not part of the state_dict (never communicated);
- evaluation: argmax of W's logits (`eval_rule: linear`) or of the ETF scores h^T M (`eval_rule: etf`).

The projection layer and W live in the model's state_dict: this module's `model_wrapper` hook makes every
model the engine builds a `DualClassifierNet` (stored per client in personalized mode, FedAvg-averaged
in global mode, where GMM prototypes travel on top of the weights).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from fedhpro.engine import ClientBase, ClientData, Context, ServerBase, batches, derive_seed
from fedhpro.lazy import lazy_module, no_grad
from fedhpro.methods import Method, param

if TYPE_CHECKING:
    from torch import nn

    from fedhpro.nets import DualClassifierNet

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nets = lazy_module("fedhpro.nets")  # DualClassifierNet


@dataclass(frozen=True)
class Params:
    components: int = param(3, "GMM components K per class, K = min(K, n_c) [recon]", low=1)
    reg_covar: float = param(1e-4, "GaussianMixture reg_covar added to the diagonal variances [recon]", low=0.0,
                             low_inclusive=False)
    threshold: float = param(1.0, "Bhattacharyya fusion threshold T (paper App. C.2: 1)", low=0.0)
    merge_rule: str = param("moment", "merge of two components: moment matching or weighted average of means "
                            "and standard deviations", choices=("moment", "average"))
    start_round: int = param(10, "delayed start round t0 of prototype interaction [recon]", low=1)
    interval: int = param(5, "prototype interaction / projection retraining interval R [recon]", low=1)
    pseudo_per_class: int = param(100, "pseudo-features N sampled per class for retraining [recon]", low=1)
    retrain_epochs: int = param(1, "epochs over the pseudo-features per retraining [recon]", low=1)
    retrain_lr: float = param(0.01, "SGD learning rate of projection retraining (paper: 0.01)", low=0.0,
                              low_inclusive=False)
    retrain_momentum: float = param(0.5, "SGD momentum of projection retraining (paper App. C.1: 0.5)", low=0.0,
                                    high=1.0)
    retrain_timing: str = param("after", "retrain after or before the round's local training [recon]",
                                choices=("after", "before"))
    projection_dim: int = param(80, "projection/ETF dimension p (paper CIFAR: 80; raised to C if smaller)", low=1)
    projection_bn: bool = param(True, "BatchNorm1d after the projection Linear (ETF reference code) [recon]")
    classifier_input: str = param("feature", "input of the learnable classifier W: extractor feature z or "
                                  "projected feature [recon]", choices=("feature", "projection"))
    dr_weight: float = param(1.0, "weight lambda of the dot-regression loss in the hybrid loss [recon]", low=0.0)
    eval_rule: str = param("linear", "prediction: W's logits or ETF scores h^T M", choices=("linear", "etf"))


# ---------------------------------------------------------------------------------------------------------
# Dual-classifier model


def simplex_etf(dim: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """M = sqrt(C/(C-1)) U (I - 11^T/C), U: reduced QR of a uniform random dim x C matrix -> (dim, C)."""
    if dim < num_classes:
        raise ValueError(f"a simplex ETF needs dim >= num_classes, got {dim} < {num_classes}")
    u, _ = torch.linalg.qr(torch.rand(dim, num_classes, generator=gen, dtype=torch.float64), mode="reduced")
    c = num_classes
    centre = torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64)
    return (math.sqrt(c / (c - 1)) * u @ centre).float()


def model_wrapper(ctx: Context) -> Callable[[nn.Module], nn.Module]:
    """The model hook (`Context.install_model_wrapper`): every model of the run becomes a `DualClassifierNet`
    around it, with one ETF (from the run seed) shared by all of them."""
    p = ctx.params
    dim = max(p.projection_dim, ctx.num_classes)
    etf = simplex_etf(dim, ctx.num_classes, torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, 0xE7F)))
    return lambda base: nets.DualClassifierNet(base, dim, ctx.num_classes, p.projection_bn, p.classifier_input, etf)


def dot_regression_loss(h: torch.Tensor, labels: torch.Tensor, etf: torch.Tensor) -> torch.Tensor:
    """Eq. 12 as the reference `reg_dot_loss`: 0.5 * mean((m_y.h - |m_y| |h|)^2 / |h|), |h| detached."""
    target = etf[:, labels].T
    dot = (h * target).sum(1)
    h_len = h.detach().norm(dim=1).clamp_min(1e-8)
    m_len = target.norm(dim=1)
    return 0.5 * (((dot - m_len * h_len) ** 2) / h_len).mean()


def hybrid_loss(h: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, etf: torch.Tensor,
                dr_weight: float) -> torch.Tensor:
    """Eq. 13: CE(W., y) + lambda * L_DR(h, y)."""
    loss = F.cross_entropy(logits, labels)
    if dr_weight:
        loss = loss + dr_weight * dot_regression_loss(h, labels, etf)
    return loss


# ---------------------------------------------------------------------------------------------------------
# GMM prototypes: fitting, Bhattacharyya fusion, sampling


def fit_class_gmm(x: np.ndarray, components: int, reg_covar: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diagonal GMM of one class's features (n, d) -> (weights (K,), means (K, d), variances (K, d))."""
    k = min(components, len(x))
    if k == 1:
        return np.ones(1), x.mean(0, keepdims=True), x.var(0, keepdims=True) + reg_covar
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=k, covariance_type="diag", reg_covar=reg_covar,
                          random_state=seed % 2**32)
    with warnings.catch_warnings():  # few distinct points / slow convergence on tiny classes
        warnings.simplefilter("ignore")
        gmm.fit(x)
    return gmm.weights_, gmm.means_, gmm.covariances_


@no_grad
def extractor_features(model: nn.Module, ctx: Context, client: ClientData, batch_size: int = 256) -> torch.Tensor:
    """Eval-mode extractor features z of every local training sample (no augmentation)."""
    model.eval()
    return torch.cat([model.features(ctx.prepare(client.x[s:s + batch_size], train=False))
                      for s in range(0, client.num_samples, batch_size)])


def client_gmm_prototypes(features: torch.Tensor, labels: torch.Tensor, components: int, reg_covar: float,
                          seed_parts: tuple[int, ...]) -> dict:
    """Upload entries: per local class c, K_c = min(K, n_c) components with weights pi_k * n_c."""
    x = features.double().cpu().numpy()
    y = labels.cpu().numpy()
    classes, weights, means, variances = [], [], [], []
    for c in np.unique(y).tolist():
        xc = x[y == c]
        w, mu, var = fit_class_gmm(xc, components, reg_covar, derive_seed(*seed_parts, c))
        classes += [c] * len(w)
        weights.append(w * len(xc))
        means.append(mu)
        variances.append(var)
    dev = features.device
    return {"component_classes": torch.tensor(classes, dtype=torch.long, device=dev),
            "component_weights": torch.from_numpy(np.concatenate(weights)).float().to(dev),
            "component_means": torch.from_numpy(np.concatenate(means)).float().to(dev),
            "component_variances": torch.from_numpy(np.concatenate(variances)).float().to(dev)}


def bhattacharyya_diag(mu1: torch.Tensor, var1: torch.Tensor, mu2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """Closed-form Bhattacharyya distance of diagonal Gaussians (broadcasts over leading dims):
    1/8 sum (mu1-mu2)^2/s2 + 1/2 sum ln(s2 / sqrt(var1 var2)), s2 = (var1 + var2)/2."""
    s2 = (var1 + var2) / 2
    return ((mu1 - mu2) ** 2 / s2).sum(-1) / 8 + 0.5 * (s2.log() - 0.5 * (var1.log() + var2.log())).sum(-1)


def merge_pair(w1, mu1, var1, w2, mu2, var2, rule: str = "moment"):
    """One component from two: moment matching (pooled mean and variance) or weighted average of the
    means and standard deviations."""
    w = w1 + w2
    mu = (w1 * mu1 + w2 * mu2) / w
    if rule == "moment":
        var = (w1 * (var1 + (mu1 - mu) ** 2) + w2 * (var2 + (mu2 - mu) ** 2)) / w
    else:
        var = ((w1 * var1.sqrt() + w2 * var2.sqrt()) / w) ** 2
    return w, mu, var


def fuse_components(weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, threshold: float,
                    rule: str = "moment") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedily merge the closest pair (Bhattacharyya) while its distance is below `threshold`.

    Returns the surviving components with weights normalised to sum to 1 (computed in float64).
    """
    w, mu, var = weights.double().clone(), means.double().clone(), variances.double().clone()
    m = len(w)
    alive = torch.ones(m, dtype=torch.bool)
    dist = bhattacharyya_diag(mu[:, None], var[:, None], mu[None], var[None]).cpu()
    dist.fill_diagonal_(math.inf)
    while alive.sum() > 1:
        flat = int(torch.argmin(dist))
        i, j = divmod(flat, m)
        if not dist[i, j] < threshold:
            break
        i, j = min(i, j), max(i, j)
        w[i], mu[i], var[i] = merge_pair(w[i], mu[i], var[i], w[j], mu[j], var[j], rule)
        alive[j] = False
        row = bhattacharyya_diag(mu[i], var[i], mu, var).cpu()
        row[~alive] = math.inf
        row[i] = math.inf
        dist[i], dist[:, i] = row, row
        dist[j], dist[:, j] = math.inf, math.inf
    keep = torch.nonzero(alive).flatten().to(w.device)
    return (w[keep] / w[keep].sum()).float(), mu[keep].float(), var[keep].float()


def fuse_uploads(uploads: list[dict], threshold: float, rule: str) -> dict | None:
    """Per class, pool every client's components (weights pi_k * n_c) and fuse them -> global GMM tensors."""
    ups = [u for u in uploads if "component_classes" in u]
    if not ups:
        return None
    classes = torch.cat([u["component_classes"] for u in ups])
    weights = torch.cat([u["component_weights"] for u in ups])
    means = torch.cat([u["component_means"] for u in ups])
    variances = torch.cat([u["component_variances"] for u in ups])
    out = {"gmm_classes": [], "gmm_weights": [], "gmm_means": [], "gmm_variances": []}
    for c in torch.unique(classes).tolist():
        rows = classes == c
        w, mu, var = fuse_components(weights[rows], means[rows], variances[rows], threshold, rule)
        out["gmm_classes"].append(torch.full((len(w),), c, dtype=torch.long, device=classes.device))
        out["gmm_weights"].append(w.to(weights.device))
        out["gmm_means"].append(mu.to(weights.device))
        out["gmm_variances"].append(var.to(weights.device))
    return {k: torch.cat(v) for k, v in out.items()}


def sample_pseudo_features(gmm: dict, per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced sample: `per_class` features of every class with a global GMM (component by weight,
    then mu + sigma * eps), drawn on the CPU with `gen`, returned on the GMM's device."""
    classes = gmm["gmm_classes"].cpu()
    weights, means, variances = (gmm[k].cpu() for k in ("gmm_weights", "gmm_means", "gmm_variances"))
    uniq, counts = torch.unique_consecutive(classes, return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts
    table = torch.zeros(len(uniq), int(counts.max()))
    slot = torch.arange(len(classes)) - offsets.repeat_interleave(counts)
    table[torch.arange(len(uniq)).repeat_interleave(counts), slot] = weights
    picks = torch.multinomial(table, per_class, replacement=True, generator=gen)  # (k, N)
    rows = (offsets[:, None] + picks).flatten()
    eps = torch.randn(len(rows), means.shape[1], generator=gen)
    z = means[rows] + eps * variances[rows].sqrt()
    dev = gmm["gmm_means"].device
    return z.to(dev), uniq.repeat_interleave(per_class).to(dev)


def retrain_heads(model: DualClassifierNet, z: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
                  lr: float, momentum: float, dr_weight: float, gen: torch.Generator) -> None:
    """Eq. 14: the hybrid loss on shuffled pseudo-features, updating only the projection layer and W."""
    model.train()
    optimizer = torch.optim.SGD(model.head_parameters(), lr=lr, momentum=momentum)
    n = len(y)
    for _ in range(epochs):
        for idx in batches(n, batch_size, gen, z.device):  # a batch of one dropped: BatchNorm1d cannot train on it
            h, logits = model.heads(z[idx])
            loss = hybrid_loss(h, logits, y[idx], model.etf, dr_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def interaction_round(round_idx: int, start: int, interval: int) -> bool:
    """Clients upload GMM prototypes in rounds t0, t0 + R, t0 + 2R, ..."""
    return round_idx >= start and (round_idx - start) % interval == 0


GMM_KEYS = ("gmm_classes", "gmm_weights", "gmm_means", "gmm_variances")


def gmm_class_means(gmm: dict, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class the mixture mean sum_k pi_k mu_k of the global GMMs (weights sum to 1 per class)
    -> ((C, d) table, (C,) presence mask)."""
    means = gmm["gmm_means"]
    table = torch.zeros(num_classes, means.shape[1], dtype=means.dtype, device=means.device)
    table.index_add_(0, gmm["gmm_classes"], means * gmm["gmm_weights"][:, None].to(means.dtype))
    present = torch.zeros(num_classes, dtype=torch.bool, device=means.device)
    present[gmm["gmm_classes"]] = True
    return table, present


class Client(ClientBase):
    UPLOAD_METADATA = ("component_classes",)

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        self.gen = gen
        self.collect = bool(payload["collect_prototypes"])
        self.global_gmm = {k: payload[k] for k in GMM_KEYS} if "gmm_classes" in payload else None
        if self.global_gmm is not None and self.params.retrain_timing == "before":
            self._retrain(model)

    def _retrain(self, model) -> None:
        p = self.params
        z, y = sample_pseudo_features(self.global_gmm, p.pseudo_per_class, self.gen)
        retrain_heads(model, z, y, p.retrain_epochs, self.cfg.batch_size, p.retrain_lr, p.retrain_momentum,
                      p.dr_weight, self.gen)

    def loss(self, model, x, y) -> torch.Tensor:
        h, logits = model.heads(model.features(x))
        return hybrid_loss(h, logits, y, model.etf, self.params.dr_weight)

    def upload(self, client, model, state, round_idx) -> dict:
        p = self.params
        if self.global_gmm is not None and p.retrain_timing == "after":
            self._retrain(model)
        if not self.collect:
            return {}
        features = extractor_features(model, self.ctx, client)
        return client_gmm_prototypes(features, client.y, p.components, p.reg_covar,
                                     (self.cfg.seed, round_idx, client.cid))  # the round: part of the fits' seeds


class Server(ServerBase):
    STATE = ("gmm", "fused_round")
    BROADCAST_METADATA = ("gmm_classes",)

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.gmm: dict | None = None
        self.fused_round = -1

    def broadcast(self, round_idx: int) -> dict:
        p = self.params
        payload = {**super().broadcast(round_idx),
                   "collect_prototypes": interaction_round(round_idx, p.start_round, p.interval)}
        if self.gmm is not None and self.fused_round == round_idx - 1:
            payload.update(self.gmm)
        return payload

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        super().aggregate(round_idx, uploads)
        fused = fuse_uploads(uploads, self.params.threshold, self.params.merge_rule)
        if fused is not None:
            self.gmm, self.fused_round = fused, round_idx

    def global_class_signal(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Diagnostics: per class the mean of its latest fused global GMM, sum_k pi_k mu_k, in the extractor
        feature space z; None before the first fusion (round `start_round`)."""
        if self.gmm is None:
            return None
        return gmm_class_means(self.gmm, self.ctx.num_classes)

    def scores(self, model, x) -> torch.Tensor:
        h, logits = model.heads(model.features(x))
        return logits if self.params.eval_rule == "linear" else h @ model.etf


METHOD = Method(
    name="gfpl",
    calls_model=False,  # its loss runs model.features and model.heads (the dual classifier), not model(x)
    paper="Lu, He, Li, Wang, Gong, GFPL: Generative Federated Prototype Learning for Resource-Constrained and "
          "Data-Imbalanced Vision Task, arXiv 2602.21873, 2026",
    display="GFPL (reconstructed)",
    order=10,
    style={"color": "#000000", "marker": "X", "linestyle": ":"},
    modes=("personalized", "global"),
    communicates="per-class GMM prototypes (up, rounds t0 + kR) and fused global GMMs (down, the round after); "
                 "+ weights in global mode",
    Params=Params,
    Client=Client,
    Server=Server,
    heterogeneous_models=True,
    # Short digits runs (tests): GMM upload from round 1 and every round, so two rounds exercise the re-training.
    fast_test_params={"start_round": 1, "interval": 1, "pseudo_per_class": 20},
    model_wrapper=model_wrapper,
    notes=(((), "GFPL is reconstructed from the paper (no public code)."),),
)
