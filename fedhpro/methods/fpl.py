"""FPL (Huang, Ye, Du, CVPR 2023, "Rethinking Federated Learning with Domain Shift: A Prototype View").

Follows the official code (WenkeHuang/RethinkFL `models/fpl.py`, `utils/finch.py`):

- weights: FedAvg weighted by client data size over the whole state_dict (`--averaing weight`);
- clients upload per-class local prototypes: the mean of the (train-mode) features of every
  sample of the class seen in the *last* local epoch (`agg_protos_label` is reset each epoch;
  `prototype_epochs: all` averages over all local epochs instead);
- the server clusters, per class, this round's client prototypes with FINCH (cosine distance,
  `fedhpro.finch`), keeps the coarsest partition `c[:, -1]` and sends the cluster means
  (unweighted means of the member prototypes); a class uploaded by one client keeps that prototype
  as its single cluster. The cluster prototypes are replaced every round (classes not uploaded
  this round have none);
- client loss = CE + (1/B) sum over samples whose class has cluster prototypes of
  (l_CPCL + l_UPCL), with
  l_CPCL = -log( sum_{p of class y} exp(cos(r, p)/tau) / sum_{all p} exp(cos(r, p)/tau) ), tau = 0.02
  (`infoNCET`), and l_UPCL = mean_d (r - u_y)^2 with u_y the mean of class y's cluster prototypes
  (the unbiased prototype; `nn.MSELoss` on 1 x d rows). As in the code the sum is divided by the
  whole batch size (samples without prototypes count in B); no prototypes yet (first round): CE only.

Deliberate differences: the per-sample Python loop of the official loss is vectorised (same value;
logsumexp instead of exp/sum, which is equal but cannot overflow); a batch in which no sample has a
prototype adds 0 (the official code would fail on it); FINCH is our torch re-implementation.
Evaluation is the global model's logits, as in the code.

Official training defaults (RunConfig keys, not method parameters): 10 local epochs, SGD lr 0.01,
momentum 0.9, weight decay 1e-5 (hard-coded in `_train_net`), batch 64, 100 rounds, 10 clients
(Digits / Office-Caltech). Set `local_epochs: 10, lr: 0.01, momentum: 0.9, weight_decay: 1e-5`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, Context, ServerBase
from fedhpro.finch import finch
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param
from fedhpro.methods.prototypes import PrototypeAccumulator

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


@dataclass(frozen=True)
class Params:
    temperature: float = param(0.02, "CPCL InfoNCE temperature tau (--infoNCET)", low=0.0, low_inclusive=False)
    cpcl: bool = param(True, "cluster prototypes contrastive learning term")
    upcl: bool = param(True, "unbiased prototypes consistent regularisation term (MSE to the class mean)")
    prototype_epochs: str = param("last", "local prototypes from the last local epoch (official) or all epochs",
                                  choices=("last", "all"))


def cluster_prototypes(uploads: list[dict], distance: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Server step: per class, FINCH over the clients' prototypes -> (cluster means (K, d), their classes (K,)).

    Rows keep the upload order; classes in increasing order, clusters in FINCH order within a class.
    """
    protos = torch.cat([u["prototypes"] for u in uploads])
    classes = torch.cat([u["prototype_classes"] for u in uploads])
    out, out_classes = [], []
    for c in torch.unique(classes).tolist():  # at most C iterations
        rows = protos[classes == c]
        if len(rows) > 1:
            labels = finch(rows, distance)[0][:, -1]
            k = int(labels.max()) + 1
            sums = torch.zeros(k, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, labels, rows)
            counts = torch.bincount(labels, minlength=k).to(rows.dtype)
            rows = sums / counts[:, None]
        out.append(rows)
        out_classes.append(torch.full((len(rows),), c, dtype=torch.long, device=rows.device))
    return torch.cat(out), torch.cat(out_classes)


def unbiased_prototypes(protos: torch.Tensor, proto_classes: torch.Tensor, num_classes: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the unweighted mean of its cluster prototypes -> ((C, d) table, (C,) presence mask)."""
    sums = torch.zeros(num_classes, protos.shape[1], dtype=protos.dtype, device=protos.device)
    sums.index_add_(0, proto_classes, protos)
    counts = torch.bincount(proto_classes, minlength=num_classes).to(protos.dtype)
    present = counts > 0
    sums[present] /= counts[present, None]
    return sums, present


def fpl_terms(features: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor, proto_classes: torch.Tensor,
              unbiased: torch.Tensor, present: torch.Tensor, temperature: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_CPCL, l_UPCL), each summed over the samples whose class has prototypes and divided by the batch size."""
    has = present[labels]
    batch = len(labels)
    cos = F.normalize(features, dim=1, eps=1e-8) @ F.normalize(protos, dim=1, eps=1e-8).T / temperature  # (B, K)
    positive = proto_classes[None, :] == labels[:, None]
    # Rows without prototypes of their class: treat every prototype as positive (exactly 0, no NaN grads).
    positive = positive | ~has[:, None]
    cpcl = torch.logsumexp(cos, dim=1) - torch.logsumexp(cos.masked_fill(~positive, float("-inf")), dim=1)
    upcl = (features - unbiased[labels]).pow(2).mean(dim=1)
    weight = has.to(features.dtype) / batch
    return (cpcl * weight).sum(), (upcl * weight).sum()


class Client(ClientBase):
    UPLOAD_METADATA = ("prototype_classes",)

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        self.protos = payload.get("cluster_prototypes")
        if self.protos is not None:
            self.proto_classes = payload["cluster_classes"]
            self.unbiased, self.present = unbiased_prototypes(self.protos, self.proto_classes, self.ctx.num_classes)
        self.accumulator = PrototypeAccumulator(self.ctx.num_classes)
        self.collecting = False

    def start_epoch(self, round_idx: int, epoch: int) -> None:
        # `agg_protos_label` is reset every epoch in the code: only the last epoch's features count.
        self.collecting = self.params.prototype_epochs == "all" or epoch == self.cfg.local_epochs - 1

    def loss(self, model, x, y) -> torch.Tensor:
        features, logits = model(x)
        loss = F.cross_entropy(logits, y)
        p = self.params
        if self.protos is not None and (p.cpcl or p.upcl):
            cpcl, upcl = fpl_terms(features, y, self.protos, self.proto_classes, self.unbiased, self.present,
                                   p.temperature)
            loss = loss + (cpcl if p.cpcl else 0.0) + (upcl if p.upcl else 0.0)
        if self.collecting:
            self.accumulator.add(features, y)
        return loss

    def upload(self, client, model, state, round_idx) -> dict:
        classes, protos = self.accumulator.means()
        return {"prototype_classes": classes, "prototypes": protos}


class Server(ServerBase):
    STATE = ("prototypes", "classes")
    BROADCAST_METADATA = ("cluster_classes",)

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.prototypes = torch.zeros(0, ctx.feature_dim, device=ctx.device)
        self.classes = torch.zeros(0, dtype=torch.long, device=ctx.device)

    def broadcast(self, round_idx: int) -> dict:
        payload = super().broadcast(round_idx)
        if len(self.classes):
            payload.update(cluster_classes=self.classes, cluster_prototypes=self.prototypes)
        return payload

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        super().aggregate(round_idx, uploads)
        self.prototypes, self.classes = cluster_prototypes(uploads)

    def global_class_signal(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Diagnostics: per class the mean of its cluster prototypes (FPL's unbiased prototype u_c); None
        before the first upload."""
        if not len(self.classes):
            return None
        return unbiased_prototypes(self.prototypes, self.classes, self.ctx.num_classes)


METHOD = Method(
    name="fpl",
    paper="Huang et al., Rethinking Federated Learning with Domain Shift: A Prototype View, CVPR 2023",
    display="FPL",
    order=6,
    style={"color": "#44AA99", "marker": "<", "linestyle": "-"},
    modes=("global",),
    communicates="weights (both directions) + per-class prototypes (up) + per-class cluster prototypes (down)",
    Params=Params,
    Client=Client,
    Server=Server,
    compare_upload=True,
)
