"""Prototype bookkeeping shared by the prototype methods (vectorised with `index_add_`, no per-sample loops)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedhpro.engine import ClientData, Context
from fedhpro.lazy import lazy_module, no_grad

if TYPE_CHECKING:
    from torch import nn

torch = lazy_module("torch")


class PrototypeAccumulator:
    """Running per-class sums of features, e.g. over all local training batches (HtFLlib FedProto)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        features = features.detach()
        if features.dtype in (torch.bfloat16, torch.float16):  # from an autocast pass: sum (and upload) in fp32
            features = features.float()
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, features.shape[1], dtype=features.dtype, device=features.device)
            self.counts = torch.zeros(self.num_classes, dtype=features.dtype, device=features.device)
        self.sums.index_add_(0, labels, features)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=features.dtype))

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(present class ids (k,), their mean features (k, d))."""
        assert self.sums is not None and self.counts is not None, "no features were added"
        classes = torch.nonzero(self.counts > 0).flatten()
        return classes, self.sums[classes] / self.counts[classes, None]


@no_grad
def local_prototypes(model: nn.Module, ctx: Context, client: ClientData, batch_size: int = 256
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean features over the client's training data, model in eval mode (FedTGP/ProtoNorm timing)."""
    model.eval()
    acc = PrototypeAccumulator(ctx.num_classes)
    for start in range(0, client.num_samples, batch_size):
        acc.add(model.features(ctx.prepare(client.x[start:start + batch_size], train=False)),
                client.y[start:start + batch_size])
    return acc.means()


def uploaded_prototypes(timing: str, accumulator: PrototypeAccumulator, model: nn.Module, ctx: Context,
                        client: ClientData) -> tuple[torch.Tensor, torch.Tensor]:
    """The local prototypes a client uploads, by its method's `prototype_timing`: "during", the class means of
    the training batches' features as they were computed (the HtFLlib/FedSA code), or "after", an eval-mode
    pass over the client's data once training ended (`local_prototypes`)."""
    if timing == "after":
        return local_prototypes(model, ctx, client)
    return accumulator.means()


def mean_over_clients(uploads: list[dict], key: str, num_classes: int, classes_key: str = "classes",
                      weights: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the mean over the clients that uploaded it -> (values (C, ...), present mask (C,)).

    Unweighted by default (FedProto code, HtFLlib); `weights` gives one weight per uploaded row.
    """
    ref = uploads[0][key]
    total = torch.zeros((num_classes, *ref.shape[1:]), dtype=ref.dtype, device=ref.device)
    count = torch.zeros(num_classes, dtype=ref.dtype, device=ref.device)
    for i, u in enumerate(uploads):
        w = torch.ones(len(u[classes_key]), dtype=ref.dtype, device=ref.device) if weights is None else \
            weights[i].to(ref.dtype)
        total.index_add_(0, u[classes_key], u[key] * w.view(-1, *([1] * (ref.dim() - 1))))
        count.index_add_(0, u[classes_key], w)
    present = count > 0
    total[present] /= count[present].view(-1, *([1] * (total.dim() - 1)))
    return total, present


def nearest_prototype_scores(features: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Scores = -MSE(feature, prototype) per class (HtFLlib/FedProto inference); absent classes never win."""
    dist = torch.cdist(features, prototypes).pow(2) / features.shape[1]
    scores = -dist
    return scores.masked_fill(~present[None, :], torch.finfo(scores.dtype).min / 4)


class PrototypeEvaluation:
    """Server mixin for methods with global prototypes `self.prototypes` (C x d) and `self.present` (C,):
    nearest-prototype evaluation (`eval_rule`: prototype when personalized, logits when global, unless
    set) and checkpointing of both tensors. Use as `class Server(PrototypeEvaluation, ServerBase)`."""

    STATE = ("prototypes", "present")

    def use_prototypes(self) -> bool:
        rule = self.params.eval_rule
        if rule == "auto":
            rule = "prototype" if self.cfg.eval_mode == "personalized" else "logits"
        return rule == "prototype" and bool(self.present.any())

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_prototypes():
            return nearest_prototype_scores(model.features(x), self.prototypes, self.present)
        return model(x)[1]
