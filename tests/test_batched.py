"""`engine: batched` (fedhpro.batched) against the sequential engine on real digits with unequal client sizes."""

import types

import pytest
import torch
import torch.nn.functional as F

from conftest import digits_run
from fedhpro.config import ConfigError, from_dict
from fedhpro.data import load_dataset
from fedhpro.engine import Engine
from fedhpro.methods import METHODS
from fedhpro.train import build_context, train

BASE = digits_run(num_clients=10, batch_size=48, lr=0.1, device="cpu", seed=5, clients_per_round=6, local_epochs=2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def run_engine(cfg, data, rounds, dtype=torch.float32):
    """Rounds of `cfg` -> (round results, per-round lists of client uploads, final global state, context).

    float64 (models built with that default dtype, batches cast by `ctx.prepare`) removes float-order
    noise, so per-client results can be compared tightly: in float32 a 1e-7 change already flips
    ReLU/max-pool decisions on digits' many identical background pixels now and then (the sequential
    engine against itself with weights perturbed by 1e-7 differs by up to 1e-3 after one round).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        ctx = build_context(cfg, data=data)
        prepare = ctx.prepare
        ctx.prepare = lambda x, **kw: prepare(x, **kw).to(dtype)
        torch.manual_seed(cfg.seed)
        engine = Engine(ctx, METHODS[cfg.method])
        captured = []
        aggregate = engine.server.aggregate

        def capture(r, uploads):
            captured.append([{**u, "weights": {k: v.clone() for k, v in u["weights"].items()}} for u in uploads])
            aggregate(r, uploads)

        engine.server.aggregate = capture
        results = [engine.run_round(r) for r in range(1, rounds + 1)]
    finally:
        torch.set_default_dtype(previous)
    return results, captured, {k: v.clone() for k, v in engine.server.model.state_dict().items()}, ctx


def assert_state_close(a, b, tol=1e-4, atol=1e-5):
    """Every float tensor within `tol` of its own scale (max |value|) + atol; integer buffers exactly equal."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype == torch.int64:  # num_batches_tracked: exact
            assert torch.equal(a[key], b[key]), key
        else:
            scale = a[key].abs().max().item() + 1e-12
            diff = (a[key].double() - b[key].double()).abs().max().item()
            assert diff <= tol * scale + atol, (key, diff, scale)


@pytest.mark.parametrize("method,extra,min_fill", [
    ("fedavg", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, 0.8),  # equal-size groups + padded buckets
    ("fedprox", {"lr": 0.05, "momentum": 0.5, "method_params": {"mu": 0.1}}, 0.0),  # everything padded (CUDA)
    ("fedavg", {"lr": 0.05, "momentum": 0.9}, 1.0),  # equal sizes only (CPU default)
])
def test_every_client_matches_sequential_including_bn_stats(digits, method, extra, min_fill, monkeypatch):
    from fedhpro import batched

    monkeypatch.setitem(batched.MIN_FILL, "cpu", min_fill)
    cfg = from_dict({**BASE, "method": method, **extra})
    seq, seq_up, seq_state, ctx = run_engine(cfg, digits, 2, torch.float64)
    bat, bat_up, bat_state, _ = run_engine(cfg.replace(engine="batched"), digits, 2, torch.float64)
    assert seq_state["classifier.weight"].dtype == torch.float64
    for r in range(2):
        sizes = [ctx.clients[c].num_samples for c in seq[r].selected]
        assert len(set(sizes)) == len(sizes)  # unequal client sizes; 2 epochs of batch 48 -> partial batches
        assert sum(n % 48 not in (0, 1) for n in sizes) >= 3
        assert seq[r].selected == bat[r].selected
        for s, b in zip(seq_up[r], bat_up[r]):
            assert (s["cid"], s["num_samples"]) == (b["cid"], b["num_samples"])
            assert_state_close(s["weights"], b["weights"], tol=1e-9, atol=1e-12)
            # BatchNorm statistics are each client's own: batches seen and running moments
            n = ctx.clients[s["cid"]].num_samples
            tracked = [v for k, v in b["weights"].items() if k.endswith("num_batches_tracked")]
            if r == 0:  # from 0: two epochs of this client's own batches (a trailing single sample is dropped)
                assert all(int(t) == 2 * -(-n // 48) - 2 * (n % 48 == 1) for t in tracked)
        means = [u["weights"]["backbone.net.1.running_mean"] for u in bat_up[r]]
        assert not torch.allclose(means[0], means[1])
        assert seq[r].train_loss == pytest.approx(bat[r].train_loss, rel=1e-9)
        assert seq[r].test_loss == pytest.approx(bat[r].test_loss, rel=1e-9)
        assert seq[r].test_acc == bat[r].test_acc
        assert (seq[r].bytes_up, seq[r].bytes_down) == (bat[r].bytes_up, bat[r].bytes_down)
    assert_state_close(seq_state, bat_state, tol=1e-9, atol=1e-12)


def test_float32_final_weights_and_metrics_within_tolerance(digits):
    # Small steps, so float-order differences (~1e-7) are not amplified much over three rounds.
    cfg = from_dict({**BASE, "method": "fedavg", "lr": 0.01, "local_epochs": 1, "clients_per_round": 7})
    seq, _, seq_state, _ = run_engine(cfg, digits, 3)
    bat, _, bat_state, _ = run_engine(cfg.replace(engine="batched"), digits, 3)
    assert [r.selected for r in seq] == [r.selected for r in bat]
    assert_state_close(seq_state, bat_state, tol=1e-3)
    for s, b in zip(seq, bat):
        assert s.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert s.test_loss == pytest.approx(b.test_loss, rel=1e-3)
        assert s.test_acc == pytest.approx(b.test_acc, abs=2 / 360 + 1e-9)


def test_train_runs_batched_end_to_end(tmp_path, digits):
    cfg = from_dict({**BASE, "method": "fedprox", "lr": 0.05, "rounds": 2, "engine": "batched",
                     "local_epochs": 1})
    df = train(cfg, tmp_path / "run")
    assert list(df["status"]) == ["finished", "finished"]
    assert df["test_acc"].iloc[-1] > 0.2


@pytest.mark.parametrize("method", ["fedhpro", "fedproto", "creff", "moon"])
def test_other_methods_are_refused_by_name_at_validation(method):
    with pytest.raises(ConfigError, match=f"config key 'engine': method '{method}' supports engine sequential"):
        from_dict({**BASE, "method": method, "engine": "batched"})


def test_refusal_is_a_one_line_cli_error(tmp_path, capsys):
    from fedhpro.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text("dataset: digits\nmethod: fedhpro\nengine: batched\nrounds: 1\ndevice: cpu\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fedhpro" in err[0] and "batched" in err[0]


def test_divergence_is_reported(digits):
    from fedhpro.engine import Diverged

    cfg = from_dict({**BASE, "method": "fedavg", "engine": "batched"})
    engine = Engine(build_context(cfg, data=digits), METHODS["fedavg"])
    with torch.no_grad():
        engine.server.model.classifier.bias.fill_(float("nan"))
    with pytest.raises(Diverged, match=r"client \d+: loss is nan"):
        engine.run_round(1)


def test_masked_batch_norm_equals_the_kernel_on_the_valid_rows():
    from torch.func import vmap

    from fedhpro.nets import MaskedBatchNorm

    gen = torch.Generator().manual_seed(0)
    sizes = [5, 3, 7]
    x = torch.randn(3, 7, 4, 3, 3, dtype=torch.float64, generator=gen)
    weight, bias = torch.rand(4, dtype=torch.float64, generator=gen), torch.randn(4, dtype=torch.float64, generator=gen)
    mask = torch.arange(7)[None, :] < torch.tensor(sizes)[:, None]
    running = (torch.randn(3, 4, dtype=torch.float64, generator=gen), torch.rand(3, 4, dtype=torch.float64, generator=gen))
    mode = MaskedBatchNorm()

    def one(x, rm, rv, mask):
        mode.mask = mask
        try:
            return F.batch_norm(x, rm, rv, weight, bias, training=True, momentum=0.3, eps=1e-5)
        finally:
            mode.mask = None

    rm, rv = running[0].clone(), running[1].clone()
    with mode:
        out = vmap(one)(x, rm, rv, mask)
    for i, n in enumerate(sizes):
        ref_rm, ref_rv = running[0][i].clone(), running[1][i].clone()
        ref = F.batch_norm(x[i, :n], ref_rm, ref_rv, weight, bias, training=True, momentum=0.3, eps=1e-5)
        torch.testing.assert_close(out[i, :n], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rm[i], ref_rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv[i], ref_rv, rtol=1e-12, atol=1e-12)
    # outside the mode's masked use (no mask set / eval mode) the kernel runs unchanged
    with mode:
        plain = F.batch_norm(x[0], running[0][0].clone(), running[1][0].clone(), training=True)
    assert torch.equal(plain, F.batch_norm(x[0], running[0][0].clone(), running[1][0].clone(), training=True))


def test_buckets_pad_similar_sizes_together(digits):
    cfg = from_dict({**BASE, "method": "fedavg", "engine": "batched"})
    batched = Engine(build_context(cfg, data=digits), METHODS["fedavg"]).local
    sizes = [48, 48, 40, 30, 48, 12, 10, 39]
    assert batched.min_fill == 1.0  # CPU: equal sizes only
    assert batched._buckets(sizes) == [[0, 1, 4], [2], [7], [3], [5], [6]]
    batched.min_fill = 0.8  # each bucket's smallest >= 0.8 x its largest
    assert batched._buckets(sizes) == [[0, 1, 2, 4, 7], [3], [5, 6]]
    batched.min_fill = 0.0  # CUDA: one padded call
    assert batched._buckets(sizes) == [list(range(8))]


def test_small_unequal_clients_share_calls(digits, monkeypatch):
    """50 clients of unequal sizes below one batch, padding on: a few calls per step, not one per client."""
    from collections import Counter

    from fedhpro import batched

    monkeypatch.setitem(batched.MIN_FILL, "cpu", 0.8)
    calls = Counter()
    original = batched.BatchedTraining._step
    monkeypatch.setattr(batched.BatchedTraining, "_step",
                        lambda self, *args: calls.update([args[7]]) or original(self, *args))
    cfg = from_dict({**BASE, "method": "fedavg", "num_clients": 50, "clients_per_round": None, "batch_size": 64,
                     "local_epochs": 2, "engine": "batched", "lr": 0.05})
    ctx = build_context(cfg, data=digits)
    assert len({c.num_samples for c in ctx.clients}) > 10 and max(c.num_samples for c in ctx.clients) <= 64
    Engine(ctx, METHODS["fedavg"]).run_round(1)
    assert set(calls) == {0, 1} and calls[0] == calls[1] <= 10  # two epochs of one (padded) batch each


def test_a_client_with_hooks_batched_mode_does_not_mirror_is_refused(digits):
    from fedhpro.batched import check_batchable
    from fedhpro.methods.fedavg import Client

    class Custom(Client):
        def before_step(self, model):
            pass

    cfg = from_dict({**BASE, "method": "fedavg", "engine": "batched"})
    ctx = build_context(cfg, data=digits)
    check_batchable(cfg, Client, ctx.model_names)  # asked of the class: no client is built
    with pytest.raises(ConfigError, match="before_step"):
        check_batchable(cfg, Custom, ctx.model_names)
    with pytest.raises(ConfigError, match="before_step"):
        Engine(ctx, types.SimpleNamespace(Client=Custom, Server=METHODS["fedavg"].Server))


def test_workflow_validation_asks_the_client_class_fedprox_proximal_term_is_batchable():
    from fedhpro.methods.fedprox import Client
    from fedhpro.config import check_runnable

    assert Client.PROXIMAL_MU == "mu"
    for method in ("fedavg", "fedprox"):  # before: a faked (uninitialised) FedProx client raised AttributeError
        check_runnable(from_dict({**BASE, "method": method, "engine": "batched"}))
