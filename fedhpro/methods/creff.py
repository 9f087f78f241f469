"""CReFF (Shang et al., IJCAI 2022): classifier re-training with federated features.

Clients send, per local class, the CE gradient of the global classifier on a
batch of real samples (DSA-augmented). The server learns M federated features
per class whose classifier gradients match those (CReFF's layer-wise
`distance_wb`), then re-trains a fresh linear classifier on the features.
As in CReFF, the re-trained classifier is used for evaluation only; clients
keep receiving the FedAvg model (FedHPro differs: it sends the re-trained one).

Official FedHPro code (a CReFF fork) re-trains 100 epochs, batch 50, lr 0.01,
M = 50, 100 matching iterations; CReFF's own defaults are M = 100, 300
re-training epochs, batch_real 32. We default to CReFF's values for `creff`
(and FedHPro's for `fedhpro`); every one of them is a parameter.

The helpers here (`real_class_batches`, `FederatedFeatures`) are shared with
`fedhpro.methods.fedhpro`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.dsa import siamese_augment
from fedhpro.engine import ClientBase, ClientData, Context, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param
from fedhpro.methods.prototypes import mean_over_clients
from fedhpro.methods.gradients import class_gradients, classifier_gradient_distance, synthetic_gradients

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nn = lazy_module("torch.nn")


@dataclass(frozen=True)
class Params:
    real_batch: int = param(32, "real samples per class for the client gradient", low=1)
    repeats: int = param(1, "random real batches per class, averaged", low=1)
    dsa: bool = param(True, "Siamese augmentation of the real batches")
    features_per_class: int = param(100, "federated features M per class", low=1)
    matching_steps: int = param(100, "SGD steps on the federated features per round", low=0)
    feature_lr: float = param(0.1, "learning rate of the federated features", low=0.0, low_inclusive=False)
    distance: str = param("matching", "gradient distance", choices=("matching", "cos", "mse"))
    retrain_epochs: int = param(300, "epochs of classifier re-training on the features", low=1)
    retrain_batch: int = param(100, "batch size of classifier re-training", low=1)
    retrain_lr: float = param(0.01, "learning rate of classifier re-training", low=0.0, low_inclusive=False)


def real_class_batches(ctx: Context, client: ClientData, model: nn.Module, real_batch: int, dsa: bool,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (eval mode, no grad) of up to `real_batch` random samples of each local class.

    Mirrors `Local.compute_gradient`: classes in increasing order, `randperm` per class,
    one Siamese DSA draw per class batch, one batched forward pass.
    """
    classes = torch.nonzero(client.class_counts > 0).flatten().to(ctx.device)
    inputs, labels = [], []
    for c in classes.tolist():
        idx = torch.nonzero(client.y == c).flatten()
        pick = idx[torch.randperm(idx.numel(), generator=gen)[:real_batch].to(idx.device)]
        x = ctx.prepare(client.x[pick], train=False)
        if dsa and ctx.mean is not None:
            x = siamese_augment(x, gen)
        inputs.append(x)
        labels.append(torch.full((len(pick),), c, dtype=torch.long, device=ctx.device))
    model.eval()
    with torch.no_grad():
        features = model.features(torch.cat(inputs))
    return features, torch.cat(labels), classes


def client_class_gradients(ctx: Context, client: ClientData, model: nn.Module, weight: torch.Tensor,
                           bias: torch.Tensor, real_batch: int, repeats: int, dsa: bool, gen: torch.Generator) -> dict:
    """Upload entries: present classes, feature-gradients (k, d), classifier gradients (k, C, d), (k, C)."""
    sums = None
    for _ in range(repeats):
        features, labels, classes = real_class_batches(ctx, client, model, real_batch, dsa, gen)
        grads = class_gradients(features, labels, weight.detach(), bias.detach(), classes)
        sums = grads if sums is None else tuple(a + b for a, b in zip(sums, grads))
    fg, dw, db = (g / repeats for g in sums)
    return {"classes": classes, "feature_grad": fg, "grad_w": dw, "grad_b": db}


class FederatedFeatures:
    """CReFF's server-side federated features F (C*M x d), matched then used to re-train a classifier."""

    def __init__(self, num_classes: int, per_class: int, dim: int, lr: float, device: torch.device):
        self.per_class = per_class
        self.num_classes = num_classes
        self.features = torch.randn(num_classes * per_class, dim, device=device)  # official: torch.randn
        self.labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
        self.lr = lr

    def match(self, weight: torch.Tensor, bias: torch.Tensor, real_dw: torch.Tensor, real_db: torch.Tensor,
              present: torch.Tensor, steps: int, distance: str) -> None:
        """`set_meta_params`: SGD on F so its classifier gradients match the clients' (present classes)."""
        classes = torch.nonzero(present).flatten()
        if classes.numel() == 0:
            return
        rows = (classes[:, None] * self.per_class + torch.arange(self.per_class, device=classes.device)).flatten()
        weight, bias = weight.detach(), bias.detach()
        block = self.features[rows].clone().requires_grad_(True)
        labels = self.labels[rows]
        for _ in range(steps):
            _, syn_dw, syn_db = synthetic_gradients(block, labels, weight, bias, self.per_class)
            loss = classifier_gradient_distance(distance, real_dw[classes], real_db[classes], syn_dw, syn_db).sum()
            (grad,) = torch.autograd.grad(loss, block)
            with torch.no_grad():
                block -= self.lr * grad
        self.features[rows] = block.detach()

    def retrain_classifier(self, epochs: int, batch_size: int, lr: float, gen: torch.Generator) -> nn.Linear:
        """`meta_revised`: a fresh linear classifier trained with CE on (F, labels), shuffled mini-batches.

        Same numbers as `nn.Linear` + `F.cross_entropy` + `loss.backward()` + `torch.optim.SGD(lr)`, bit for
        bit, at a fraction of the per-step overhead (FedHPro's 100 epochs are ~1,000 tiny steps): the CE
        gradient is formed with the kernels autograd runs for it (log-softmax backward of the NLL
        gradient -1/B at the targets, then `addmm`'s backward products) and applied with SGD's
        `add_(grad, alpha=-lr)`; each epoch's shuffled features are gathered once.
        `tests/test_vectorised.py` checks equality with the autograd loop.
        """
        dim = self.features.shape[1]
        head = nn.Linear(dim, self.num_classes).to(self.features.device)
        weight, bias = head.weight.detach(), head.bias.detach()  # share storage: updated in place below
        features = self.features.detach()
        targets = F.one_hot(self.labels, self.num_classes).to(features.dtype)
        n = len(self.labels)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(features.device)
            epoch_x, epoch_t = features[perm], targets[perm]
            for start in range(0, n, batch_size):
                x, t = epoch_x[start:start + batch_size], epoch_t[start:start + batch_size]
                log_p = torch.log_softmax(torch.addmm(bias, x, weight.t()), 1)  # = F.linear, log-softmax
                grad_logits = torch._log_softmax_backward_data(t * (-1.0 / len(x)), log_p, 1, log_p.dtype)
                weight.add_(grad_logits.t().mm(x), alpha=-lr)  # addmm backward for W (as W^T's transpose)
                bias.add_(grad_logits.sum(0), alpha=-lr)
        return head


class Client(ClientBase):
    UPLOAD_METADATA = ("classes",)  # which classes the gradient rows belong to

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        p = self.params
        self.gradients = client_class_gradients(self.ctx, client, model, model.classifier.weight,
                                                model.classifier.bias, p.real_batch, p.repeats, p.dsa, gen)

    def upload(self, client, model, state, round_idx) -> dict:
        g = self.gradients
        return {"classes": g["classes"], "grad_w": g["grad_w"], "grad_b": g["grad_b"]}


class Server(ServerBase):
    STATE = ("federated.features", "eval_net")

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        p = self.params
        self.federated = FederatedFeatures(ctx.num_classes, p.features_per_class, self.model.feature_dim,
                                           p.feature_lr, ctx.device)
        self.eval_net = self.ctx.make_model()

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        p = self.params
        weight = self.model.classifier.weight.detach().clone()  # the classifier the clients used
        bias = self.model.classifier.bias.detach().clone()
        super().aggregate(round_idx, uploads)
        dw, present = mean_over_clients(uploads, "grad_w", self.ctx.num_classes)
        db, _ = mean_over_clients(uploads, "grad_b", self.ctx.num_classes)
        self.federated.match(weight, bias, dw, db, present, p.matching_steps, p.distance)
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        head = self.federated.retrain_classifier(p.retrain_epochs, p.retrain_batch, p.retrain_lr, gen)
        state = self.model.state_dict()
        state["classifier.weight"], state["classifier.bias"] = head.weight.detach(), head.bias.detach()
        self.eval_net.load_state_dict(state)

    def eval_model(self) -> nn.Module:
        return self.eval_net


METHOD = Method(
    name="creff",
    paper="Shang et al., Federated Learning on Heterogeneous and Long-Tailed Data via Classifier Re-Training "
          "with Federated Features, IJCAI 2022",
    display="CReFF",
    order=4,
    style={"color": "#999933", "marker": "D", "linestyle": ":"},
    modes=("global",),
    communicates="model weights + per-class classifier gradients (up)",
    Params=Params,
    Client=Client,
    Server=Server,
    # Seconds-long digits runs (tests, quick benchmarks): fewer federated features, server steps and epochs.
    fast_test_params={"features_per_class": 10, "matching_steps": 5, "retrain_epochs": 50, "real_batch": 16},
)
