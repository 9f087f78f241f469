"""`engine: batched`: all sampled clients with one architecture trained in one vectorised computation.

The sequential engine trains the sampled clients one after another with the same working model.
Here the clients' weights, BatchNorm buffers and optimiser state are stacked along a leading
client dimension and every local step is one `torch.func.vmap` over `functional_call` of the
working model (convolutions with per-client weights become grouped convolutions), followed by
one element-wise SGD update of the stacked tensors.

What stays exactly as in `ClientBase.train`:

- each client's `torch.Generator` (seeded from (seed, round, client)) draws its batch permutations
  and augmentations in the same order, so every client sees the same batches as sequentially;
- the loss is each client's own mean CE; the gradient of the sum over clients is every client's
  own gradient (the clients share no parameters);
- BatchNorm: the per-client running mean/var and `num_batches_tracked` are passed to
  `functional_call` as batched buffers, so each client's statistics come from its own batches
  and are updated in place in its own slice (no `replace_all_batch_norm_modules_`, which would
  drop the running statistics);
- SGD (lr, momentum, weight decay) is `torch.optim.SGD`'s single-tensor update, element-wise, so
  stacking does not change it; a declared proximal term adds mu (w - w_global) to the gradient before the step;
- unequal client sizes: clients are laid out by decreasing number of local steps, so at step t the
  clients that still have a t-th batch are a prefix of the stacked tensors and one that has run out
  of batches is never touched again; a step's batches are bucketed by size (`MIN_FILL`: equal sizes
  only on CPU, where padded rows cost as much as real ones; one call on CUDA), and a bucket of
  unequal batches is padded to its largest with the padding masked out of the loss and out of
  BatchNorm's statistics and running-stat updates (`fedhpro.nets.MaskedBatchNorm`).

Results equal the sequential engine's within floating-point tolerance (grouped convolutions and
batched matrix products sum in a different order); `tests/test_batched.py` checks final weights,
BN buffers and metrics. Supported: methods whose module lists "batched" in `ENGINES` (checked
at config validation by `fedhpro.config.check_runnable`) in global mode, one architecture, `precision: fp32`,
`channels_last: false`; a Client that overrides a hook this loop does not reproduce is refused when the engine
is built (`check_batchable`), with a message naming the hook. No method is named here: a proximal
`before_step` is reproduced from the Client class's `PROXIMAL_MU` declaration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

from fedhpro.errors import ConfigError
from fedhpro.faults import fault_point
from fedhpro.lazy import lazy_module
from fedhpro.local import ClientBase, ClientData, Context, Diverged, batch_sizes, batches, derive_seed

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nets = lazy_module("fedhpro.nets")  # MaskedBatchNorm (a TorchFunctionMode)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from fedhpro.engine import ClientModels
    from fedhpro.nets import MaskedBatchNorm

# Padding policy per device: a bucket's smallest batch must be >= MIN_FILL x its largest. On CPU the work
# is compute-bound and padded rows cost as much as real ones (measured: padding everything made FedAvg's
# local time 1.3-2.2x longer, 80% buckets 1.0-1.2x): no padding, equal sizes only. On CUDA one padded
# call per step replaces up to one small kernel sequence per client.
MIN_FILL = {"cpu": 1.0, "cuda": 0.0}


def check_batchable(cfg, client_cls: type[ClientBase], model_names: list[str]) -> None:
    """Raise ConfigError unless `engine: batched` can train this run exactly with the method's Client class
    (asked of the class, no client built; the method's support for the engine is its declared `engines`,
    checked at config validation)."""
    if cfg.eval_mode != "global":
        raise ConfigError(f"config key 'engine': 'batched' needs eval_mode 'global' (method {cfg.method!r})")
    if len(set(model_names)) != 1:
        raise ConfigError("config key 'engine': 'batched' needs identical client models")
    # Autocast, channels-last and torch.compile under vmap's grouped convolutions are not reproduced (nor tested):
    # refused.
    if cfg.precision != "fp32":
        raise ConfigError(f"config key 'precision': engine 'batched' supports 'fp32' only, not {cfg.precision!r}; "
                          "use engine 'sequential'")
    if cfg.channels_last:
        raise ConfigError("config key 'channels_last': engine 'batched' does not support true; use engine "
                          "'sequential'")
    if cfg.compile != "none":
        raise ConfigError(f"config key 'compile': engine 'batched' supports 'none' only, not {cfg.compile!r}; use "
                          "engine 'sequential'")
    # The batched loop re-implements ClientBase.train/loss/make_optimizer: refuse a Client that changed them,
    # except a declared proximal term (`PROXIMAL_MU`: its anchor in `setup`, its gradient in `before_step`).
    mirrored = ("setup", "before_step") if client_cls.PROXIMAL_MU is not None else ()
    for hook in ("train", "loss", "make_optimizer", "upload", "setup", "start_epoch", "before_step",
                 "proximal_mu"):
        if hook not in mirrored and getattr(client_cls, hook) is not getattr(ClientBase, hook):
            raise ConfigError(f"config key 'engine': method {cfg.method!r} overrides Client.{hook}, which "
                              "engine 'batched' does not reproduce; use engine 'sequential'")
    if cfg.optimizer != "sgd":  # pragma: no cover - only SGD exists today
        raise ConfigError(f"config key 'engine': 'batched' supports optimizer 'sgd', not {cfg.optimizer!r}")


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors]).contiguous()


def steps_per_round(num_samples: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps `ClientBase.train` takes: one per batch `fedhpro.local.batches` yields, every epoch."""
    return epochs * len(batch_sizes(num_samples, batch_size))


class BatchedTraining:
    """`engine: batched`: trains the sampled clients of a round together (a `fedhpro.local.LocalTraining`)."""

    def __init__(self, ctx: Context, client: ClientBase, states: Any, models: ClientModels):
        """As `fedhpro.engine.SequentialTraining`: the run's context, the method's client, the clients' states
        (`fedhpro.clientstore`) and their working models."""
        self.ctx, self.cfg = ctx, ctx.cfg
        self.states, self.models = states, models
        check_batchable(self.cfg, type(client), self.ctx.model_names)
        self.mu = float(client.proximal_mu() or 0.0)
        self._loss_fns: dict[int, tuple[Callable, Callable, MaskedBatchNorm]] = {}
        self.min_fill = MIN_FILL.get(self.ctx.device.type, 1.0)

    # ---- per-client batch streams (the same generator draws, in the same order, as ClientBase.train)
    def _stream(self, client: ClientData, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg, ctx = self.cfg, self.ctx
        for _ in range(cfg.local_epochs):
            for idx in batches(client.num_samples, cfg.batch_size, gen, ctx.device):
                yield ctx.prepare(client.x[idx], train=True, gen=gen), client.y[idx]

    def _losses(self, model: nn.Module) -> tuple[Callable, Callable, MaskedBatchNorm]:
        key = id(model)
        if key not in self._loss_fns:
            self._loss_fns[key] = _vmapped_losses(model)
        return self._loss_fns[key]

    def train_clients(self, round_idx: int, selected: list[int], payload: dict) -> tuple[list[dict], list[float]]:
        """Local training of `selected` from the broadcast weights -> (uploads, mean train losses), in order.

        Clients are laid out by decreasing number of local steps (then decreasing size), so the clients
        still training at step t are a prefix of the stacked tensors and a client that has run out of
        batches is never touched again. The step's batches are split into buckets of similar size
        (`_buckets`, `MIN_FILL`); a bucket of unequal batches is padded to its largest, the padding masked
        out of the loss and of BatchNorm's statistics.
        """
        cfg, ctx = self.cfg, self.ctx
        for cid in selected:
            self.states.setdefault(cid, {})
        sizes = [ctx.clients[cid].num_samples for cid in selected]
        steps = [steps_per_round(n, cfg.batch_size, cfg.local_epochs) for n in sizes]
        order = sorted(range(len(selected)), key=lambda i: (-steps[i], -sizes[i]))  # stable
        clients = [ctx.clients[selected[i]] for i in order]
        steps = [steps[i] for i in order]
        model = self.models.for_client(selected[0])
        model.load_state_dict(payload["weights"])
        model.train()
        k = len(clients)
        start = dict(model.named_parameters())
        params = {n: _stack([p] * k) for n, p in start.items()}
        anchor = {n: p.detach().clone() for n, p in start.items()} if self.mu else {}
        buffers = {n: _stack([b] * k) for n, b in model.named_buffers()}
        momentum: dict[str, torch.Tensor] = {}
        streams = [self._stream(c, torch.Generator().manual_seed(derive_seed(cfg.seed, round_idx, c.cid))) for c in clients]
        totals = torch.zeros(k, dtype=torch.float64, device=ctx.device)
        counts = [0] * k
        losses_fns = self._losses(model)
        cids = [c.cid for c in clients]
        for t in range(max(steps)):
            active = sum(1 for s in steps if s > t)  # clients still training: positions [0, active)
            batch = [next(streams[i]) for i in range(active)]
            for members in self._buckets([len(y) for _, y in batch]):
                self._step(losses_fns, members, batch, params, buffers, momentum, anchor, t, totals, cids)
            for i in range(active):
                counts[i] += len(batch[i][1])
                fault_point("batch")
        for stream in streams:  # every stream is exhausted exactly (its step count was computed up front)
            assert next(stream, None) is None
        uploads, losses = [None] * k, [0.0] * k
        totals_cpu = totals.tolist()
        state_keys = list(model.state_dict().keys())
        for pos, client in enumerate(clients):
            i = order[pos]
            weights = {key: (params[key] if key in params else buffers[key])[pos].detach().clone()
                       for key in state_keys}
            uploads[i] = {"num_samples": client.num_samples, "cid": client.cid, "weights": weights}
            losses[i] = totals_cpu[pos] / max(counts[pos], 1)
        for cid in selected:
            self.states.release(cid, round_idx)
        return uploads, losses

    def _buckets(self, sizes: list[int]) -> list[list[int]]:
        """Positions of one step grouped for vmapped calls: by size, largest first, a bucket closing when
        its smallest batch would fall below `min_fill` x its largest (1.0: equal sizes only; 0.0: one call)."""
        out: list[list[int]] = []
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            if out and sizes[i] >= self.min_fill * sizes[out[-1][0]]:
                out[-1].append(i)
            else:
                out.append([i])
        return [sorted(b) for b in out]

    def _step(self, loss_fns: tuple, members: list[int], batch: list, params: dict[str, torch.Tensor],
              buffers: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
              t: int, totals: torch.Tensor, cids: list[int]) -> None:
        cfg = self.cfg
        plain, masked, mode = loss_fns
        lo = members[0]
        if members == list(range(lo, lo + len(members))):  # contiguous: work on views of the stacked tensors
            where: slice | torch.Tensor = slice(lo, lo + len(members))

            def take(v: torch.Tensor) -> torch.Tensor:
                return v[where]

            def put(v: torch.Tensor, value: torch.Tensor) -> None:
                pass  # `value` is a view of `v`, already updated in place
        else:
            where = torch.tensor(members, device=totals.device)

            def take(v: torch.Tensor) -> torch.Tensor:
                return v.index_select(0, where)

            def put(v: torch.Tensor, value: torch.Tensor) -> None:
                v.index_copy_(0, where, value)

        group_params = {n: take(p).detach().requires_grad_(True) for n, p in params.items()}
        group_buffers = {n: take(b) for n, b in buffers.items()}  # BatchNorm updates these in place
        sizes = [len(batch[i][1]) for i in members]
        width = max(sizes)
        if all(s == width for s in sizes):
            x = torch.stack([batch[i][0] for i in members])
            y = torch.stack([batch[i][1] for i in members])
            losses = plain(group_params, group_buffers, x, y)
        else:  # pad to the widest batch; the mask keeps padding out of the loss and the BN statistics
            x = torch.stack([F.pad(batch[i][0], [0] * (2 * (batch[i][0].dim() - 1)) + [0, width - sizes[j]])
                             for j, i in enumerate(members)])
            y = torch.stack([F.pad(batch[i][1], [0, width - sizes[j]]) for j, i in enumerate(members)])
            mask = torch.arange(width, device=x.device)[None, :] < torch.tensor(sizes, device=x.device)[:, None]
            with mode:
                losses = masked(group_params, group_buffers, x, y, mask)
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = int(torch.nonzero(~finite)[0, 0])
            raise Diverged(f"client {cids[members[bad]]}: loss is {losses[bad].item()}")
        names = list(group_params)
        grads = torch.autograd.grad(losses.sum(), [group_params[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for name, grad in zip(names, grads):
                if grad is None:  # the parameter took no part: torch.optim.SGD skips it too
                    continue
                p = group_params[name]
                if self.mu:  # the proximal before_step: grad += mu (w - w_global)
                    grad.add_(p - anchor[name], alpha=self.mu)
                # torch.optim.SGD, single-tensor path (element-wise, so exact per client)
                if cfg.weight_decay != 0:
                    grad = grad.add(p, alpha=cfg.weight_decay)
                if cfg.momentum != 0:
                    if t == 0:  # every client's first step: the buffer starts as the gradient
                        buf = grad.detach().clone()
                        stored = momentum.setdefault(name, torch.zeros_like(params[name]))
                        if isinstance(where, slice):
                            stored[where].copy_(buf)
                        else:
                            put(stored, buf)
                    else:
                        buf = take(momentum[name]).mul_(cfg.momentum).add_(grad, alpha=1.0)  # dampening 0
                        put(momentum[name], buf)
                    grad = buf
                p.add_(grad, alpha=-cfg.lr)
                put(params[name], p)
            for name, b in group_buffers.items():
                put(buffers[name], b)
            weights = torch.tensor(sizes, dtype=torch.float64, device=totals.device)
            if isinstance(where, slice):
                totals[where] += losses.detach().double() * weights
            else:
                totals.index_add_(0, where, losses.detach().double() * weights)


def _vmapped_losses(model: nn.Module) -> tuple[Callable, Callable, MaskedBatchNorm]:
    """Per-client mean CE, vmapped over stacked (params, buffers, x (a, B, ...), y (a, B)) -> (a,):
    `plain` for equal batches, `masked(..., mask (a, B))` for padded ones (run it inside the returned mode)."""
    from torch.func import functional_call, vmap

    mode = nets.MaskedBatchNorm()

    def plain(params, buffers, x, y):
        _, logits = functional_call(model, (params, buffers), (x,))
        return F.cross_entropy(logits, y)

    def masked(params, buffers, x, y, mask):
        mode.mask = mask
        try:
            _, logits = functional_call(model, (params, buffers), (x,))
        finally:
            mode.mask = None
        weights = mask.to(logits.dtype)
        return (F.cross_entropy(logits, y, reduction="none") * weights).sum() / weights.sum()

    return vmap(plain), vmap(masked), mode
