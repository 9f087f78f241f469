"""`compile` (torch.compile of the local-training forward pass, `fedhpro.local.training_forward`).

`none` (the default) changes nothing, not even the config hash; a compiled run is part of the run's identity,
trains through the method's own loss (attribute access such as GFPL's `model.heads` passes through), is
bit-identical across fresh processes and after a resume on the CPU, and is not the eager run (fused kernels
round differently). `reduce-overhead` (CUDA graphs) is refused off CUDA, and `engine: batched` refuses any mode.
Compiling costs seconds to tens of seconds per process on this CPU, so the runs are in the slow set.
"""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import digits_run, numbers
from fedhpro.config import ConfigError, from_dict
from fedhpro.local import check_compile, training_forward
from fedhpro.train import build_context, train

RUN = digits_run(num_clients=4, rounds=3, local_epochs=1, seed=0, device="cpu")


def test_none_changes_nothing_and_a_mode_is_part_of_the_identity():
    eager = from_dict(RUN)
    assert eager.compile == "none" and "compile" not in eager.canonical_dict()
    assert from_dict({**RUN, "compile": "none"}).config_hash() == eager.config_hash()
    compiled = from_dict({**RUN, "compile": "default"})
    assert compiled.canonical_dict()["compile"] == "default" and compiled.config_hash() != eager.config_hash()
    with pytest.raises(ConfigError, match="compile"):
        from_dict({**RUN, "compile": "max-autotune"})


def test_reduce_overhead_needs_cuda_and_batched_refuses_every_mode(tmp_path):
    check_compile("reduce-overhead", torch.device("cuda"))  # allowed where CUDA graphs exist
    check_compile("default", torch.device("cpu"))
    with pytest.raises(ConfigError, match="'compile': 'reduce-overhead' .*needs a CUDA device"):
        check_compile("reduce-overhead", torch.device("cpu"))
    with pytest.raises(ConfigError, match="'compile'"):  # the run is refused before its directory is touched
        train(from_dict({**RUN, "compile": "reduce-overhead"}), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(ConfigError, match="config key 'compile': engine 'batched'"):
        from_dict({**RUN, "method": "fedavg", "engine": "batched", "compile": "default"})


def test_training_forward_is_the_model_when_eager_and_one_shared_wrapper_per_model():
    ctx = build_context(from_dict({**RUN, "compile": "default"}))
    model = ctx.make_model()
    wrapper = training_forward(ctx, model)
    assert wrapper is not model and training_forward(ctx, model) is wrapper  # compiled once per model object
    assert [p for p in wrapper.parameters()] == [p for p in model.parameters()]  # the same tensors, trained in place
    assert wrapper.classifier is model.classifier  # attribute access passes through (a method's loss may use it)
    other = ctx.make_model()
    assert training_forward(ctx, other) is not wrapper
    eager = build_context(from_dict(RUN))
    model = eager.make_model()
    assert training_forward(eager, model) is model and not eager.compiled_models


class CallCounter:
    """Stands where `training_forward`'s result stands: counts the calls of the model itself, passes the rest on."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("method", sorted(__import__("fedhpro.methods", fromlist=["METHODS"]).METHOD_MODULES))
def test_calls_model_says_whether_local_training_runs_the_model_itself(method, monkeypatch):
    """The declaration `compile` relies on: a method that declares `calls_model` runs `model(x)` in local training
    (so compiling it speeds the run); one that does not (GFPL) never does, and `compile` is refused for it."""
    import fedhpro.local as local_mod
    from fedhpro.engine import Engine
    from fedhpro.methods import METHODS, fast_test_params

    declared = METHODS[method]
    counters: list[CallCounter] = []

    def counting(ctx, model):
        counters.append(CallCounter(model))
        return counters[-1]

    monkeypatch.setattr(local_mod, "training_forward", counting)
    raw = {**RUN, "method": method, "method_params": fast_test_params(method), "eval_mode": declared.modes[0],
           "rounds": 2}
    cfg = from_dict(raw)
    torch.manual_seed(cfg.seed)
    engine = Engine(build_context(cfg), declared)
    for r in (1, 2):
        engine.run_round(r)
    assert counters  # every local training asked for its forward
    assert (sum(c.calls for c in counters) > 0) == declared.calls_model
    if not declared.calls_model:
        with pytest.raises(ConfigError, match=f"config key 'compile': method '{method}'"):
            from_dict({**raw, "compile": "default"})


CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from fedhpro.config import from_dict
from fedhpro.train import train
raw, out, stop = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
train(from_dict(raw), out, stop_after_round=stop or None)
"""


def train_in_fresh_process(raw: dict, out, stop: int = 0) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw), str(out), str(stop)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedhpro", "moon"])
def test_a_compiled_run_is_reproducible_resumes_exactly_and_is_not_the_eager_run(tmp_path, method):
    from fedhpro.methods import fast_test_params

    raw = {**RUN, "method": method, "method_params": fast_test_params(method), "compile": "default"}
    train_in_fresh_process(raw, tmp_path / "a")
    train_in_fresh_process(raw, tmp_path / "b")
    train_in_fresh_process(raw, tmp_path / "resumed", stop=1)  # stops after round 1 with a checkpoint ...
    assert not (tmp_path / "resumed" / "metrics.parquet").exists()
    train_in_fresh_process(raw, tmp_path / "resumed")  # ... and a new process resumes it
    a, b, resumed = (pd.read_parquet(tmp_path / d / "metrics.parquet") for d in ("a", "b", "resumed"))
    pd.testing.assert_frame_equal(numbers(a), numbers(b))
    pd.testing.assert_frame_equal(numbers(a), numbers(resumed))
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["compile"] == "default"
    eager = train(from_dict({**raw, "compile": "none"}), tmp_path / "eager", threads=1)
    assert not numbers(eager)["train_loss"].equals(numbers(a)["train_loss"])  # fused kernels round differently
    assert (a["train_loss"] - eager["train_loss"]).abs().max() < 0.05  # ... the same training, though
    assert a["test_acc"].iloc[-1] > a["test_acc"].iloc[0]  # it learns
