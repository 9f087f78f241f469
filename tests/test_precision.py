"""`precision` (autocast of local training and evaluation; fp16 with loss scaling) and `channels_last`.

With the defaults nothing changes (bit-identical numbers, same config hash); bf16 really runs in low
precision where it should (local-training forward/loss, evaluation) and nowhere else (client gradients,
server steps, uploads stay fp32); channels-last changes the layout, not the results; fp16 works on the CPU
with a GradScaler that skips overflowing steps; every method runs with bf16 + channels-last; resuming a bf16
run is bit-identical; `engine: batched` refuses both switches.
"""

import contextlib
import dataclasses
import math

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import digits_run, numbers
import fedhpro.local as local_mod
from fedhpro.config import ConfigError, from_dict
from fedhpro.data import load_dataset
from fedhpro.engine import Engine, autocast_context, check_precision, make_grad_scaler
from fedhpro.methods import METHODS, fast_test_params
from fedhpro.runio import load_checkpoint
from fedhpro.train import build_context, train

TINY = digits_run(num_clients=3, momentum=0.9, local_epochs=1, seed=1, device="cpu")
SHORT = digits_run(num_clients=2, partition="iid", alpha=None, momentum=0.9, local_epochs=1, seed=0, device="cpu")
CL = torch.channels_last


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def tiny(digits):
    """300 training and 100 test digits: low-precision rounds on the CPU (emulated bf16) in about a second."""
    return dataclasses.replace(digits, train_x=digits.train_x[:300], train_y=digits.train_y[:300],
                               test_x=digits.test_x[:100], test_y=digits.test_y[:100])


@pytest.fixture(scope="module")
def short(digits):
    """600 training digits, the full test set: a short run that learns."""
    return dataclasses.replace(digits, train_x=digits.train_x[:600], train_y=digits.train_y[:600])


def make_engine(raw: dict, data) -> Engine:
    cfg = from_dict(raw)
    ctx = build_context(cfg, data=data)
    torch.manual_seed(cfg.seed)
    return Engine(ctx, METHODS[cfg.method])


def run(raw: dict, data, rounds: int) -> tuple[Engine, list]:
    engine = make_engine({**raw, "rounds": rounds}, data)
    return engine, [engine.run_round(r) for r in range(1, rounds + 1)]


def flat_weights(engine: Engine) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in engine.server.model.state_dict().values()
                      if v.is_floating_point()])


def float_tensors(obj, prefix=""):
    """(path, tensor) of every floating tensor in a nested state."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from float_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from float_tensors(v, f"{prefix}[{i}]")


class LayerSpy:
    """Forward hooks on every Conv2d/Linear of `models`: (autocast on?, output dtype, conv input/weight layout)."""

    def __init__(self, models):
        self.calls: list[dict] = []
        self.handles = [m.register_forward_hook(self._hook) for model in models for m in model.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))]

    def _hook(self, module, inputs, output):
        x = inputs[0]
        row = {"autocast": torch.is_autocast_enabled("cpu"), "dtype": output.dtype,
               "conv": isinstance(module, nn.Conv2d)}
        if row["conv"]:
            row.update(channels=x.shape[1], input_cl=x.is_contiguous(memory_format=CL),
                       input_plain=x.is_contiguous(), weight_cl=module.weight.is_contiguous(memory_format=CL),
                       weight_plain=module.weight.is_contiguous(), weight_channels=module.weight.shape[1])
        self.calls.append(row)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---- (a) defaults: nothing changes ------------------------------------------------------------------------
def test_defaults_spelled_out_are_bit_identical_with_the_same_hash(tmp_path):
    raw = {"dataset": "digits", "num_clients": 6, "partition": "dirichlet", "alpha": 0.5, "batch_size": 32,
           "lr": 0.05, "seed": 3, "local_epochs": 1, "method": "fedhpro", "rounds": 2,
           "method_params": {"retrain_epochs": 10, "feature_matching_steps": 20}}
    implicit = from_dict(raw)
    explicit = from_dict({**raw, "precision": "fp32", "channels_last": False})
    assert explicit.config_hash() == implicit.config_hash()
    assert explicit.canonical_json() == implicit.canonical_json()
    assert "precision" not in implicit.canonical_dict() and "channels_last" not in implicit.canonical_dict()
    assert from_dict({**raw, "precision": "bf16"}).config_hash() != implicit.config_hash()  # own run directory
    a = train(implicit, tmp_path / "implicit")
    b = train(explicit, tmp_path / "explicit")
    pd.testing.assert_frame_equal(numbers(a), numbers(b))
    # and the defaults take the plain path: no autocast, no scaler, contiguous weights and batches
    ctx = build_context(explicit)
    assert isinstance(autocast_context(ctx), contextlib.nullcontext) and make_grad_scaler(ctx) is None
    model = ctx.make_model()
    assert all(p.is_contiguous() for p in model.parameters())
    assert ctx.prepare(ctx.clients[0].x[:8], train=False).is_contiguous()


# ---- (b) bf16 -------------------------------------------------------------------------------------------------
def test_bf16_runs_low_precision_in_training_and_evaluation_only(tiny):
    engine = make_engine({**TINY, "method": "fedhpro", "rounds": 1, "precision": "bf16"}, tiny)
    spy = LayerSpy(engine.working_models() + [engine.server.model])
    res = engine.run_round(1)
    spy.remove()
    under = [c for c in spy.calls if c["autocast"]]
    outside = [c for c in spy.calls if not c["autocast"]]
    assert under and all(c["dtype"] == torch.bfloat16 for c in under)  # local training forward + evaluation
    # FedHPro's per-class client gradients (Client.setup) run outside autocast, in fp32
    assert outside and all(c["dtype"] == torch.float32 for c in outside)
    assert math.isfinite(res.train_loss) and 0.0 <= res.test_acc <= 1.0
    # nothing low-precision reaches the server: weights, hyper-prototypes, federated features, meta classifier
    leaked = [(k, t.dtype) for k, t in float_tensors(engine.server.state_dict()) if t.dtype != torch.float32]
    assert not leaked


def test_bf16_accuracy_close_to_fp32(short):
    # Measured (digits, 600 training samples, 2 iid clients, 2-3 rounds, seeds 0-3): |bf16 - fp32| <= 0.3 points
    # for FedAvg, <= 1.1 points for FedHPro. Asserted with margin: 3 points.
    fp32, res32 = run({**SHORT, "method": "fedavg"}, short, 3)
    bf16, res16 = run({**SHORT, "method": "fedavg", "precision": "bf16"}, short, 3)
    a, b = res32[-1].test_acc, res16[-1].test_acc
    assert a > 0.75 and b > 0.75, (a, b)
    assert abs(a - b) <= 0.03, (a, b)
    drift = ((flat_weights(bf16) - flat_weights(fp32)).norm() / flat_weights(fp32).norm()).item()
    assert 0 < drift < 0.1, drift  # other numbers (low precision really ran), the same model


# ---- (c) channels_last ----------------------------------------------------------------------------------------
def test_channels_last_layout_and_results_equal_within_float_tolerance(short):
    plain, res_plain = run({**SHORT, "method": "fedavg"}, short, 2)
    engine = make_engine({**SHORT, "method": "fedavg", "rounds": 2, "channels_last": True}, short)
    spy = LayerSpy(engine.working_models())
    res_cl = [engine.run_round(r) for r in (1, 2)]
    spy.remove()
    convs = [c for c in spy.calls if c["conv"]]
    assert convs and all(c["input_cl"] and c["weight_cl"] for c in convs)
    # not vacuous: layers with more than one channel are not also plain-contiguous
    assert any(not c["input_plain"] for c in convs if c["channels"] > 1)
    assert any(not c["weight_plain"] for c in convs if c["weight_channels"] > 1)
    batch = engine.ctx.prepare(engine.ctx.clients[0].x[:8], train=True, gen=torch.Generator().manual_seed(0))
    assert batch.is_contiguous(memory_format=CL)
    # same numbers up to kernel summation order
    drift = ((flat_weights(engine) - flat_weights(plain)).norm() / flat_weights(plain).norm()).item()
    assert drift < 1e-5, drift
    for a, b in zip(res_plain, res_cl):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
        assert abs(b.test_acc - a.test_acc) <= 1 / len(short.test_y) + 1e-12


def test_channels_last_leaves_non_image_inputs_alone(tiny):
    ctx = build_context(from_dict({**TINY, "method": "fedavg", "channels_last": True}), data=tiny)
    tokens = dataclasses.replace(ctx, mean=None, std=None)  # what a token-id dataset's context looks like
    ids = torch.randint(0, 100, (4, 12))
    assert tokens.prepare(ids, train=True) is ids
    assert all(p.is_contiguous() for p in tokens.make_model().parameters())


# ---- (d) fp16 -------------------------------------------------------------------------------------------------
def test_fp16_on_cpu_trains_with_a_grad_scaler_and_unscaled_proximal_gradients(tiny, monkeypatch):
    scalers, grad_max = [], []
    original = local_mod.make_grad_scaler

    def spy_scaler(ctx):
        scalers.append(original(ctx))
        return scalers[-1]

    monkeypatch.setattr(local_mod, "make_grad_scaler", spy_scaler)
    engine = make_engine({**TINY, "method": "fedprox", "rounds": 2, "precision": "fp16"}, tiny)
    before_step = engine.client.before_step

    def spy_before_step(model):
        grad_max.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
        before_step(model)

    engine.client.before_step = spy_before_step
    results = [engine.run_round(r) for r in (1, 2)]
    assert len(scalers) == 2 * TINY["num_clients"] and all(isinstance(s, torch.amp.GradScaler) for s in scalers)
    assert all(s.get_scale() > 1 for s in scalers)  # scaling was on (default 2**16, halved on overflow)
    # before_step sees unscaled gradients (scaled ones would be ~2**16 times larger)
    assert grad_max and max(grad_max) < 100, max(grad_max)
    assert all(math.isfinite(r.train_loss) for r in results) and results[-1].test_acc > 0.1


def test_fp16_overflowing_step_is_skipped_not_diverged(tiny, monkeypatch):
    scalers = []

    def huge_scaler(ctx):  # every gradient overflows in fp16
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**60))
        return scalers[-1]

    monkeypatch.setattr(local_mod, "make_grad_scaler", huge_scaler)
    engine = make_engine({**TINY, "method": "fedavg", "rounds": 1, "precision": "fp16", "batch_size": 512}, tiny)
    client = engine.ctx.clients[0]
    model = engine.models.for_client(client.cid)
    model.load_state_dict(engine.server.model.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, loss = engine.client.train(client, model, {"weights": engine.server.model.state_dict()}, {},
                                  torch.Generator().manual_seed(0), round_idx=1)  # one batch: one (skipped) step
    assert math.isfinite(loss)
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert scalers[0].get_scale() == 2.0**59  # backed off once
    # a non-finite *loss* (forward overflow) is still a divergence
    engine.client.loss = lambda model, x, y: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(local_mod.Diverged):
        engine.client.train(client, model, {}, {}, torch.Generator().manual_seed(0), round_idx=1)


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(ConfigError, match="config key 'precision': 'bf16' is not supported by Old GPU"):
        check_precision("bf16", torch.device("cuda"))
    check_precision("fp16", torch.device("cuda"))
    check_precision("bf16", torch.device("cpu"))  # CPUs emulate it


# ---- (e) every method ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_bf16_channels_last(tiny, method):
    # the method's fast parameters: fewer server steps (this test is about the client side); GFPL's exercise the
    # GMM upload (round 1) and the head re-training (round 2)
    raw = {**TINY, "method": method, "rounds": 2, "precision": "bf16", "channels_last": True,
           "method_params": fast_test_params(method)}
    if method == "fedhpro":  # + the client margin, recomputed inside the (autocast) loss every batch
        raw["method_params"].update(use_margin=True, margin_update="batch")
    if "global" not in METHODS[method].modes:  # e.g. local: personalized only
        raw["eval_mode"] = "personalized"
    engine = make_engine(raw, tiny)
    spy = LayerSpy(engine.working_models())
    results = [engine.run_round(r) for r in (1, 2)]
    spy.remove()
    assert any(c["autocast"] and c["dtype"] == torch.bfloat16 for c in spy.calls)
    assert all(c["input_cl"] and c["weight_cl"] for c in spy.calls if c["conv"])
    acc = results[-1].test_acc if raw.get("eval_mode") != "personalized" else results[-1].client_acc_mean
    assert all(math.isfinite(r.train_loss) for r in results) and 0.0 <= acc <= 1.0
    leaked = [(k, t.dtype) for k, t in float_tensors(engine.server.state_dict()) if t.dtype != torch.float32]
    assert not leaked


def test_personalized_bf16_channels_last(tiny):
    engine, results = run({**TINY, "method": "fedproto", "eval_mode": "personalized", "precision": "bf16",
                           "channels_last": True}, tiny, 2)
    assert math.isfinite(results[-1].client_acc_mean)
    state = engine.client_states[results[-1].selected[0]]
    assert all(t.dtype == torch.float32 for _, t in float_tensors(state))


def test_prototype_sums_of_low_precision_features_are_fp32():
    from fedhpro.methods.prototypes import PrototypeAccumulator

    acc = PrototypeAccumulator(3)
    acc.add(torch.full((4, 2), 1.0 + 2**-7, dtype=torch.bfloat16), torch.tensor([0, 0, 2, 2]))
    classes, means = acc.means()
    assert means.dtype == torch.float32 and classes.tolist() == [0, 2]
    acc64 = PrototypeAccumulator(3)
    acc64.add(torch.ones(2, 2, dtype=torch.float64), torch.tensor([1, 1]))
    assert acc64.means()[1].dtype == torch.float64  # other dtypes are kept as they are


# ---- (f) resume ----------------------------------------------------------------------------------------------
def test_resume_with_bf16_is_bit_identical(tmp_path):
    raw = {"dataset": "digits", "num_clients": 20, "clients_per_round": 2, "partition": "dirichlet", "alpha": 0.5,
           "batch_size": 32, "lr": 0.05, "momentum": 0.9, "local_epochs": 1, "seed": 2, "method": "fedhpro",
           "rounds": 3, "precision": "bf16", "channels_last": True, "device": "cpu",
           "dataset_options": {"test_fraction": 0.05},  # 90 test digits: bf16 evaluation is slow on CPUs
           "method_params": {"retrain_epochs": 10, "feature_matching_steps": 20}}
    cfg = from_dict(raw)
    full = train(cfg, tmp_path / "full")
    partial = train(cfg, tmp_path / "resumed", stop_after_round=1)
    assert len(partial) == 1 and load_checkpoint(tmp_path / "resumed")["round"] == 1
    resumed = train(cfg, tmp_path / "resumed")
    pd.testing.assert_frame_equal(numbers(full), numbers(resumed))


# ---- batched engine --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch, key", [({"precision": "bf16"}, "precision"), ({"precision": "fp16"}, "precision"),
                                         ({"channels_last": True}, "channels_last")])
def test_batched_engine_refuses_the_switches(switch, key):
    # refused by check_runnable when the config is read (from_dict), before any data is loaded or job runs
    with pytest.raises(ConfigError, match=f"config key '{key}'") as err:
        from_dict({**TINY, "method": "fedavg", "engine": "batched", **switch})
    assert "\n" not in str(err.value)
