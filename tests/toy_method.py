"""A toy method for tests/test_method_contract.py: FedAvg plus one extra loss term (an L2 penalty on the
features). Registered only inside that test, it shows that a new method is one file (ending in its `METHOD`
declaration) plus its registry line and that the contract test covers it with no other test file touched."""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param

torch = lazy_module("torch")  # a method file imports without torch (tests/test_torch_free.py)
F = lazy_module("torch.nn.functional")


@dataclass(frozen=True)
class Params:
    penalty: float = param(0.01, "weight of the mean squared feature norm added to the CE loss", low=0.0)


class Client(ClientBase):
    def loss(self, model, x, y) -> torch.Tensor:
        features, logits = model(x)
        return F.cross_entropy(logits, y) + self.params.penalty * features.pow(2).mean()


class Server(ServerBase):
    pass


METHOD = Method(
    name="toy",
    paper="toy: FedAvg with a feature L2 penalty (tests only)",
    display="Toy",
    order=99,
    style={"color": "#000000", "marker": "o"},
    modes=("global",),
    communicates="model weights (both directions)",
    Params=Params,
    Client=Client,
    Server=Server,
)
