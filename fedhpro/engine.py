"""The shared federated round engine.

One loop serves every method: sample clients, broadcast the server payload,
train each sampled client locally, aggregate, evaluate, account communication.
A method plugs in with a small `Client` (subclass of `ClientBase`, in
`fedhpro.local`: the local loss and what to upload) and a small `Server`
(subclass of `ServerBase`: what to broadcast and how to aggregate, its
checkpointed `STATE`), in the style of FL-bench; the method module declares
what it supports (`fedhpro.methods`). The engine owns everything else:
sampling, seeds, the local-training strategy (`SequentialTraining` here,
`fedhpro.batched.BatchedTraining` for `engine: batched`), communication
accounting (`fedhpro.payload`), client state and checkpoints.

Client data stays tensor-resident on the run device; batches are indexed,
normalised and augmented on the fly, so no DataLoader is ever built.

Randomness is derived, never shared: round r's global torch seed and client
k's generator are functions of (seed, r, k), and client sampling uses the
official `RandomState(seed).choice` stream whose state is checkpointed. A run
resumed from a round-boundary checkpoint therefore replays exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedhpro.batched import BatchedTraining
from fedhpro.clientstore import make_client_store
from fedhpro.diagnostics import ClassSignal, LocalPrototypes, weighted_accuracy
from fedhpro.faults import fault_point
from fedhpro.lazy import lazy_module, no_grad
# The client side of the contract lives in `fedhpro.local`; methods import it from here.
from fedhpro.local import (ClientBase, ClientData, Context, Diverged, LocalTraining,  # noqa: F401
                           autocast_context, batches, check_compile, check_precision, derive_seed, make_grad_scaler,
                           uses_channels_last)
from fedhpro.payload import ENGINE_METADATA, tensor_bytes  # noqa: F401

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nn = lazy_module("torch.nn")


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of whole state_dicts (BN buffers included, as FedHPro/MOON do).

    Integer buffers (`num_batches_tracked`) are averaged as floats and truncated
    back, which is what loading the official code's float average does.
    """
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        acc = sum(s[key].double() * w for s, w in zip(states, weights)) / total
        out[key] = acc.to(ref.dtype)
    return out


class ServerBase:
    """Holds the global model (global mode) and the method's server state.

    Declarations:
    - `STATE`: attribute names (dotted paths allowed, e.g. "federated.features") of the server state that a
      checkpoint saves and a resume restores, besides the global model: tensors (restored onto the device of
      the attribute's current value), modules (their state_dict), and plain values or containers of tensors
      (None, numbers, dicts; tensors restored onto the run device). Each class declares its own names;
      `ServerBase` saves those of every class in the MRO. Diagnostics that do not affect later rounds stay out.
    - `BROADCAST_METADATA`: keys of `broadcast()`'s payload that are header metadata (class ids), not
      counted in `bytes_down`.
    """

    STATE: tuple[str, ...] = ()
    BROADCAST_METADATA: tuple[str, ...] = ()

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.params = ctx.params
        self.model = ctx.make_model() if ctx.cfg.eval_mode == "global" else None

    def broadcast(self, round_idx: int) -> dict:
        """The payload every sampled client receives."""
        return {"weights": self.model.state_dict()} if self.model is not None else {}

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        if self.model is not None:
            self.model.load_state_dict(self.aggregate_weights(uploads))

    def aggregate_weights(self, uploads: list[dict]) -> dict[str, torch.Tensor]:
        """The new global state_dict from the round's uploads, in sampling order (global mode): the
        sample-weighted mean (`fedavg`) by default; a method overrides this hook to aggregate otherwise."""
        return fedavg([u["weights"] for u in uploads], [u["num_samples"] for u in uploads])

    def eval_model(self) -> nn.Module | None:
        return self.model

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Class scores for evaluation of `model` (the global or a client's): classifier logits by default;
        prototype methods override (e.g. nearest global prototype)."""
        return model(x)[1]

    def global_class_signal(self) -> ClassSignal | None:
        """Prototype diagnostics (`fedhpro.diagnostics`): the method's global class signal as (C x d rows,
        (C,) presence mask), or None (the default: not a prototype method, or no signal yet)."""
        return None

    # ---- checkpointing: tensors and plain containers only (loaded with weights_only=True)
    def state_names(self) -> list[str]:
        """The `STATE` names of every class of this server, base classes first."""
        names: dict[str, None] = {}
        for cls in reversed(type(self).__mro__):
            names.update(dict.fromkeys(cls.__dict__.get("STATE", ())))
        return list(names)

    def state_dict(self) -> dict:
        out = {"model": self.model.state_dict() if self.model is not None else None}
        for name in self.state_names():
            value = _get_path(self, name)
            out[name] = value.state_dict() if isinstance(value, nn.Module) else value
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = [name for name in self.state_names() if name not in state]
        if missing:  # e.g. a checkpoint written before the method declared this state
            raise RuntimeError(f"checkpoint lacks the server state {', '.join(missing)} of this method (written by "
                               "an older version?); delete checkpoint.pt to restart the run")
        if self.model is not None:
            self.model.load_state_dict(state["model"])
        for name in self.state_names():
            current, saved = _get_path(self, name), state[name]
            if isinstance(current, nn.Module):
                current.load_state_dict(saved)
            elif isinstance(current, torch.Tensor):
                _set_path(self, name, saved.to(current.device))
            else:
                _set_path(self, name, _to_device(saved, self.ctx.device))


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    setattr(_get_path(obj, ".".join(parents)) if parents else obj, last, value)


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside plain containers moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


@dataclass
class RoundResult:
    round: int
    selected: list[int]
    train_loss: float
    test_acc: float = float("nan")
    test_loss: float = float("nan")
    client_acc_mean: float = float("nan")
    client_acc_std: float = float("nan")
    client_acc_weighted: float = float("nan")  # total correct / total local test samples (HtFLlib)
    proto_sep_mean_deg: float = float("nan")  # prototype diagnostics (fedhpro.diagnostics.DIAGNOSTIC_COLUMNS)
    proto_sep_min_deg: float = float("nan")
    proto_consistency: float = float("nan")
    proto_cons_centred: float = float("nan")
    proto_margin: float = float("nan")
    proto_nearest: float = float("nan")
    proto_agree: float = float("nan")
    proto_agree_nearest: float = float("nan")
    # per client (client id, correct, local test size) on evaluated rounds: personalized mode, and global mode
    # when clients hold local test splits (the global model on each split); `fedhpro.train` stores them
    client_results: list[tuple[int, int, int]] = field(default_factory=list)
    domain_acc: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    time_local: float = 0.0
    time_server: float = 0.0
    time_eval: float = 0.0


@no_grad
def evaluate(score_fn: Callable[[torch.Tensor], torch.Tensor], ctx: Context, x: torch.Tensor, y: torch.Tensor,
             batch_size: int) -> tuple[torch.Tensor, float]:
    """Per-sample correctness and mean CE loss of `score_fn` on (x, y); scores under `precision`'s autocast,
    the CE in fp32."""
    correct = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    loss_sum = 0.0
    for start in range(0, len(y), batch_size):
        with autocast_context(ctx):
            scores = score_fn(ctx.prepare(x[start:start + batch_size], train=False))
        target = y[start:start + batch_size]
        correct[start:start + batch_size] = scores.argmax(1) == target
        loss_sum += F.cross_entropy(scores.float(), target, reduction="sum").item()
    return correct, loss_sum / max(len(y), 1)


class ClientModels:
    """The models clients train and are evaluated on: one reusable working model per architecture (built when the
    run starts), loaded with a client's weights before use, and each client's initial personal weights."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._work = {name: ctx.make_model(name) for name in dict.fromkeys(ctx.model_names)}

    def working(self) -> list[nn.Module]:
        """The working model of each architecture."""
        return list(self._work.values())

    def for_client(self, cid: int) -> nn.Module:
        """The working model of client `cid`'s architecture."""
        return self._work[self.ctx.model_names[cid]]

    def initial_state(self, cid: int) -> dict[str, torch.Tensor]:
        """Client `cid`'s initial personal weights (personalized mode), on the CPU: an independent initialisation
        per client, reproducible from (seed, client), drawn without touching the run's random stream."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.cfg.seed, 7, cid))
            return {k: v.cpu() for k, v in self.ctx.make_model(self.ctx.model_names[cid]).state_dict().items()}


class Engine:
    """Runs rounds; owns per-client persistent state and the client-sampling RNG."""

    def __init__(self, ctx: Context, method: Any, client_dir: str | Path | None = None):
        """`method`: the method's declaration (`fedhpro.methods.Method`; anything with its `Client` and `Server`);
        `client_dir`: where `client_store: disk` keeps client states (a temporary directory if None)."""
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.server: ServerBase = method.Server(ctx)
        self.client: ClientBase = method.Client(ctx)
        self.upload_metadata = ENGINE_METADATA + tuple(self.client.UPLOAD_METADATA)
        self.client_states = make_client_store(self.cfg.client_store, client_dir)
        self.sampler = np.random.RandomState(self.cfg.seed)  # official: RandomState(seed).choice per round
        # built now, in this order: building a model lazily inside a round would consume global RNG draws
        # there and break bit-identical resumes
        self.models = ClientModels(ctx)
        self.local: LocalTraining = LOCAL_TRAINING[self.cfg.engine](ctx, self.client, self.client_states, self.models)
        # Per-client results of the evaluated rounds so far (`fedhpro.train`: rows of clients.parquet, kept in
        # the checkpoint); None after resuming a checkpoint written before they were stored.
        self.client_rows: list[dict] | None = []

    def working_models(self) -> list[nn.Module]:
        """The reusable working model of each architecture, which every client's local training runs on."""
        return self.models.working()

    # ---- one round -------------------------------------------------------------------------------
    def run_round(self, r: int) -> RoundResult:
        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.seed, r))
        # Official: RandomState(seed).choice(num_clients, k, replace=False) every round, clients trained in
        # the returned order (a permutation even under full participation).
        selected = [int(c) for c in self.sampler.choice(cfg.num_clients, cfg.effective_clients_per_round,
                                                        replace=False)]
        result = RoundResult(round=r, selected=selected, train_loss=0.0)
        t0 = time.perf_counter()
        payload = self.server.broadcast(r)
        down = tensor_bytes(payload, self.server.BROADCAST_METADATA)
        uploads, losses = self.local.train_clients(r, selected, payload)
        for upload in uploads:
            result.bytes_up += tensor_bytes(upload, self.upload_metadata)
            result.bytes_down += down
        result.train_loss = float(np.mean(losses))
        t1 = time.perf_counter()
        self.server.aggregate(r, uploads)
        fault_point("server")
        t2 = time.perf_counter()
        result.time_local, result.time_server = t1 - t0, t2 - t1
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            self.evaluate_into(result)
        result.time_eval = time.perf_counter() - t2
        return result

    def evaluate_into(self, result: RoundResult) -> None:
        cfg, ctx = self.cfg, self.ctx
        # diagnostics draw no random numbers and change no state: skipping them on some rounds changes nothing else
        diagnose = cfg.diagnostics and (result.round % cfg.diagnostics_every == 0 or result.round == cfg.rounds)
        signal = self.server.global_class_signal() if diagnose else None
        local = LocalPrototypes(signal, ctx, cfg.test_batch_size) if diagnose else None
        model = self.server.eval_model()
        if model is not None:
            model.eval()
            correct, loss = evaluate(lambda x: self.server.scores(model, x), ctx, ctx.test_x, ctx.test_y,
                                     cfg.test_batch_size)
            result.test_acc, result.test_loss = correct.float().mean().item(), loss
            if ctx.test_domain is not None:
                domains = ctx.test_domain
                for d in torch.unique(domains).tolist():
                    result.domain_acc[str(d)] = correct[domains == d].float().mean().item()
            nway_accs: list[float] = []
            for client in ctx.clients:
                if cfg.eval_mode == "global" and client.test_y.numel() > 0:  # the global model on local splits
                    hit, _ = evaluate(lambda x: self.server.scores(model, x), ctx, client.test_x, client.test_y,
                                      cfg.test_batch_size)
                    result.client_results.append((client.cid, int(hit.sum()), int(hit.numel())))
                    nway_accs.append(hit.float().mean().item())
            if local is not None and cfg.eval_mode == "global":  # local prototypes of the global model
                local.add_all(model, ctx.clients)
            if cfg.eval_mode == "global" and cfg.partition == "nway":
                # FedProto's protocol scores FedAvg-style baselines too on every client's local test set
                # (the global model's accuracy per client, then the mean over clients)
                result.client_acc_mean, result.client_acc_std = float(np.mean(nway_accs)), float(np.std(nway_accs))
                result.client_acc_weighted = weighted_accuracy([c for _, c, _ in result.client_results],
                                                               [n for _, _, n in result.client_results])
        if cfg.eval_mode == "personalized":
            accs, corrects, sizes = [], [], []
            for client in ctx.clients:
                if client.test_y.numel() == 0 and local is None:
                    continue
                # A client never sampled is evaluated with its initial model, rebuilt from (seed, client) and
                # not stored, so memory and checkpoints follow the participating clients only.
                state = self.client_states.get(client.cid) or {}
                m = self.models.for_client(client.cid)
                m.load_state_dict(state["model"] if "model" in state else self.models.initial_state(client.cid))
                m.eval()
                if client.test_y.numel() > 0:
                    correct, _ = evaluate(lambda x: self.server.scores(m, x), ctx, client.test_x, client.test_y,
                                          cfg.test_batch_size)
                    accs.append(correct.float().mean().item())
                    corrects.append(int(correct.sum()))
                    sizes.append(int(correct.numel()))
                    result.client_results.append((client.cid, corrects[-1], sizes[-1]))
                if local is not None:  # local prototypes of the client's own model
                    local.add(m, client)
            if accs:
                result.client_acc_mean = float(np.mean(accs))
                result.client_acc_std = float(np.std(accs))
                result.client_acc_weighted = weighted_accuracy(corrects, sizes)
        if local is not None:
            for column, value in local.columns().items():
                setattr(result, column, value)

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = self.sampler.get_state()
        return {
            "server": self.server.state_dict(),
            **self.client_states.state_dict(),  # memory: every state; disk: the index of its files
            "sampler": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.client_states.load_state_dict(state)
        s = state["sampler"]
        self.sampler.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
        torch.set_rng_state(state["torch_rng"])


class SequentialTraining:
    """`engine: sequential`: the sampled clients one after another, each on its architecture's working model
    (loaded with the broadcast weights in global mode, with its own stored model in personalized mode),
    through the method's `Client.train`."""

    def __init__(self, ctx: Context, client: ClientBase, states: Any, models: ClientModels):
        """`states`: the clients' persistent states (`fedhpro.clientstore`); `models`: their working models."""
        self.ctx, self.cfg = ctx, ctx.cfg
        self.client, self.states, self.models = client, states, models

    def train_clients(self, round_idx: int, selected: list[int], payload: dict) -> tuple[list[dict], list[float]]:
        cfg = self.cfg
        uploads, losses = [], []
        for cid in selected:
            client = self.ctx.clients[cid]
            state = self.states.setdefault(cid, {})
            model = self.models.for_client(cid)
            if cfg.eval_mode == "global":
                model.load_state_dict(payload["weights"])
            else:
                if "model" not in state:
                    state["model"] = self.models.initial_state(cid)
                model.load_state_dict(state["model"])
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, round_idx, cid))
            extra, loss = self.client.train(client, model, payload, state, gen, round_idx=round_idx)
            upload = {"num_samples": client.num_samples, "cid": cid, **extra}
            if cfg.eval_mode == "global":
                upload["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.states.release(cid, round_idx)
            uploads.append(upload)
            losses.append(loss)
        return uploads, losses


# `engine` config key -> local-training strategy
# (the strategy gets the run's context, the method's client, the clients' states and models; never the engine)
LOCAL_TRAINING: dict[str, Callable[..., LocalTraining]] = {"sequential": SequentialTraining,
                                                                "batched": BatchedTraining}
