"""FedAvg (McMahan et al., AISTATS 2017): local CE training, sample-weighted weight averaging.

We average the whole state_dict including BatchNorm buffers, as the FedHPro,
MOON and RethinkFL code do (PFLlib averages parameters only).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, ServerBase
from fedhpro.methods import Method


@dataclass(frozen=True)
class Params:
    pass


class Client(ClientBase):
    pass


class Server(ServerBase):
    pass


METHOD = Method(
    name="fedavg",
    paper="McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017",
    display="FedAvg",
    order=1,
    style={"color": "#332288", "marker": "o", "linestyle": "-"},
    modes=("global",),
    communicates="model weights (both directions)",
    Params=Params,
    Client=Client,
    Server=Server,
    engines=("sequential", "batched"),
)
