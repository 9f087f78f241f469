"""FedAvg (McMahan et al., AISTATS 2017): local CE training, sample-weighted weight averaging.

We average the whole state_dict including BatchNorm buffers, as the FedHPro,
MOON and RethinkFL code do (PFLlib averages parameters only).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, ServerBase

PAPER = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017"
MODES = ("global",)
ENGINES = ("sequential", "batched")
HETEROGENEOUS_MODELS = False
COMMUNICATES = "model weights (both directions)"


@dataclass(frozen=True)
class Params:
    pass


class Client(ClientBase):
    pass


class Server(ServerBase):
    pass
