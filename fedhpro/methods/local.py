"""Local: every client trains its own model alone, with no communication at all.

The reference row of every personalized table in FedProto (Tan et al., AAAI 2022, Table 1 "Local"),
GFPL and the HtFLlib family: the same local optimiser, epochs and rounds as the federated methods, but
nothing is broadcast and nothing uploaded (0 bytes in both directions), so each client's accuracy on its
local test set measures what its own data alone gives. Personalized mode only (there is no global model).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, ServerBase
from fedhpro.methods import Method


@dataclass(frozen=True)
class Params:
    pass


class Client(ClientBase):
    """Plain cross-entropy on the client's own data; `upload` sends nothing (the base class's {})."""


class Server(ServerBase):
    """No global model in personalized mode (`ServerBase` builds none): broadcast {} and aggregate nothing."""

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        if any(set(u) - {"num_samples", "cid"} for u in uploads):  # the engine's header only; a payload is a bug
            raise RuntimeError("local: a client uploaded a payload, but Local training communicates nothing")


METHOD = Method(
    name="local",
    paper="Local training baseline (no communication), as in Tan et al., FedProto, AAAI 2022",
    display="Local",
    order=0,
    style={"color": "#BBBBBB", "marker": "x", "linestyle": "-."},
    modes=("personalized",),
    communicates="nothing",
    Params=Params,
    Client=Client,
    Server=Server,
    heterogeneous_models=True,  # nothing is exchanged, so clients" architectures need not agree
)
