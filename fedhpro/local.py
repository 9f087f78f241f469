"""Local training: what a method's client sees of the engine, and how a round's clients are trained.

`Context` (everything a method may read, built once per run), `ClientData` (one client's tensors),
`ClientBase` (the client hooks and the sequential local-training loop), the execution switches
(`precision`, `channels_last`) and the derived seeds. `LocalTraining` is the interface of the two
local-training strategies: `fedhpro.engine.SequentialTraining` (one client after another on a reused
working model) and `fedhpro.batched.BatchedTraining` (`engine: batched`, clients stacked under vmap).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from fedhpro.augment import apply_augment
from fedhpro.errors import ConfigError
from fedhpro.faults import fault_point
from fedhpro.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

if TYPE_CHECKING:  # an annotation only: fedhpro.config asks the batched engine (which imports this module)
    from torch import nn

    from fedhpro.config import RunConfig


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
def autocast_dtype(precision: str) -> "torch.dtype | None":
    """The autocast dtype of `precision` (None: fp32, no autocast); a function so that importing needs no torch."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(ctx: "Context") -> contextlib.AbstractContextManager:
    """`torch.autocast` on the run device with the dtype of `precision`; a no-op context for fp32."""
    dtype = autocast_dtype(ctx.cfg.precision)
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


def check_compile(mode: str, device: torch.device) -> None:
    """Refuse a `compile` mode the resolved device cannot run: reduce-overhead is torch.compile with CUDA graphs,
    which a CPU would silently run as `default` (a switch that changes nothing must not be offered)."""
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"config key 'compile': 'reduce-overhead' (CUDA graphs) needs a CUDA device, not "
                          f"{device.type!r}; use 'default' or 'none'")


def training_forward(ctx: "Context", model: nn.Module) -> nn.Module:
    """What local training calls the model through: the model itself (`compile: none`), or its `torch.compile`d
    wrapper, made once per model object of the run (the engine's working models persist, so each architecture is
    compiled once; a new batch size recompiles once, then dynamically). The wrapper shares the model's parameters
    and buffers and passes attribute access through, so a method's loss may still call `model.features` or
    `model.classifier` (eagerly); only `model(x)` runs compiled. Evaluation, `setup` and `upload` use the model."""
    mode = ctx.cfg.compile
    if mode == "none":
        return model
    compiled = ctx.compiled_models.get(id(model))
    if compiled is None:  # the cache holds the wrapper, which holds the model: its id is never reused meanwhile
        # Past its recompile limit, torch.compile would silently run the model eagerly (other numbers than a
        # compiled run): make that an error instead (the option's name in torch 2.11-2.14, and its older one).
        import torch._dynamo.config as dynamo_config

        for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
            if name in dynamo_config._config:
                setattr(dynamo_config, name, True)
                break
        compiled = ctx.compiled_models[id(model)] = torch.compile(model, mode=mode)
    return compiled


def uses_channels_last(ctx: "Context") -> bool:
    """`channels_last` applies to image runs only (4-D conv inputs); token-id runs ignore it."""
    return bool(ctx.cfg.channels_last) and ctx.mean is not None


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


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
    # The method's model wrapper (its declared `Method.model_wrapper(ctx)`, see `install_model_wrapper`).
    model_wrapper: Callable[[nn.Module], nn.Module] | None = None
    # `compile` != none: each model's torch.compile wrapper, by id(model) (`training_forward`)
    compiled_models: dict[int, nn.Module] = field(default_factory=dict)

    def install_model_wrapper(self, method: Any) -> None:
        """Apply the method's model hook to every model this context builds (server, working and frozen
        copies alike): `model_wrapper(ctx)`, when the method (`fedhpro.methods.Method`) declares it, returns a function that turns a
        project model into the method's (MOON's projection head, GFPL's dual classifier); `feature_dim`
        becomes the wrapped model's. Called once, when the run's context is built, before any model exists."""
        hook = method.model_wrapper
        self.model_wrapper = hook(self) if hook is not None else None
        if self.model_wrapper is not None:
            with torch.random.fork_rng(devices=[]):  # a probe: the run's random stream is not touched
                self.feature_dim = self.model_wrapper(self._model_factory(self.model_names[0])).feature_dim

    def make_model(self, name: str | None = None) -> nn.Module:
        """A fresh model on the run device (its 4-D weights channels-last with `channels_last`), wrapped by the
        method's `model_wrapper` where it has one."""
        assert self._model_factory is not None
        model = self._model_factory(name or self.model_names[0])
        if self.model_wrapper is not None:
            model = self.model_wrapper(model)
        model = model.to(self.device)
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


# Which devices check every local step's loss for NaN/Inf at once (a host sync per step: free on the CPU, where
# it keeps the exact step a divergence stops at) rather than once per epoch (GPUs, where a sync per step would
# stall the kernel queue). Tests set it to force the per-epoch path on the CPU.
STEP_CHECK_DEVICES: tuple[str, ...] = ("cpu",)


def check_each_step(device: torch.device) -> bool:
    return device.type in STEP_CHECK_DEVICES


def keeps_batch(size: int, n: int) -> bool:
    """The one rule for which mini-batches of an epoch over `n` samples are trained: all but a batch of a
    single sample (BatchNorm cannot normalise one sample once the spatial size reaches 1x1; a deliberate,
    rare deviation from the official loader), unless the client has only that one sample. (So `batch_size: 1`
    would train nothing on a client of two or more samples: `RunConfig.batch_size` is at least 2.)"""
    return size != 1 or n <= 1


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of the batches `batches(n, batch_size, ...)` yields in one epoch, in order (steps and samples
    counted without drawing a permutation: `fedhpro.batched.steps_per_round`, the benchmark's sample count)."""
    sizes = (min(batch_size, n - start) for start in range(0, n, batch_size))
    return [size for size in sizes if keeps_batch(size, n)]


def batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device):
    """Shuffled mini-batch index tensors; the last partial batch is kept (as the official loader), unless
    `keeps_batch` drops it (a trailing batch of a single sample)."""
    perm = torch.randperm(n, generator=gen).to(device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if not keeps_batch(idx.numel(), n):
            continue
        yield idx


class ClientBase:
    """Local training shared by all methods. Override the hooks (`setup`, `start_epoch`, `loss`, `before_step`,
    `upload`) as needed.

    ONE instance serves EVERY client of a run: the engine calls the hooks for one client after another.
    - `self` holds what is per run and shared by all clients (`ctx`, `cfg`, `params`, frozen helper models
      built once), plus scratch values that `setup` sets for the client being trained now and the other
      hooks of the same local training read (received prototypes, accumulators). Nothing on `self` may carry
      over from one client to the next: `setup` overwrites it every time.
    - `state` (a dict passed to `setup` and `upload`) is the client's own, kept between the rounds it is
      sampled in (`client_store` memory or disk, and in checkpoints): its personalised model (`"model"`,
      owned by the engine), MOON's previous model, FedSA's previous prototypes. Tensors and plain containers
      only (checkpoints load with weights_only=True).

    Declarations the engines read instead of inspecting the hooks:
    - `UPLOAD_METADATA`: keys of `upload()`'s dict that are header metadata, not payload (class ids of
      prototype rows): not counted in `bytes_up` (`fedhpro.payload.tensor_bytes`);
    - `PROXIMAL_MU`: the name of the `Params` field that is mu when `before_step` adds mu (w - w_start) to the
      gradients and `setup` only records w_start (FedProx), else None. Declared on the class, so validation
      asks the class (`fedhpro.batched.check_batchable`) without building a client: `engine: batched`
      reproduces exactly that proximal term and refuses any other override of the hooks.
    """

    UPLOAD_METADATA: tuple[str, ...] = ()
    PROXIMAL_MU: str | None = None

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.params = ctx.params

    # ---- hooks -------------------------------------------------------------
    def setup(self, client: ClientData, model: nn.Module, payload: dict, state: dict, gen: torch.Generator,
              round_idx: int) -> None:
        """Before local training in round `round_idx` (from 1), e.g. read prototypes from the payload."""

    def start_epoch(self, round_idx: int, epoch: int) -> None:
        """Before each local epoch (`epoch` from 0 to local_epochs - 1) of round `round_idx` (from 1)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, logits = model(x)
        return F.cross_entropy(logits, y)

    def before_step(self, model: nn.Module) -> None:
        """After backward, before the optimiser step (e.g. FedProx's proximal gradient)."""

    def upload(self, client: ClientData, model: nn.Module, state: dict, round_idx: int) -> dict:
        """What the client sends in round `round_idx` besides its weights (global mode) and sample count."""
        return {}

    def proximal_mu(self) -> float | None:
        """mu of the declared proximal `before_step` (`PROXIMAL_MU`, see the class docstring); None: none."""
        return None if self.PROXIMAL_MU is None else getattr(self.params, self.PROXIMAL_MU)

    # ---- the loop ----------------------------------------------------------
    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def train(self, client: ClientData, model: nn.Module, payload: dict, state: dict,
              gen: torch.Generator, *, round_idx: int) -> tuple[dict, float]:
        """Local training. `setup` and `upload` run in fp32; the forward pass and loss under `precision`'s
        autocast. fp16 scales the loss (`torch.amp.GradScaler`): gradients are unscaled before
        `before_step` (FedProx adds its proximal term to true gradients), and a step whose gradients
        overflowed is skipped and the scale lowered, as GradScaler does. The divergence check looks at the
        unscaled loss, which a gradient overflow never touches: only a non-finite forward value stops a run."""
        self.setup(client, model, payload, state, gen, round_idx)
        model.train()
        optimizer = self.make_optimizer(model)
        scaler = make_grad_scaler(self.ctx)
        # The loss sum stays on the device (float64: the same IEEE additions as Python floats, so train_loss is
        # bit-identical to summing `loss.item()`), so a GPU step needs no host synchronisation. On a GPU the
        # divergence check is made once per epoch instead of per step (`check_each_step`): a non-finite loss
        # still stops the client in the same round, with the same message, after the epoch's remaining steps.
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        count = 0
        each_step = check_each_step(self.ctx.device)
        forward = training_forward(self.ctx, model)  # the model, or its torch.compile wrapper (`compile`)
        for epoch in range(self.cfg.local_epochs):
            self.start_epoch(round_idx, epoch)
            first_bad: torch.Tensor | None = None
            for idx in batches(client.num_samples, self.cfg.batch_size, gen, self.ctx.device):
                x = self.ctx.prepare(client.x[idx], train=True, gen=gen)
                with autocast_context(self.ctx):
                    loss = self.loss(forward, x, client.y[idx])
                if each_step:
                    if not torch.isfinite(loss):
                        raise Diverged(f"client {client.cid}: loss is {loss.item()}")
                elif first_bad is None:  # remember the first non-finite loss without a host sync
                    first_bad = torch.where(torch.isfinite(loss), torch.zeros_like(loss), loss.detach())
                else:
                    first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss), loss.detach(), first_bad)
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
                total += loss.detach().double() * idx.numel()
                count += idx.numel()
            if first_bad is not None and bool(first_bad != 0):  # one sync per epoch
                raise Diverged(f"client {client.cid}: loss is {first_bad.item()}")
        return self.upload(client, model, state, round_idx), total.item() / max(count, 1)


class LocalTraining(Protocol):
    """A local-training strategy: trains a round's sampled clients from the broadcast `payload`.

    `train_clients` returns, in sampling order, each client's upload (`num_samples`, `cid`, the method's
    `upload()` entries, and `weights` in global mode) and its mean training loss; it updates and releases
    the clients' states (`Engine.client_states`)."""

    def train_clients(self, round_idx: int, selected: list[int], payload: dict) -> tuple[list[dict], list[float]]:
        ...
