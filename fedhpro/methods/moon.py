"""MOON (Li, He, Song, CVPR 2021): model-contrastive federated learning.

Follows the official code (QinbinLi/MOON `main.py::train_net_fedcon`, `model.py::ModelFedCon`):

- loss = CE + mu * l_con, l_con = -log( exp(cos(z, z_g)/tau) / (exp(cos(z, z_g)/tau) + exp(cos(z, z_prev)/tau)) )
  averaged over the batch (the code's CE over the logits [cos(z,z_g), cos(z,z_prev)]/tau with label 0);
- z_g from the frozen current global model, z_prev from this client's frozen previous local model
  (`model_buffer_size` 1: the model it uploaded the last time it was sampled, kept in the client
  `state`); both frozen models run in eval mode (BN running statistics), as in the code;
- FedAvg weighted by sample count over the whole state_dict; evaluation by the global model's logits.

Representation z (`projection_head`):
- `true` (official `use_project_head=1`, default): the model gets MOON's projection head: the
  features h (backbone output, after any config-level `feature_dim` projection) go through
  l1 Linear(d, d) -> ReLU -> l2 Linear(d, projection_dim=256) = z, and the classifier l3 is
  Linear(256, C) applied to z, exactly `ModelFedCon`. The head is part of the model, so it is
  averaged, communicated and evaluated like every other weight. It is installed by the method's
  `model_wrapper` hook, which the run's context applies to every model it builds, so the server,
  the clients' working models and the frozen copies all share the architecture; `model.features(x)`
  then returns z.
- `false`: PFLlib's `clientmoon.py` variant: no head, l_con on the base features `rep` (the
  classifier's input), same architecture as FedAvg.

Round one / first participation: the official code's `--load_first_net` branch builds the initial
nets but never puts them in the pool, so in the first round the contrastive logits hold only the
positive and l_con = CE of one logit = 0. We do the same whenever a client has no previous local
model (first round, or first participation under partial sampling): loss = CE. This equals, in
gradient, using the initial global model as z_prev (then z_prev = z_g and l_con = log 2, a constant).

Defaults: mu = 1 (code default; the README's CIFAR-10 example uses 5 and advises tuning in
{0.001, 0.01, 0.1, 1, 5, 10}), tau = 0.5, out_dim 256. Official training (RunConfig keys, not
method parameters): SGD lr 0.01, momentum 0.9, weight decay 1e-5 (`--reg`), batch 64, 10 local
epochs, 10 parties, 100 rounds: `lr: 0.01, momentum: 0.9, weight_decay: 1e-5, local_epochs: 10`.

Memory: every client keeps its last local model (CPU) in its state, and checkpoints hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fedhpro.engine import ClientBase, Context, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nn = lazy_module("torch.nn")


@dataclass(frozen=True)
class Params:
    mu: float = param(1.0, "weight of the model-contrastive loss (code default 1; README CIFAR-10 example 5)",
                      low=0.0)
    temperature: float = param(0.5, "contrastive temperature tau", low=0.0, low_inclusive=False)
    projection_head: bool = param(True, "MOON projection head l1-ReLU-l2 with the classifier on z (official); "
                                  "false: contrast the base features (PFLlib)")
    projection_dim: int = param(256, "output size of the projection head (--out_dim)", low=1)


def moon_contrastive(z: torch.Tensor, z_global: torch.Tensor, z_prev: torch.Tensor, temperature: float
                     ) -> torch.Tensor:
    """Batch mean of -log(e^{cos(z,z_g)/tau} / (e^{cos(z,z_g)/tau} + e^{cos(z,z_prev)/tau}))."""
    logits = torch.stack([F.cosine_similarity(z, z_global, dim=-1), F.cosine_similarity(z, z_prev, dim=-1)], dim=1)
    return F.cross_entropy(logits / temperature, torch.zeros(len(z), dtype=torch.long, device=z.device))


def add_projection_head(model: nn.Module, out_dim: int) -> nn.Module:
    """Turn a `FeatureClassifier` into MOON's `ModelFedCon`: features -> l1 -> ReLU -> l2 = z, classifier on z."""
    d = model.feature_dim
    model.projection = nn.Sequential(model.projection, nn.Linear(d, d), nn.ReLU(), nn.Linear(d, out_dim))
    model.classifier = nn.Linear(out_dim, model.classifier.out_features)
    model.feature_dim = out_dim
    return model


def model_wrapper(ctx: Context) -> Callable[[nn.Module], nn.Module] | None:
    """The model hook (`Context.install_model_wrapper`): every model of the run gets the projection head
    (`projection_head: true`); none is changed otherwise."""
    if not ctx.params.projection_head:
        return None
    out_dim = ctx.params.projection_dim
    return lambda model: add_projection_head(model, out_dim)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Client(ClientBase):
    def __init__(self, ctx: Context):
        super().__init__(ctx)
        # Built outside the round RNG stream (their initial weights are always overwritten before use).
        with torch.random.fork_rng(devices=[]):
            self.global_net = _frozen(ctx.make_model())
            self.previous_net = _frozen(ctx.make_model())
        self.has_previous = False

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        self.global_net.load_state_dict(payload["weights"])
        self.has_previous = "previous" in state
        if self.has_previous:
            self.previous_net.load_state_dict(state["previous"])

    def loss(self, model, x, y) -> torch.Tensor:
        z, logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.params.mu > 0 and self.has_previous:
            with torch.no_grad():
                z_global = self.global_net.features(x)
                z_prev = self.previous_net.features(x)
            loss = loss + self.params.mu * moon_contrastive(z, z_global, z_prev, self.params.temperature)
        return loss

    def upload(self, client, model, state, round_idx) -> dict:
        state["previous"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return {}


class Server(ServerBase):
    pass


METHOD = Method(
    name="moon",
    paper="Li, He, Song, Model-Contrastive Federated Learning, CVPR 2021",
    display="MOON",
    order=3,
    style={"color": "#117733", "marker": "s", "linestyle": "--"},
    modes=("global",),
    communicates="model weights (both directions)",
    Params=Params,
    Client=Client,
    Server=Server,
    model_wrapper=model_wrapper,
)
