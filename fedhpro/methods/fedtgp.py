"""FedTGP (Zhang, Liu, Hua, Cao, AAAI 2024): trainable global prototypes with adaptive-margin contrastive learning.

Follows the official code (TsingZ0/FedTGP `servertgp.py`/`clienttgp.py`, identical in HtFLlib):

- client: FedProto's loss, CE + lambda * MSE(feature, G^y) (mean over B*d, lambda 10; no target in
  round 1, when the server has not trained its prototypes yet); the local prototypes are recomputed
  after local training, model in eval mode, one pass over the training data (`prototype_timing`);
- server: the adaptive margin delta = min(max_c gap_c, tau) with gap_c = min_{c'!=c} ||Q^c - Q^{c'}||_2
  over this round's unweighted class means Q (classes absent this round get the smallest gap, as in
  the code; with fewer than two classes delta = tau); then a persistent generator
  `nn.Embedding(C, d) -> Linear(d, d) -> ReLU -> Linear(d, d)` is trained `server_epochs` epochs on the
  uploaded (prototype, class) pairs, shuffled, batch = the client batch size (last partial batch kept),
  with a fresh plain SGD at the client learning rate every round, on CE(-(dist + delta * onehot(y)), y);
  all C outputs G^c = TGP(c) (eval mode, detached) are broadcast every round;
- evaluation: nearest G by MSE (personalized mode); global mode uses the averaged model's logits unless
  `eval_rule: prototype`.

Deliberate differences: the distance is sqrt(clamp_min(||p||^2 - 2 p.G + ||G||^2, 0) + eps) instead of
the code's bare sqrt, which gives NaN values or infinite gradients at (numerically) zero distance; the
gaps use exact pairwise norms (no 1e9 sentinel: with < 2 classes delta is tau directly, the code's
outcome); the generator is initialised from the run seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import Context, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, fedproto, param
from fedhpro.methods.prototypes import mean_over_clients, nearest_prototype_scores


torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nets = lazy_module("fedhpro.nets")  # TrainablePrototypes, the TGP generator


DIST_EPS = 1e-8  # added under the square root of the expanded squared distance


@dataclass(frozen=True)
class Params:
    lamda: float = param(10.0, "weight of the MSE regulariser to the global prototypes (-lam 10)", low=0.0)
    server_epochs: int = param(100, "generator training epochs per round (-se; HtFLlib/run_me.sh 100)", low=0)
    margin_threshold: float = param(100.0, "cap tau of the adaptive margin (-mart 100)", low=0.0)
    prototype_timing: str = param("after", "local prototypes from an eval pass after training (code) or from the "
                                  "training batches", choices=("after", "during"))
    eval_rule: str = param("auto", "evaluation: nearest prototype, logits, or auto (prototype when "
                           "personalized, logits when global)", choices=("auto", "prototype", "logits"))


def euclidean_distances(points: torch.Tensor, centres: torch.Tensor, eps: float = DIST_EPS) -> torch.Tensor:
    """(B, C) L2 distances from the expanded square (as the code), clamped at 0 plus eps: finite gradients."""
    sq = points.pow(2).sum(1, keepdim=True) - 2 * points @ centres.T + centres.pow(2).sum(1)[None, :]
    return torch.sqrt(sq.clamp_min(0) + eps)


def margin_contrastive_loss(points: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                            margin: float | torch.Tensor) -> torch.Tensor:
    """CE(-(dist + margin * onehot(y)), y): the FedTGP server loss and FedSA's RMCL term (no temperature)."""
    dist = euclidean_distances(points, centres)
    onehot = F.one_hot(labels, centres.shape[0]).to(dist.dtype)
    return F.cross_entropy(-(dist + margin * onehot), labels)


def nearest_gaps(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the L2 distance to its nearest other row (exact pairwise norms); needs >= 2 rows."""
    dist = (rows[:, None, :] - rows[None, :, :]).norm(dim=2)
    dist.fill_diagonal_(float("inf"))
    return dist.min(dim=1).values


def adaptive_margin(means: torch.Tensor, present: torch.Tensor, threshold: float) -> tuple[float, torch.Tensor]:
    """Code formula: delta = min(max_c gap_c, tau); absent classes get the smallest gap -> (delta, gaps (C,))."""
    num_classes = means.shape[0]
    if int(present.sum()) < 2:
        return float(threshold), torch.full((num_classes,), float("inf"), device=means.device)
    present_gaps = nearest_gaps(means[present])
    gaps = torch.full((num_classes,), present_gaps.min().item(), device=means.device, dtype=means.dtype)
    gaps[present] = present_gaps
    return min(gaps.max().item(), float(threshold)), gaps


class Client(fedproto.PrototypeClient):
    """FedProto's client (CE + lambda MSE) with the trainable global prototypes as targets."""


class Server(ServerBase):
    STATE = ("generator", "prototypes", "trained")  # not the margin and loss: diagnostics of the last round
    BROADCAST_METADATA = ("prototype_classes",)

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        c, d = ctx.num_classes, ctx.feature_dim
        self.generator = nets.TrainablePrototypes(c, d).to(ctx.device)
        self.prototypes = torch.zeros(c, d, device=ctx.device)
        self.trained = torch.tensor(False)  # no global prototypes before the first server update (code)
        self.margin = float("nan")  # this round's delta (diagnostics)
        self.server_loss = float("nan")

    def broadcast(self, round_idx: int) -> dict:
        payload = super().broadcast(round_idx)
        if bool(self.trained):
            payload.update(prototype_classes=torch.arange(self.ctx.num_classes, device=self.ctx.device),
                           prototypes=self.prototypes)
        return payload

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        super().aggregate(round_idx, uploads)
        c, device = self.ctx.num_classes, self.ctx.device
        means, present = mean_over_clients(uploads, "prototypes", c, "prototype_classes")
        self.margin, _ = adaptive_margin(means, present, self.params.margin_threshold)
        points = torch.cat([u["prototypes"] for u in uploads]).detach()
        labels = torch.cat([u["prototype_classes"] for u in uploads])
        self.train_generator(points, labels, self.margin)
        self.generator.eval()
        with torch.no_grad():
            self.prototypes = self.generator(torch.arange(c, device=device)).detach().clone()
        self.trained = torch.tensor(True)

    def train_generator(self, points: torch.Tensor, labels: torch.Tensor, margin: float) -> None:
        """`server_epochs` shuffled epochs over the (prototype, class) pairs; fresh SGD each round (code)."""
        gen_net, c = self.generator, self.ctx.num_classes
        optimizer = torch.optim.SGD(gen_net.parameters(), lr=self.cfg.lr)
        gen_net.train()
        all_classes = torch.arange(c, device=points.device)
        n, bs = len(labels), self.cfg.batch_size
        last = None
        for _ in range(self.params.server_epochs):
            perm = torch.randperm(n).to(points.device)  # global RNG: reseeded every round by the engine
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                loss = margin_contrastive_loss(points[idx], labels[idx], gen_net(all_classes), margin)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last = loss.detach()
        if last is not None:
            self.server_loss = last.item()

    def global_class_signal(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Diagnostics: the C trainable global prototypes; None before the first server update."""
        if not bool(self.trained):
            return None
        return self.prototypes, torch.ones(self.ctx.num_classes, dtype=torch.bool, device=self.prototypes.device)

    def use_prototypes(self) -> bool:
        rule = self.params.eval_rule
        if rule == "auto":
            rule = "prototype" if self.cfg.eval_mode == "personalized" else "logits"
        return rule == "prototype" and bool(self.trained)

    def scores(self, model, x) -> torch.Tensor:
        if self.use_prototypes():
            present = torch.ones(self.ctx.num_classes, dtype=torch.bool, device=self.prototypes.device)
            return nearest_prototype_scores(model.features(x), self.prototypes, present)
        return model(x)[1]


METHOD = Method(
    name="fedtgp",
    paper="Zhang, Liu, Hua, Cao, FedTGP: Trainable Global Prototypes with Adaptive-Margin-Enhanced Contrastive "
          "Learning for Data and Model Heterogeneity in Federated Learning, AAAI 2024",
    display="FedTGP",
    order=7,
    style={"color": "#AA4499", "marker": ">", "linestyle": ":"},
    modes=("personalized", "global"),
    communicates="per-class prototypes (up); all C trainable global prototypes (down); + weights in global mode",
    Params=Params,
    Client=Client,
    Server=Server,
    heterogeneous_models=True,
    # Seconds-long digits runs (tests): fewer generator epochs per round.
    fast_test_params={"server_epochs": 20},
    nearest_prototype=True,
    compare_upload=True,
)
