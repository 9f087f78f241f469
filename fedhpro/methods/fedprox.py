"""FedProx (Li et al., MLSys 2020): CE + (mu/2)||w - w_global||^2 on the client.

The proximal term is added as its gradient mu (w - w_global) after backward,
exactly PFLlib's `PerturbedGradientDescent` step and the gradient of MOON's
explicit loss term. mu = 0.01 as in FedHPro's `options.py` and RethinkFL.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param

torch = lazy_module("torch")


@dataclass(frozen=True)
class Params:
    mu: float = param(0.01, "proximal term weight mu", low=0.0)


class Client(ClientBase):
    PROXIMAL_MU = "mu"  # declared, so `engine: batched` reproduces setup/before_step below

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def before_step(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), self.anchor):
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=self.proximal_mu())


class Server(ServerBase):
    pass


METHOD = Method(
    name="fedprox",
    paper="Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020",
    display="FedProx",
    order=2,
    style={"color": "#88CCEE", "marker": "v", "linestyle": "--"},
    modes=("global",),
    communicates="model weights (both directions)",
    Params=Params,
    Client=Client,
    Server=Server,
    engines=("sequential", "batched"),
)
