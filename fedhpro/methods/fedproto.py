"""FedProto (Tan et al., AAAI 2022): CE + lambda * distance to the global class prototype.

Follows the HtFLlib implementation (as the FedTGP/FedSA/ProtoNorm papers do):
the regulariser is `MSELoss` (mean over B*d) to a B x d target whose row is
the global prototype of the sample's class, or the detached feature itself
when that prototype does not exist (zero contribution, same divisor), with
lambda = 10. `distance: euclidean` gives the paper's per-sample L2 distance
instead (lambda must then be re-tuned). Local prototypes are the mean of
detached features over all local batches (train mode; `prototype_timing:
after` recomputes them in eval mode after training, FedTGP/ProtoNorm-style).
The server takes the unweighted mean over uploading clients (the paper's
|D_ij|/N_j weighting is `server_weighting: samples`). Evaluation: nearest
global prototype by MSE (personalized mode); global mode uses the averaged
model's logits unless `eval_rule: prototype`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, Context, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param
from fedhpro.methods.prototypes import (PrototypeAccumulator, PrototypeEvaluation, mean_over_clients,
                                        uploaded_prototypes)

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


@dataclass(frozen=True)
class Params:
    lamda: float = param(10.0, "weight of the prototype regulariser (HtFLlib -lam 10 with MSE)", low=0.0)
    distance: str = param("mse", "regulariser: mse (mean over B*d, code) or euclidean (per-sample L2, paper)",
                          choices=("mse", "euclidean"))
    prototype_timing: str = param("during", "local prototypes from training batches or an eval pass after",
                                  choices=("during", "after"))
    server_weighting: str = param("uniform", "server mean over clients: uniform (code) or by class samples "
                                  "(paper)", choices=("uniform", "samples"))
    eval_rule: str = param("auto", "evaluation: nearest prototype, logits, or auto (prototype when "
                           "personalized, logits when global)", choices=("auto", "prototype", "logits"))


def prototype_regulariser(features: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                          present: torch.Tensor, distance: str) -> torch.Tensor:
    """MSE (or mean L2) to the class prototype; rows without a prototype target their own detached feature."""
    has = present[labels]
    target = torch.where(has[:, None], targets[labels], features.detach())
    if distance == "mse":
        return F.mse_loss(features, target)
    return (features - target).norm(dim=1).mean()


def dense(payload: dict, key: str, classes_key: str, num_classes: int, dim: int, device) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(k, d) rows + class ids from a payload -> a (C, d) table and a (C,) presence mask."""
    table = torch.zeros(num_classes, dim, device=device)
    present = torch.zeros(num_classes, dtype=torch.bool, device=device)
    if key in payload:
        table[payload[classes_key]] = payload[key]
        present[payload[classes_key]] = True
    return table, present


class PrototypeClient(ClientBase):
    """CE + lambda * MSE to the received global prototypes; uploads local class means (`prototype_timing`).

    FedProto's client, and the base of FedTGP's and ProtoNorm's, which change only the targets.
    """

    UPLOAD_METADATA = ("prototype_classes",)  # which classes the prototype rows belong to

    def regulariser_distance(self) -> str:
        return "mse"

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        self.targets, self.present = dense(payload, "prototypes", "prototype_classes", self.ctx.num_classes,
                                           model.feature_dim, self.ctx.device)
        self.accumulator = PrototypeAccumulator(self.ctx.num_classes)

    def loss(self, model, x, y) -> torch.Tensor:
        features, logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.present.any():
            loss = loss + self.params.lamda * prototype_regulariser(features, y, self.targets, self.present,
                                                                    self.regulariser_distance())
        if self.params.prototype_timing == "during":
            self.accumulator.add(features, y)
        return loss

    def upload(self, client, model, state, round_idx) -> dict:
        classes, protos = uploaded_prototypes(self.params.prototype_timing, self.accumulator, model, self.ctx, client)
        return {"prototype_classes": classes, "prototypes": protos}


class Client(PrototypeClient):
    def regulariser_distance(self) -> str:
        return self.params.distance

    def upload(self, client, model, state, round_idx) -> dict:
        out = super().upload(client, model, state, round_idx)
        if self.params.server_weighting == "samples":  # the paper's |D_ij| weighting needs the counts
            out["prototype_counts"] = client.class_counts[out["prototype_classes"].cpu()].to(out["prototypes"].device)
        return out


class PrototypeServer(PrototypeEvaluation, ServerBase):
    """Holds global prototypes for the classes seen (none at first) and broadcasts those; each method
    supplies its own `aggregate` (FedProto: the mean; ProtoNorm: aligned unit prototypes)."""

    BROADCAST_METADATA = ("prototype_classes",)

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.prototypes = torch.zeros(ctx.num_classes, ctx.feature_dim, device=ctx.device)
        self.present = torch.zeros(ctx.num_classes, dtype=torch.bool, device=ctx.device)

    def broadcast(self, round_idx: int) -> dict:
        payload = super().broadcast(round_idx)
        if self.present.any():
            classes = torch.nonzero(self.present).flatten()
            payload.update(prototype_classes=classes, prototypes=self.prototypes[classes])
        return payload

    def global_class_signal(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Diagnostics: the global prototypes (ProtoNorm: the aligned unit prototypes); None before any upload."""
        return (self.prototypes, self.present) if bool(self.present.any()) else None


class Server(PrototypeServer):
    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        super().aggregate(round_idx, uploads)
        weights = [u["prototype_counts"] for u in uploads] if self.params.server_weighting == "samples" else None
        # HtFLlib: the global prototypes are replaced by this round's aggregate.
        self.prototypes, self.present = mean_over_clients(uploads, "prototypes", self.ctx.num_classes,
                                                          "prototype_classes", weights)


METHOD = Method(
    name="fedproto",
    paper="Tan et al., FedProto: Federated Prototype Learning across Heterogeneous Clients, AAAI 2022",
    display="FedProto",
    order=5,
    style={"color": "#CCBB44", "marker": "^", "linestyle": "-"},
    modes=("personalized", "global"),
    communicates="per-class prototypes (both directions); + weights in global mode",
    Params=Params,
    Client=Client,
    Server=Server,
    heterogeneous_models=True,
    nearest_prototype=True,
    compare_upload=True,
)
