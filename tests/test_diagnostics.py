"""Prototype diagnostics and the sample-weighted personalized accuracy: functions by hand, the methods' class
signals, columns on digits runs, and training numbers unchanged by the diagnostics."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import digits_run
from fedhpro.config import from_dict
from fedhpro.diagnostics import (AGREEMENT_COLUMNS, DIAGNOSTIC_COLUMNS, ConsistencyMeter, class_means,
                                 first_per_class, mean_cosine, prototype_diagnostics, separation_angles,
                                 weighted_accuracy)
from fedhpro.engine import ClientData, Engine, RoundResult
from fedhpro.methods import METHODS
from fedhpro.train import build_context, train

BASE = digits_run(num_clients=4, rounds=2, local_epochs=1, seed=2, diagnostics_every=1)
# Every prototype method in each mode it supports; small server steps keep the runs short.
PROTOTYPE_RUNS = {
    "fedproto": ({}, ("global", "personalized")),
    "fedtgp": ({"server_epochs": 5}, ("global", "personalized")),
    "fedsa": ({}, ("global", "personalized")),
    "protonorm": ({}, ("global", "personalized")),
    "gfpl": ({"start_round": 1, "interval": 1}, ("global", "personalized")),
    "fpl": ({}, ("global",)),
    "fedhpro": ({"matching_steps": 5, "feature_matching_steps": 5, "retrain_epochs": 5}, ("global",)),
}
DIAG = list(DIAGNOSTIC_COLUMNS)
NEW = ["client_acc_weighted", *DIAG]
TIME = ["time_local", "time_server", "time_eval", "time_io"]


# ---- the functions by hand ---------------------------------------------------------------------------------

def test_separation_of_orthogonal_and_opposite_rows():
    mean, low = separation_angles(torch.eye(3) * torch.tensor([[2.0], [0.5], [7.0]]), torch.ones(3, dtype=torch.bool))
    assert mean == pytest.approx(90.0) and low == pytest.approx(90.0)
    # rows e1, e2, -e1: angles 90, 180, 90 -> mean 120, min 90; an absent row never counts
    rows = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0], [1.0, 0.0]])
    present = torch.tensor([True, True, True, False])
    mean, low = separation_angles(rows, present)
    assert mean == pytest.approx(120.0) and low == pytest.approx(90.0)
    # 60 degrees apart in the plane
    mean, low = separation_angles(torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]]), torch.ones(2, dtype=torch.bool))
    assert mean == pytest.approx(60.0) and low == pytest.approx(60.0)
    assert all(math.isnan(v) for v in separation_angles(rows, torch.tensor([True, False, False, False])))


def test_mean_cosine_identical_opposite_and_partial_overlap():
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 5.0]])
    everywhere = torch.ones(3, dtype=torch.bool)
    assert mean_cosine(g.clone(), everywhere, g, everywhere) == pytest.approx(1.0)
    assert mean_cosine(4 * g, everywhere, g, everywhere) == pytest.approx(1.0)  # scale-free
    assert mean_cosine(-g, everywhere, g, everywhere) == pytest.approx(-1.0)
    # classes 0 (identical, cos 1) and 2 (orthogonal, cos 0) in both; class 1 only local
    local = torch.tensor([[2.0, 4.0], [9.0, 9.0], [5.0, 0.0]])
    assert mean_cosine(local, everywhere, g, torch.tensor([True, False, True])) == pytest.approx(0.5)
    assert math.isnan(mean_cosine(local, torch.tensor([False, True, False]), g, torch.tensor([True, False, True])))


class Identity(nn.Module):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _client(cid: int, x: list, y: list) -> ClientData:
    labels = torch.tensor(y)
    return ClientData(cid=cid, x=torch.tensor(x), y=labels, test_x=torch.zeros(0, 2),
                      test_y=torch.zeros(0, dtype=torch.long), class_counts=torch.bincount(labels, minlength=3))


def test_class_means_and_consistency_by_hand():
    ctx = SimpleNamespace(num_classes=3, prepare=lambda x, train: x)
    a = _client(0, [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], [0, 0, 2])
    means, present = class_means(Identity(), ctx, a, batch_size=2)  # batches split class 0's samples
    assert present.tolist() == [True, False, True]
    assert torch.equal(means[[0, 2]], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    # global signal = client a's own prototypes -> consistency 1; client b points its class 0 at 45 degrees
    signal = (torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), torch.tensor([True, False, True]))
    meter = ConsistencyMeter(signal, ctx, batch_size=8)
    meter.add(Identity(), a)
    assert meter.value() == pytest.approx(1.0)
    meter.add(Identity(), _client(1, [[1.0, 1.0]], [0]))
    assert meter.value() == pytest.approx((1.0 + math.sqrt(0.5)) / 2)  # each client counts once
    meter.add(Identity(), _client(2, [[1.0, 1.0]], [1]))  # no class with a global signal: left out
    assert meter.value() == pytest.approx((1.0 + math.sqrt(0.5)) / 2)


def test_weighted_accuracy_differs_from_the_client_mean():
    # client A: 3 of 4 right, client B: 1 of 1 -> mean of accuracies 0.875, sample-weighted 4/5
    assert weighted_accuracy([3, 1], [4, 1]) == pytest.approx(0.8)
    assert math.isnan(weighted_accuracy([], []))


def test_personalized_evaluation_reports_weighted_accuracy_by_hand():
    """A scorer that always predicts class 0: per client accuracy = share of class-0 test samples."""
    cfg = from_dict({**BASE, "method": "fedproto", "eval_mode": "personalized", "num_clients": 5})
    ctx = build_context(cfg)
    engine = Engine(ctx, METHODS["fedproto"])
    engine.server.scores = lambda model, x: torch.nn.functional.one_hot(
        torch.zeros(len(x), dtype=torch.long), ctx.num_classes).float()
    sizes = [int(c.test_y.numel()) for c in ctx.clients]
    zeros = [int((c.test_y == 0).sum()) for c in ctx.clients]
    assert len(set(sizes)) > 1 and sum(zeros) > 0
    res = RoundResult(round=1, selected=[], train_loss=0.0)
    engine.evaluate_into(res)
    assert res.client_acc_weighted == pytest.approx(sum(zeros) / sum(sizes), abs=1e-15)
    assert res.client_acc_mean == pytest.approx(np.mean([z / s for z, s in zip(zeros, sizes)]))
    assert res.client_acc_weighted != pytest.approx(res.client_acc_mean)
    assert math.isnan(res.proto_consistency)  # no global prototypes before the first upload


def test_evaluation_draws_no_random_numbers():
    cfg = from_dict({**BASE, "method": "fedsa", "eval_mode": "personalized"})
    engine = Engine(build_context(cfg), METHODS["fedsa"])
    state = torch.get_rng_state()
    res = RoundResult(round=1, selected=[], train_loss=0.0)
    engine.evaluate_into(res)
    assert math.isfinite(res.proto_consistency) and math.isfinite(res.proto_sep_min_deg)
    assert torch.equal(torch.get_rng_state(), state)


# ---- the methods' class signals ----------------------------------------------------------------------------

def test_gfpl_signal_is_the_mixture_mean_per_class():
    from fedhpro.methods.gfpl import gmm_class_means

    gmm = {"gmm_classes": torch.tensor([0, 0, 2]), "gmm_weights": torch.tensor([0.25, 0.75, 1.0]),
           "gmm_means": torch.tensor([[0.0, 0.0], [4.0, 8.0], [1.0, -1.0]])}
    table, present = gmm_class_means(gmm, 3)
    assert present.tolist() == [True, False, True]
    assert torch.equal(table, torch.tensor([[3.0, 6.0], [0.0, 0.0], [1.0, -1.0]]))


def test_fedhpro_and_fpl_signals_are_class_means_of_their_prototypes():
    cfg = from_dict({**BASE, "method": "fedhpro", "method_params": {"prototypes_per_class": 2}})
    server = METHODS["fedhpro"].Server(build_context(cfg))
    signal, present = server.global_class_signal()
    assert signal.shape[0] == 10 and present.all()
    assert torch.allclose(signal, (server.prototypes[0::2] + server.prototypes[1::2]) / 2)
    fpl = METHODS["fpl"].Server(build_context(from_dict({**BASE, "method": "fpl"})))
    assert fpl.global_class_signal() is None  # no cluster prototypes before the first upload
    fpl.prototypes = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    fpl.classes = torch.tensor([1, 1, 4])
    table, present = fpl.global_class_signal()
    assert torch.nonzero(present).flatten().tolist() == [1, 4]
    assert torch.equal(table[1], torch.tensor([2.0, 1.0])) and torch.equal(table[4], torch.tensor([0.0, 5.0]))


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "creff", "moon"])
def test_non_prototype_methods_have_no_signal(method):
    server = METHODS[method].Server(build_context(from_dict({**BASE, "method": method})))
    assert server.global_class_signal() is None


# ---- runs on digits ----------------------------------------------------------------------------------------

def _cases():
    return [(m, mode) for m, (_, modes) in PROTOTYPE_RUNS.items() for mode in modes]


@pytest.mark.slow  # each case 8-20 s, all 12 about 2.5 minutes; the fedproto test below covers the default suite
@pytest.mark.parametrize("method, mode", _cases())
def test_prototype_methods_write_finite_diagnostics_and_unchanged_numbers(tmp_path, method, mode):
    cfg = from_dict({**BASE, "method": method, "eval_mode": mode, "method_params": PROTOTYPE_RUNS[method][0]})
    on = train(cfg, tmp_path / "on")
    for column in NEW:
        assert column in on.columns
    assert on[DIAG].notna().all().all() and np.isfinite(on[DIAG].to_numpy()).all()
    assert ((on["proto_sep_min_deg"] >= 0) & (on["proto_sep_min_deg"] <= on["proto_sep_mean_deg"])
            & (on["proto_sep_mean_deg"] <= 180)).all()
    assert on["proto_consistency"].between(-1, 1).all()
    if mode == "personalized":
        assert on["client_acc_weighted"].between(0, 1).all()
    else:
        assert on["client_acc_weighted"].isna().all()
    # The diagnostics never touch training: switched off, every other column is bit-identical.
    off = train(cfg.replace(diagnostics=False), tmp_path / "off")
    assert off[NEW if mode == "global" else DIAG].isna().all().all()
    keep = [c for c in on.columns if c not in [*DIAG, *TIME, "run_id"]]
    pd.testing.assert_frame_equal(on[keep], off[keep], check_exact=True)


def test_fedproto_personalized_run_has_all_columns_and_resumes_identically(tmp_path):
    """The fast representative of the slow per-method test above (kept in the default suite)."""
    cfg = from_dict({**BASE, "method": "fedproto", "eval_mode": "personalized", "clients_per_round": 2, "rounds": 3})
    full = train(cfg, tmp_path / "full")
    assert np.isfinite(full[NEW].to_numpy()).all()
    assert full["client_acc_weighted"].between(0, 1).all()
    train(cfg, tmp_path / "r", stop_after_round=1)
    resumed = train(cfg, tmp_path / "r")
    pd.testing.assert_frame_equal(full.drop(columns=TIME), resumed.drop(columns=TIME), check_exact=True)
    off = train(cfg.replace(diagnostics=False), tmp_path / "off")
    keep = [c for c in full.columns if c not in [*DIAG, *TIME, "run_id"]]
    pd.testing.assert_frame_equal(full[keep], off[keep], check_exact=True)


def test_non_prototype_run_has_only_the_signal_free_diagnostics(tmp_path):
    df = train(from_dict({**BASE, "method": "fedavg"}), tmp_path / "run")
    signal_columns = [c for c in NEW if c not in AGREEMENT_COLUMNS]
    assert df[signal_columns].isna().all().all() and df["test_acc"].notna().all()
    assert np.isfinite(df[list(AGREEMENT_COLUMNS)].to_numpy()).all()


# ---- the discriminating measures: controls that must score differently ----------------------------------------

def _protos(k: int, c: int, d: int, seed: int, structure: torch.Tensor, noise: float, offset: float):
    """K clients' (C, d) prototypes: a shared class structure, per-client noise, a common positive offset."""
    g = torch.Generator().manual_seed(seed)
    return structure[None] + noise * torch.randn(k, c, d, generator=g) + offset


def test_measures_credit_aligned_prototypes_not_offsets_or_collapse():
    k, c, d = 6, 10, 64
    g = torch.Generator().manual_seed(0)
    structure = torch.randn(c, d, generator=g)
    present = torch.ones(k, c, dtype=torch.bool)
    aligned = prototype_diagnostics(_protos(k, c, d, 1, structure, 0.3, 5.0), present, (structure + 5.0,
                                                                                        torch.ones(c, dtype=bool)))
    assert aligned["proto_nearest"] == 1.0 and aligned["proto_margin"] > 0.3 and aligned["proto_cons_centred"] > 0.8
    assert aligned["proto_agree"] > 0.5 and aligned["proto_agree_nearest"] == 1.0
    # an unrelated (untrained, random) signal with the same positive offset: the raw consistency is high, the
    # centred measures are at chance
    random_signal = (torch.randn(c, d, generator=g) + 5.0, torch.ones(c, dtype=bool))
    unrelated = prototype_diagnostics(_protos(k, c, d, 1, structure, 0.3, 5.0), present, random_signal)
    assert unrelated["proto_consistency"] > 0.9  # the old column cannot tell
    assert unrelated["proto_nearest"] < 0.4 and abs(unrelated["proto_cons_centred"]) < 0.3
    assert unrelated["proto_margin"] < 0 < aligned["proto_margin"]
    # collapse: every prototype the same point (plus noise), signal = that point -> raw consistency 1,
    # nothing else credits it
    point = torch.rand(d) + 1.0
    collapsed_protos = point + 1e-3 * torch.randn(k, c, d, generator=g)
    collapsed = prototype_diagnostics(collapsed_protos, present, (point.expand(c, d) + 1e-3 * torch.randn(c, d,
                                                                   generator=g), torch.ones(c, dtype=bool)))
    assert collapsed["proto_consistency"] > 0.99 and collapsed["proto_sep_mean_deg"] < 1.0
    assert collapsed["proto_nearest"] < 0.4 and collapsed["proto_agree_nearest"] < 0.4
    assert abs(collapsed["proto_agree"]) < 0.1 < aligned["proto_agree"]
    # a permuted signal (each class pointed at another's structure): no own-class credit at all
    permuted = prototype_diagnostics(_protos(k, c, d, 1, structure, 0.3, 0.0), present,
                                     (structure.roll(1, 0), torch.ones(c, dtype=bool)))
    assert permuted["proto_nearest"] == 0.0 and permuted["proto_margin"] < 0


def test_measures_by_hand_and_without_a_signal():
    # two clients, two classes in the plane; centring removes the common mean (1, 1)
    protos = torch.tensor([[[2.0, 1.0], [1.0, 2.0]], [[2.0, 1.0], [1.0, 2.0]]])
    present = torch.ones(2, 2, dtype=torch.bool)
    out = prototype_diagnostics(protos, present, (torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.ones(2, dtype=bool)))
    # centred prototypes (0.5, -0.5), (-0.5, 0.5); centred signal (1.5, -1.5), (-1.5, 1.5): cos 1 own, -1 other
    assert out["proto_cons_centred"] == pytest.approx(1.0) and out["proto_margin"] == pytest.approx(2.0)
    assert out["proto_nearest"] == 1.0 and out["proto_agree_nearest"] == 1.0
    assert out["proto_agree"] == pytest.approx(2.0)  # same-class cos 1 minus different-class cos -1
    none = prototype_diagnostics(protos, present, None)
    assert all(math.isnan(none[c]) for c in DIAGNOSTIC_COLUMNS if c not in AGREEMENT_COLUMNS)
    assert none["proto_agree"] == pytest.approx(2.0)
    # a class only one client has contributes no same-class pair; an absent signal class is never a rival
    present = torch.tensor([[True, True], [True, False]])
    out = prototype_diagnostics(protos, present, (torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([True, True])))
    assert math.isfinite(out["proto_agree"]) and out["proto_nearest"] == 1.0


def test_first_per_class_takes_the_first_samples_of_each_class():
    y = torch.tensor([2, 0, 2, 2, 1, 0, 2, 0, 0])
    assert first_per_class(y, 2).tolist() == [0, 1, 2, 4, 5]
    assert first_per_class(y, 10).tolist() == list(range(9))


def test_real_runs_rank_the_controls(tmp_path):
    """Digits runs: FedProto's global prototypes are each client's nearest class, a random (never used) signal is
    not; FedHPro's `average` prototypes (client class means) score above its `random` (unmatched N(0,1)) ones."""
    cfg = from_dict({**BASE, "method": "fedproto", "rounds": 2})
    ctx = build_context(cfg)
    torch.manual_seed(cfg.seed)
    engine = Engine(ctx, METHODS["fedproto"])
    for r in (1, 2):
        res = engine.run_round(r)
    assert res.proto_nearest >= 0.9 and res.proto_margin > 0.2
    signal, present = engine.server.global_class_signal()
    fake = torch.randn(signal.shape, generator=torch.Generator().manual_seed(0)) + signal.mean()
    engine.server.global_class_signal = lambda: (fake, present)
    control = RoundResult(round=2, selected=[], train_loss=0.0)
    engine.evaluate_into(control)
    assert control.proto_nearest < 0.5 and control.proto_margin < res.proto_margin - 0.2
    assert control.proto_agree == res.proto_agree  # the signal-free measure ignores the signal
    fast = dict(METHODS["fedhpro"].fast_test_params)
    runs = {source: train(from_dict({**BASE, "method": "fedhpro",
                                     "method_params": {**fast, "prototype_source": source}}),
                          tmp_path / source).iloc[-1] for source in ("average", "random")}
    assert runs["average"]["proto_nearest"] > runs["random"]["proto_nearest"] + 0.2
    assert runs["average"]["proto_margin"] > runs["random"]["proto_margin"] + 0.2


def test_diagnostics_key_is_validated_and_leaves_hashes_unchanged():
    from fedhpro.config import ConfigError

    cfg = from_dict({**BASE, "method": "fedproto"})
    assert cfg.diagnostics is True and "diagnostics" not in cfg.canonical_dict()
    assert from_dict({**BASE, "method": "fedproto", "diagnostics": True}).config_hash() == cfg.config_hash()
    assert cfg.replace(diagnostics=False).config_hash() == cfg.config_hash()  # an execution key: changes no number
    with pytest.raises(ConfigError, match="'diagnostics' must be true or false"):
        from_dict({**BASE, "method": "fedproto", "diagnostics": "yes"})


def test_batched_global_pass_equals_per_client_passes():
    from fedhpro.diagnostics import LocalPrototypes

    cfg = from_dict({**BASE, "method": "fedproto"})
    ctx = build_context(cfg)
    model = ctx.make_model()
    one, each = LocalPrototypes(None, ctx, 37), LocalPrototypes(None, ctx, 500)
    one.add_all(model, ctx.clients)
    for client in ctx.clients:
        each.add(model, client)
    for a, b in zip(one.protos + one.present, each.protos + each.present):
        assert torch.allclose(a, b, atol=1e-5) if a.is_floating_point() else torch.equal(a, b)


def test_diagnostics_table_reports_final_round_mean_and_sd_over_seeds(tmp_path):
    from fedhpro.aggregate import DIAGNOSTIC_HEADERS, build_tables, collect

    for seed in (0, 1):
        for method in ("fedproto", "fedavg"):
            train(from_dict({**BASE, "method": method, "seed": seed}), tmp_path / f"{method}-{seed}")
    df = collect(sorted(tmp_path.iterdir()))
    table = next(t for t in build_tables(df) if t.name == "diagnostics")
    assert table.header[2:] == [DIAGNOSTIC_HEADERS[c] for c in DIAGNOSTIC_COLUMNS]
    rows = {row[1]: row[2:] for row in table.rows}
    finals = df[df["round"] == 2]
    proto = finals[finals["method"] == "fedproto"]["proto_nearest"].to_numpy()
    expected = f"{proto.mean():.2f} ± {proto.std(ddof=1):.2f}"
    assert rows["FedProto"][DIAGNOSTIC_COLUMNS.index("proto_nearest")] == expected
    fedavg = next(v for k, v in rows.items() if k.startswith("FedAvg"))
    assert fedavg[DIAGNOSTIC_COLUMNS.index("proto_margin")] == "–"  # no global signal
    assert "±" in fedavg[DIAGNOSTIC_COLUMNS.index("proto_agree")]  # signal-free: every method has it


def test_diagnostics_every_skips_rounds_and_changes_no_other_number(tmp_path):
    import pandas as pd

    from fedhpro.config import from_dict
    from fedhpro.diagnostics import DIAGNOSTIC_COLUMNS
    from fedhpro.train import train

    base = {**BASE, "method": "fedproto", "rounds": 3}
    every = train(from_dict(base), tmp_path / "every", threads=1, progress=False)
    sparse = train(from_dict({**base, "diagnostics_every": 2}), tmp_path / "sparse", threads=1, progress=False)
    cols = [c for c in DIAGNOSTIC_COLUMNS if every[c].notna().all()]
    assert "proto_nearest" in cols and "proto_agree" in cols
    assert sparse.loc[sparse["round"] == 1, cols].isna().all(axis=None)  # neither a multiple of 2 nor the last
    for r in (2, 3):  # round 2 (a multiple) and round 3 (the last)
        pd.testing.assert_series_equal(sparse.loc[sparse["round"] == r, cols].iloc[0],
                                       every.loc[every["round"] == r, cols].iloc[0], check_exact=True)
    numbers = ["train_loss", "test_acc", "test_loss", "bytes_up"]
    pd.testing.assert_frame_equal(sparse[numbers], every[numbers], check_exact=True)
