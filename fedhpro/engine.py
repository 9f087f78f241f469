"""The shared federated round engine.

One loop serves every method: sample clients, broadcast the server payload,
train each sampled client locally, aggregate, evaluate, account communication.
A method plugs in with a small `Client` (subclass of `ClientBase`: the local
loss and what to upload) and a small `Server` (subclass of `ServerBase`: what
to broadcast and how to aggregate), in the style of FL-bench.

Client data stays tensor-resident on the run device; batches are indexed,
normalised and augmented on the fly, so no DataLoader is ever built.

Randomness is derived, never shared: round r's global torch seed and client
k's generator are functions of (seed, r, k), and client sampling uses the
official `RandomState(seed).choice` stream whose state is checkpointed. A run
resumed from a round-boundary checkpoint therefore replays exactly.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedhpro.augment import apply_augment
from fedhpro.clientstore import make_client_store
from fedhpro.config import ConfigError, RunConfig
from fedhpro.faults import fault_point


class Diverged(RuntimeError):
    """A loss became NaN or infinite."""


# ---- execution switches: `precision` and `channels_last` -----------------------------------------------
# What runs under autocast (`precision: bf16 | fp16`): the local-training forward pass and loss
# (`ClientBase.train`, around `Client.loss`) and evaluation (`evaluate`, around the score function). Everything
# else stays fp32: client-side `setup`/`upload` (FedHPro's and CReFF's per-class client gradients, prototype
# passes, GFPL's head re-training), and every server step (federated-feature and hyper-prototype gradient
# matching, classifier re-training, FedTGP's generator). The gradient matching compares small per-class
# gradients whose low-precision rounding (bf16: 8 significant bits) would dominate the distance being
# minimised, and the server steps are tiny matrix products where low precision saves nothing.
# With the defaults (fp32, channels_last false) none of this changes a single operation.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(ctx: "Context") -> contextlib.AbstractContextManager:
    """`torch.autocast` on the run device with the dtype of `precision`; a no-op context for fp32."""
    dtype = AUTOCAST_DTYPES[ctx.cfg.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=dtype)


def make_grad_scaler(ctx: "Context") -> "torch.amp.GradScaler | None":
    """fp16 only: a fresh loss scaler per local training (like the fresh optimiser), so a client's steps never
    depend on another client's, or on rounds before a checkpoint (resumes stay exact)."""
    return torch.amp.GradScaler(ctx.device.type) if ctx.cfg.precision == "fp16" else None


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a `precision` the resolved device cannot run (checked once the device is known: `device: auto`
    may become a GPU). CPUs run bf16 and fp16 autocast (emulated without bf16/fp16 instructions, so slowly);
    a GPU without bf16 would make torch disable autocast with a warning, i.e. silently train in fp32."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"config key 'precision': 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                          "use 'fp16' or 'fp32'")


def uses_channels_last(ctx: "Context") -> bool:
    """`channels_last` applies to image runs only (4-D conv inputs); token-id runs ignore it."""
    return bool(ctx.cfg.channels_last) and ctx.mean is not None


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) payload: what would travel over the wire.

    Header metadata is not counted: the sample count, the client id, and index tensors under keys
    ending in "classes" (which classes the rows belong to), so payload sizes match the papers'
    formulas (e.g. FedProto's upload: local classes x d x 4 bytes).
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for k, v in obj.items()
                   if not (isinstance(k, str) and (k in ("num_samples", "cid") or k.endswith("classes"))))
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@dataclass
class ClientData:
    cid: int
    x: torch.Tensor  # training inputs (uint8 images or token ids), on the run device
    y: torch.Tensor
    test_x: torch.Tensor  # local test split (may be empty)
    test_y: torch.Tensor
    class_counts: torch.Tensor  # (C,) training samples per class
    domain: int | None = None

    @property
    def num_samples(self) -> int:
        return int(self.y.numel())


@dataclass
class Context:
    """Everything a method may read; built once per run."""

    cfg: RunConfig
    params: Any  # the method's frozen Params dataclass
    device: torch.device
    num_classes: int
    in_channels: int
    mean: torch.Tensor | None
    std: torch.Tensor | None
    augment: str
    clients: list[ClientData]
    test_x: torch.Tensor
    test_y: torch.Tensor
    model_names: list[str]  # per client (model heterogeneity), or one name repeated
    feature_dim: int = 0
    test_domain: torch.Tensor | None = None
    domain_names: tuple[str, ...] = ()
    _model_factory: Callable[[str], nn.Module] | None = None

    def make_model(self, name: str | None = None) -> nn.Module:
        """A fresh model on the run device (its 4-D weights channels-last with `channels_last`)."""
        assert self._model_factory is not None
        model = self._model_factory(name or self.model_names[0]).to(self.device)
        if uses_channels_last(self):
            model = model.to(memory_format=torch.channels_last)  # converts 4-D (conv) weights only
        return model

    def prepare(self, x: torch.Tensor, *, train: bool, gen: torch.Generator | None = None) -> torch.Tensor:
        """uint8 batch -> normalised float batch (augmented when training; channels-last with `channels_last`)."""
        if self.mean is None:  # not images (e.g. token ids)
            return x
        out = (x.float() / 255.0 - self.mean) / self.std
        if train and self.augment != "none":
            assert gen is not None
            out = apply_augment(self.augment, out, gen, per_sample=self.cfg.augment_per == "sample")
        if uses_channels_last(self) and out.dim() == 4:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device):
    """Shuffled mini-batch index tensors; the last partial batch is kept (as the official loader).

    A trailing batch of a single sample is dropped: BatchNorm cannot normalise
    one sample once the spatial size reaches 1x1 (deliberate, rare deviation).
    """
    perm = torch.randperm(n, generator=gen).to(device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if idx.numel() == 1 and n > 1:
            continue
        yield idx


class ClientBase:
    """Local training shared by all methods. Override `loss`, `setup`, `upload` as needed."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.params = ctx.params

    # ---- hooks -------------------------------------------------------------
    def setup(self, client: ClientData, model: nn.Module, payload: dict, state: dict, gen: torch.Generator) -> None:
        """Before local training (e.g. read prototypes from the payload)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, logits = model(x)
        return F.cross_entropy(logits, y)

    def before_step(self, model: nn.Module) -> None:
        """After backward, before the optimiser step (e.g. FedProx's proximal gradient)."""

    def upload(self, client: ClientData, model: nn.Module, state: dict) -> dict:
        """What the client sends besides its weights (global mode) and sample count."""
        return {}

    # ---- the loop ----------------------------------------------------------
    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def train(self, client: ClientData, model: nn.Module, payload: dict, state: dict,
              gen: torch.Generator) -> tuple[dict, float]:
        """Local training. `setup` and `upload` run in fp32; the forward pass and loss under `precision`'s
        autocast. fp16 scales the loss (`torch.amp.GradScaler`): gradients are unscaled before
        `before_step` (FedProx adds its proximal term to true gradients), and a step whose gradients
        overflowed is skipped and the scale lowered, as GradScaler does. The divergence check looks at the
        unscaled loss, which a gradient overflow never touches: only a non-finite forward value stops a run."""
        self.setup(client, model, payload, state, gen)
        model.train()
        optimizer = self.make_optimizer(model)
        scaler = make_grad_scaler(self.ctx)
        total, count = 0.0, 0
        for _ in range(self.cfg.local_epochs):
            for idx in batches(client.num_samples, self.cfg.batch_size, gen, self.ctx.device):
                x = self.ctx.prepare(client.x[idx], train=True, gen=gen)
                with autocast_context(self.ctx):
                    loss = self.loss(model, x, client.y[idx])
                if not torch.isfinite(loss):
                    raise Diverged(f"client {client.cid}: loss is {loss.item()}")
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    self.before_step(model)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    self.before_step(model)
                    scaler.step(optimizer)  # skipped when a gradient is inf/NaN
                    scaler.update()
                fault_point("batch")
                total += loss.detach().item() * idx.numel()
                count += idx.numel()
        return self.upload(client, model, state), total / max(count, 1)


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
    """Holds the global model (global mode) and the method's server state."""

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

    # ---- checkpointing: tensors and plain containers only (loaded with weights_only=True)
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict() if self.model is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.model is not None:
            self.model.load_state_dict(state["model"])


@dataclass
class RoundResult:
    round: int
    selected: list[int]
    train_loss: float
    test_acc: float = float("nan")
    test_loss: float = float("nan")
    client_acc_mean: float = float("nan")
    client_acc_std: float = float("nan")
    domain_acc: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    time_local: float = 0.0
    time_server: float = 0.0
    time_eval: float = 0.0


@torch.no_grad()
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


class Engine:
    """Runs rounds; owns per-client persistent state and the client-sampling RNG."""

    def __init__(self, ctx: Context, method_module: Any, client_dir: str | Path | None = None):
        """`client_dir`: where `client_store: disk` keeps client states (a temporary directory if None)."""
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.server: ServerBase = method_module.Server(ctx)
        self.client: ClientBase = method_module.Client(ctx)
        self.client_states = make_client_store(self.cfg.client_store, client_dir)
        self.sampler = np.random.RandomState(self.cfg.seed)  # official: RandomState(seed).choice per round
        # One reusable working model per architecture, built now: building one lazily inside a round
        # would consume global RNG draws there and break bit-identical resumes.
        self._work_models = {name: ctx.make_model(name) for name in dict.fromkeys(ctx.model_names)}
        self._batched = None  # `engine: batched`: clients trained together (fedhpro.batched)
        if self.cfg.engine == "batched":
            from fedhpro.batched import BatchedClients

            self._batched = BatchedClients(self)

    # ---- per-client models -------------------------------------------------------------------
    def working_models(self) -> list[nn.Module]:
        """The reusable working model of each architecture, which every client's local training runs on."""
        return list(self._work_models.values())

    def _model_for(self, cid: int) -> nn.Module:
        return self._work_models[self.ctx.model_names[cid]]

    def _initial_personal_state(self, cid: int) -> dict[str, torch.Tensor]:
        # Independent initialisation per client, reproducible from (seed, client).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, 7, cid))
            return {k: v.cpu() for k, v in self.ctx.make_model(self.ctx.model_names[cid]).state_dict().items()}

    # ---- one round -------------------------------------------------------------------------------
    def run_round(self, r: int) -> RoundResult:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(derive_seed(cfg.seed, r))
        # Official: RandomState(seed).choice(num_clients, k, replace=False) every round, clients trained in
        # the returned order (a permutation even under full participation).
        selected = [int(c) for c in self.sampler.choice(cfg.num_clients, cfg.effective_clients_per_round,
                                                        replace=False)]
        result = RoundResult(round=r, selected=selected, train_loss=0.0)
        t0 = time.perf_counter()
        payload = self.server.broadcast(r)
        down = tensor_bytes(payload)
        uploads, losses = [], []
        if self._batched is not None:
            uploads, losses = self._batched.train_round(r, selected, payload)
            for upload in uploads:
                result.bytes_up += tensor_bytes(upload)
                result.bytes_down += down
                self.client_states.release(upload["cid"], r)
        for cid in selected if self._batched is None else ():
            client = ctx.clients[cid]
            state = self.client_states.setdefault(cid, {})
            model = self._model_for(cid)
            if cfg.eval_mode == "global":
                model.load_state_dict(payload["weights"])
            else:
                if "model" not in state:
                    state["model"] = self._initial_personal_state(cid)
                model.load_state_dict(state["model"])
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, r, cid))
            extra, loss = self.client.train(client, model, payload, state, gen)
            upload = {"num_samples": client.num_samples, "cid": cid, **extra}
            if cfg.eval_mode == "global":
                upload["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.client_states.release(cid, r)
            result.bytes_up += tensor_bytes(upload)
            result.bytes_down += down
            uploads.append(upload)
            losses.append(loss)
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
        if cfg.eval_mode == "personalized":
            accs = []
            for client in ctx.clients:
                if client.test_y.numel() == 0:
                    continue
                # A client never sampled is evaluated with its initial model, rebuilt from (seed, client) and
                # not stored, so memory and checkpoints follow the participating clients only.
                state = self.client_states.get(client.cid) or {}
                m = self._model_for(client.cid)
                m.load_state_dict(state["model"] if "model" in state else self._initial_personal_state(client.cid))
                m.eval()
                correct, _ = evaluate(lambda x: self.server.scores(m, x), ctx, client.test_x, client.test_y,
                                      cfg.test_batch_size)
                accs.append(correct.float().mean().item())
            if accs:
                result.client_acc_mean = float(np.mean(accs))
                result.client_acc_std = float(np.std(accs))

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

