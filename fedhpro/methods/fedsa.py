"""FedSA (Zhou et al., AAAI 2025): semantic-anchor-based federated learning with heterogeneous models.

Follows the official code (lokinko/FedSA `clientsa.py`/`serversa.py`, built on HtFLlib):

- server, once: semantic anchors A = MLP(R), R ~ N(0, I) of shape C x d, MLP = [Linear(d, d),
  BatchNorm1d, ReLU] x 2 in train mode (the code's single-process SyncBN: batch statistics over the C
  rows), detached;
- client loss per batch: CE(h(r), y) + cc * CE(h(A), [0..C-1]) (classifier calibration) + lambda *
  MSE(r, A_y) (anchor regularisation, mean over B*d) + mcl * CE(-(D + g * onehot(y)), y) (margin-enhanced
  contrastive learning, D = Euclidean distances to the anchors, no temperature), with
  g = max(local_gap, global_gap) fixed at the start of local training: global_gap = mean_c min_{c'!=c}
  ||A_c - A_c'||, local_gap = the same over this client's previous-round local prototypes (0.0 before its
  first upload, -inf with fewer than two classes; kept in the client's state); defaults lambda 10
  (scripts' -lam 10), mcl 1, cc 1;
- local prototypes: mean of detached train-mode features over all local batches (`prototype_timing`);
- server: P-bar = unweighted mean of this round's uploads per class (replaced every round); anchors of
  the received classes move by EMA, A_c <- 0.9999 A_c + 0.0001 P-bar_c (`anchor_momentum`); A is sent
  to the clients every round; P-bar serves only evaluation: nearest P-bar by MSE in personalized mode
  (so it is sent, and counted, only when evaluation uses it), the averaged model's logits in global mode.

Deliberate differences: the distances are clamped as in FedTGP (sqrt(clamp_min(., 0) + eps), the code's
bare sqrt can give NaN); gaps use exact pairwise norms (the code's `cdist` may use the matmul form); the
anchors are drawn from the run seed (the code fixes torch.manual_seed(0) in each client constructor).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, Context, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param
from fedhpro.methods.fedtgp import margin_contrastive_loss, nearest_gaps
from fedhpro.methods.prototypes import (PrototypeAccumulator, PrototypeEvaluation, mean_over_clients,
                                        uploaded_prototypes)

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nn = lazy_module("torch.nn")


@dataclass(frozen=True)
class Params:
    lamda: float = param(10.0, "anchor regularisation weight, MSE to A_y (scripts -lam 10)", low=0.0)
    mcl: float = param(1.0, "margin-enhanced contrastive learning weight (-mcl)", low=0.0)
    cc: float = param(1.0, "anchor-based classifier calibration weight (-cc)", low=0.0)
    anchor_momentum: float = param(0.9999, "EMA momentum of the anchors towards the global prototypes (code: "
                                   "0.9999, hard-coded)", low=0.0, high=1.0)
    prototype_timing: str = param("during", "local prototypes from the training batches (code) or an eval pass "
                                  "after training", choices=("during", "after"))
    eval_rule: str = param("auto", "evaluation: nearest global prototype, logits, or auto (prototype when "
                           "personalized, logits when global)", choices=("auto", "prototype", "logits"))


def init_anchors(num_classes: int, dim: int, device=None) -> torch.Tensor:
    """A = MLP(R), R ~ N(0, I): two [Linear, BatchNorm1d (batch stats over the C rows), ReLU] blocks; detached."""
    mlp = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                        nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU())
    random_centres = torch.randn(num_classes, dim)
    mlp.train()
    return mlp(random_centres).detach().to(device)


def mean_nearest_gap(rows: torch.Tensor | None) -> float:
    """mean_c min_{c'!=c} ||row_c - row_c'||; 0.0 for None (no previous upload), -inf for fewer than 2 rows."""
    if rows is None:
        return 0.0
    if rows.shape[0] < 2:
        return float("-inf")
    return nearest_gaps(rows).mean().item()


def anchor_loss_terms(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                      classifier: nn.Module, gap: float) -> dict[str, torch.Tensor]:
    """The four unweighted FedSA terms: ce, cc (calibration), reg (anchor MSE), mcl (margin contrastive)."""
    num_classes = anchors.shape[0]
    return {
        "ce": F.cross_entropy(logits, labels),
        "cc": F.cross_entropy(classifier(anchors), torch.arange(num_classes, device=anchors.device)),
        "reg": F.mse_loss(features, anchors[labels]),
        "mcl": margin_contrastive_loss(features, labels, anchors, gap),
    }


class Client(ClientBase):
    UPLOAD_METADATA = ("prototype_classes",)

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        self.anchors = payload["anchors"].to(self.ctx.device)
        previous = state.get("prototypes")
        self.local_gap = mean_nearest_gap(previous)
        self.global_gap = mean_nearest_gap(self.anchors)
        self.gap = max(self.local_gap, self.global_gap)
        self.accumulator = PrototypeAccumulator(self.ctx.num_classes)

    def loss(self, model, x, y) -> torch.Tensor:
        p = self.params
        features, logits = model(x)
        terms = anchor_loss_terms(features, logits, y, self.anchors, model.classifier, self.gap)
        loss = terms["ce"] + p.cc * terms["cc"] + p.lamda * terms["reg"] + p.mcl * terms["mcl"]
        if p.prototype_timing == "during":
            self.accumulator.add(features, y)
        return loss

    def upload(self, client, model, state, round_idx) -> dict:
        classes, protos = uploaded_prototypes(self.params.prototype_timing, self.accumulator, model, self.ctx, client)
        # Remembered for next round's local gap (the code keeps `self.protos` on the client).
        state["prototypes"] = protos.detach().cpu().clone()
        state["prototype_classes"] = classes.cpu().clone()
        return {"prototype_classes": classes, "prototypes": protos}


class Server(PrototypeEvaluation, ServerBase):
    STATE = ("anchors",)  # + PrototypeEvaluation's global prototypes
    BROADCAST_METADATA = ("prototype_classes",)

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        c, d = ctx.num_classes, ctx.feature_dim
        self.anchors = init_anchors(c, d, ctx.device)
        self.prototypes = torch.zeros(c, d, device=ctx.device)
        self.present = torch.zeros(c, dtype=torch.bool, device=ctx.device)

    def broadcast(self, round_idx: int) -> dict:
        payload = super().broadcast(round_idx)
        payload["anchors"] = self.anchors
        if self.use_prototypes():  # P-bar only serves evaluation
            classes = torch.nonzero(self.present).flatten()
            payload.update(prototype_classes=classes, prototypes=self.prototypes[classes])
        return payload

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        super().aggregate(round_idx, uploads)
        self.prototypes, self.present = mean_over_clients(uploads, "prototypes", self.ctx.num_classes,
                                                          "prototype_classes")
        self.anchors = ema_anchors(self.anchors, self.prototypes, self.present, self.params.anchor_momentum)

    def global_class_signal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagnostics: the semantic anchors A (every class), the target the client features are pulled to;
        the mean prototypes P-bar only serve evaluation."""
        return self.anchors, torch.ones(self.ctx.num_classes, dtype=torch.bool, device=self.anchors.device)


def ema_anchors(anchors: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor,
                momentum: float) -> torch.Tensor:
    """A_c <- m A_c + (1 - m) P-bar_c for the classes received this round; the others stay."""
    out = anchors.clone()
    out[present] = momentum * anchors[present] + (1 - momentum) * prototypes[present]
    return out


METHOD = Method(
    name="fedsa",
    paper="Zhou et al., FedSA: A Unified Representation Learning via Semantic Anchors for Prototype-based "
          "Federated Learning, AAAI 2025",
    display="FedSA",
    order=8,
    style={"color": "#882255", "marker": "p", "linestyle": "-."},
    modes=("personalized", "global"),
    communicates="per-class prototypes (up); C semantic anchors + global prototypes for evaluation (down); "
                 "+ weights in global mode",
    Params=Params,
    Client=Client,
    Server=Server,
    heterogeneous_models=True,
    nearest_prototype=True,
    compare_upload=True,
)
