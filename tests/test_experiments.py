"""Experiments (fedhpro.sweep), per-experiment tables (fedhpro.aggregate) and readable figures (fedhpro.figures).

The tables and figures are exercised on synthetic metrics frames (the columns `collect` returns), so
the personalized sample-weighted accuracy and the prototype diagnostics are covered whether or not
the training code of this checkout writes them.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

from fedhpro import figures
from fedhpro.aggregate import build_tables, write_tables
from fedhpro.labels import METHOD_ORDER, STYLES, VARIANT_STYLES, method_label, style_of
from fedhpro.sweep import (SweepConfigError, expand_sweep, experiments_of, pending_datasets_of, runs_by_experiment,
                           validate_workflow_config)

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 6


# ---------------------------------------------------------------------------------------- synthetic metrics
def frame(method: str, *, variant: str = "default", eval_mode: str = "global", alpha: float = 0.5, seed: int = 0,
          base: float = 0.5, weighted: float | None = None, diagnostics: bool = False,
          aggregation: str | None = None, dataset: str = "digits") -> pd.DataFrame:
    """One run's rows as `collect` returns them (accuracy rising from `base`)."""
    rounds = np.arange(1, ROUNDS + 1)
    acc = base + 0.03 * rounds + 0.01 * seed
    run_id = f"{dataset}-{method}-{variant}-{eval_mode}-{alpha}-{seed}"
    personalized = eval_mode == "personalized"
    out = pd.DataFrame({
        "run_dir": f"/runs/{run_id}", "run_id": run_id, "method": method, "variant": variant,
        "eval_mode": eval_mode, "dataset": dataset, "partition": "dirichlet", "alpha": alpha,
        "classes_per_client": -1, "imbalance_ratio": 1.0, "num_clients": 10, "model": "auto",
        "aggregation": aggregation or ("none" if personalized else "fedavg"), "partition_seed": 0, "seed": seed,
        "round": rounds, "status": "finished", "train_loss": 1.0 / rounds,
        "test_acc": np.nan if personalized else acc, "test_loss": 1.0,
        "client_acc_mean": acc if personalized else np.nan, "client_acc_std": 0.05 if personalized else np.nan,
        "bytes_up": 1000 * rounds, "bytes_down": 2000, "acc": acc})
    if weighted is not None:
        out["client_acc_weighted"] = acc + weighted
    if diagnostics:
        out["proto_sep_mean_deg"] = 60.0 + rounds
        out["proto_sep_min_deg"] = 20.0 + rounds
        out["proto_consistency"] = 0.5 + 0.05 * rounds
    return out


def frames(*parts: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True, sort=False)


def caption(table) -> str:
    return table.caption


# ---------------------------------------------------------------------------------------- styles
def test_every_method_has_its_own_colour_and_marker():
    assert set(METHOD_ORDER) <= set(STYLES)
    rows = [(m, "default") for m in METHOD_ORDER] + list(VARIANT_STYLES)
    styles = [style_of(m, v) for m, v in rows]
    assert len({s["color"] for s in styles}) == len(rows)  # no colour shared by two rows
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles}) == len(rows)
    # FedAvg and FedHPro, MOON and any FedHPro variant: never the same colour (the old figures' clashes)
    assert style_of("fedavg")["color"] != style_of("fedhpro")["color"]
    assert style_of("moon")["color"] not in {style_of("fedhpro", v)["color"] for v in ("default", "fedavg", "paper")}
    assert style_of("unknown_method") == style_of("unknown_method")  # deterministic fallback


def _line_colours(fig) -> dict[str, str]:
    """Legend label -> colour of its handle, over the figure legend."""
    legend = fig.legends[0]
    return {text.get_text(): handle.get_color() for text, handle in zip(legend.get_texts(), legend.legend_handles)}


def test_palette_is_the_same_in_every_figure():
    one = frames(frame("fedavg"), frame("fedhpro", aggregation="last_client"), frame("moon"))
    two = frames(frame("gfpl", eval_mode="personalized"), frame("moon", eval_mode="personalized"),
                 frame("fedavg", eval_mode="personalized", alpha=0.1))
    a = _line_colours(figures._accuracy_figure(figures.curve_data(one), "round", "Round", "a"))
    b = _line_colours(figures._accuracy_figure(figures.curve_data(two), "round", "Round", "b"))
    assert a["FedAvg"] == b["FedAvg"] == style_of("fedavg")["color"]
    assert a["MOON"] == b["MOON"]
    assert a["FedHPro (official code)"] == style_of("fedhpro")["color"]
    assert b["GFPL (reconstructed)"] == style_of("gfpl")["color"]


def _bbox(artist, renderer):
    return artist.get_window_extent(renderer)


@pytest.mark.parametrize("n_settings", [1, 4])
def test_legend_lies_outside_every_axes(n_settings):
    parts = [frame(m, alpha=a) for m in ("fedavg", "fedprox", "moon", "creff", "fedproto", "fpl", "fedtgp",
                                         "fedsa", "protonorm", "gfpl")
             for a in (0.5, 0.1, 0.05, 1.0)[:n_settings]]
    fig = figures._accuracy_figure(figures.curve_data(frames(*parts)), "round", "Round", "t")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert len(fig.axes) == n_settings and len(fig.legends) == 1
    legend = _bbox(fig.legends[0], renderer)
    for ax in fig.axes:
        assert ax.get_legend() is None
        assert not legend.overlaps(_bbox(ax, renderer)), "the legend covers a panel"
        assert legend.x0 >= ax.get_window_extent(renderer).x1  # right of the panels


# ---------------------------------------------------------------------------------------- figures per experiment
def test_comparison_figures_keep_ablation_variants_apart(tmp_path):
    df = frames(frame("fedavg"), frame("fedhpro", aggregation="last_client"),
                frame("fedhpro", variant="fedavg", aggregation="fedavg"),
                frame("fedhpro", variant="no_hpcl", aggregation="last_client"),
                frame("fedavg", alpha=0.1), frame("fedhpro", alpha=0.1, aggregation="last_client"))
    paths = figures.write_figures(df, tmp_path, kind="comparison", title="Label skew")
    names = {p.name for p in paths}
    assert names == {f"{stem}.{ext}" for stem in ("accuracy", "communication", "ablation") for ext in ("png", "pdf")}
    settings = figures.curve_data(df)
    main = figures._accuracy_figure(figures._main_rows(settings), "round", "Round", "x")
    assert len(main.axes) == 2  # one panel per setting
    assert set(_line_colours(main)) == {"FedAvg", "FedHPro (official code)", "FedHPro (FedAvg aggregation)"}
    abl = figures._ablation_figure(figures._ablation_panels(settings, "comparison"), "x")
    assert set(_line_colours(abl)) == {"FedHPro: default", "FedHPro: fedavg", "FedHPro: no_hpcl"}
    assert len({c for c in _line_colours(abl).values()}) == 3
    # an experiment without ablation variants has no ablation figure
    plain = figures.write_figures(frames(frame("fedavg"), frame("moon")), tmp_path / "plain")
    assert not [p for p in plain if p.name.startswith("ablation")]


def test_ablation_experiment_figure_has_a_panel_per_method(tmp_path):
    df = frames(frame("fedhpro", aggregation="last_client"), frame("fedhpro", variant="no_hpcl"),
                frame("gfpl"), frame("gfpl", variant="projection"), frame("gfpl", variant="etf"))
    paths = figures.write_figures(df, tmp_path, kind="ablation", title="Ablations")
    assert {p.name for p in paths} == {"ablation.png", "ablation.pdf"}
    panels = figures._ablation_panels(figures.curve_data(df), "ablation")
    assert [p["method"] for p in panels] == ["gfpl", "fedhpro"]  # paper order
    fig = figures._ablation_figure(panels, "x")
    assert len(fig.axes) == 2
    assert "GFPL (reconstructed): projection" in fig.axes[0].get_title() or "GFPL" in fig.axes[0].get_title()


def test_diagnostics_figure_per_setting_when_recorded(tmp_path):
    df = frames(frame("fedproto", diagnostics=True), frame("fedhpro", diagnostics=True, aggregation="last_client"),
                frame("fedavg"), frame("fedproto", alpha=0.1, diagnostics=True), frame("fedavg", alpha=0.1))
    paths = figures.plot_diagnostics(df, tmp_path, title="Label skew")
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert pngs == ["diagnostics_digits_dirichlet_a0.1_n10_global_auto.png",
                    "diagnostics_digits_dirichlet_a0.5_n10_global_auto.png"]
    setting = figures._main_rows(figures.curve_data(df, ("acc", *figures.DIAGNOSTIC_COLUMNS)))[0]
    fig = figures._diagnostics_figure(setting, list(figures.DIAGNOSTIC_COLUMNS), "x")
    assert [ax.get_title() for ax in fig.axes] == list(figures.DIAGNOSTIC_COLUMNS.values())
    assert set(_line_colours(fig)) == {"FedProto", "FedHPro (official code)"}  # FedAvg recorded none
    line = next(ln for ln in setting["lines"] if ln["method"] == "fedproto")
    np.testing.assert_allclose(line["proto_consistency_mean"], 0.5 + 0.05 * np.arange(1, ROUNDS + 1))
    # metrics without the columns (written before they existed): no diagnostics figure, no error
    assert figures.plot_diagnostics(frames(frame("fedavg"), frame("fedproto")), tmp_path / "none") == []
    assert "proto_consistency" not in frames(frame("fedproto")).columns


def test_figures_module_does_not_import_aggregate():
    code = "import sys, fedhpro.figures; assert 'fedhpro.aggregate' not in sys.modules, 'cycle'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------- tables
def test_personalized_tables_show_both_accuracies_and_say_which(tmp_path):
    df = frames(*[frame(m, eval_mode="personalized", seed=s, weighted=0.02) for m in ("fedproto", "gfpl")
                  for s in (0, 1)])
    tables = {t.name: t for t in build_tables(df, "last_k", 2, title="Model heterogeneity",
                                              protocol="personalized mode")}
    assert set(tables) == {"main", "main_weighted", "communication"}
    assert "mean over clients" in caption(tables["main"]) and "sample-weighted" not in caption(tables["main"])
    assert "sample-weighted" in caption(tables["main_weighted"])
    assert "total correct over total local test samples" in caption(tables["main_weighted"])
    assert caption(tables["main"]).startswith("Model heterogeneity.")
    assert "Protocol: personalized mode." in caption(tables["main"])
    # the weighted table's numbers are the weighted column's (2 points above the client mean here)
    mean_cell = tables["main"].rows[0][1].strip("*").split(" ±")[0]
    weighted_cell = tables["main_weighted"].rows[0][1].strip("*").split(" ±")[0]
    assert float(weighted_cell) == pytest.approx(float(mean_cell) + 2.0, abs=0.011)
    assert [r[0] for r in tables["main"].rows] == ["FedProto", "GFPL (reconstructed)"]
    # without the column (older metrics): only the client-mean table
    old = df.drop(columns=["client_acc_weighted"])
    assert "main_weighted" not in {t.name for t in build_tables(old, "final", 1, title="x")}
    paths = write_tables(df, tmp_path, "final", kind="comparison", title="Model heterogeneity")
    assert (tmp_path / "main_weighted.md").read_text().startswith("Table: Model heterogeneity, personalized")
    assert all(p.exists() for p in paths)


def test_global_caption_names_the_global_model():
    tables = build_tables(frames(frame("fedavg"), frame("moon")), "final", 1, title="Label skew")
    for table in tables:
        assert "Accuracy shown: global mode: the test accuracy of the global model" in table.caption
    assert [t.name for t in tables] == ["main", "communication"]  # no empty ablation table in an experiment


def test_ablation_experiment_table_per_method():
    df = frames(frame("fedhpro", aggregation="last_client", base=0.5), frame("fedhpro", variant="no_hpcl", base=0.4,
                                                                            aggregation="last_client"),
                frame("gfpl", base=0.6), frame("gfpl", variant="projection", base=0.65), frame("fedavg"))
    tables = {t.name: t for t in build_tables(df, "final", 1, kind="ablation", title="Ablations")}
    assert set(tables) == {"ablation", "communication"}
    table = tables["ablation"]
    assert table.header[:3] == ["Method", "Variant", "Aggregation"] and table.header[-1] == "Δ vs default"
    rows = {(r[0], r[1]): r for r in table.rows}
    assert set(rows) == {("GFPL (reconstructed)", "default"), ("GFPL (reconstructed)", "projection"),
                         ("FedHPro", "default"), ("FedHPro", "no_hpcl")}  # FedAvg has no variants
    assert rows[("GFPL (reconstructed)", "projection")][-1] == "+5.00"
    assert rows[("FedHPro", "no_hpcl")][-1] == "-10.00"
    assert rows[("FedHPro", "default")][-1] == "reference"
    assert table.caption.startswith("Ablations.")


def test_gfpl_is_labelled_reconstructed():
    assert method_label("gfpl") == "GFPL (reconstructed)"
    assert method_label("gfpl", "projection") == "GFPL (reconstructed, projection)"


# ---------------------------------------------------------------------------------------- sweep
TINY = {
    "defaults": {"rounds": 2, "num_clients": 10, "batch_size": 32, "lr": 0.05, "device": "cpu"},
    "seeds": [0],
    "experiments": {
        "skew": {"datasets": {"digits": {}}, "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
                 "methods": {"fedavg": {"default": {}}, "fedproto": {"default": {}}}},
        "pers": {"defaults": {"eval_mode": "personalized", "client_models": ["cnn", "resnet10"]},
                 "datasets": {"digits": {}}, "heterogeneity": [{"partition": "dirichlet", "alpha": 0.3}],
                 "methods": {"fedproto": {"default": {}}}, "seeds": [0, 1]},
        "abl": {"kind": "ablation", "datasets": {"digits": {}},
                "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
                "methods": {"fedavg": {"default": {}}},
                "ablations": [{"methods": ["fedavg"], "variants": {"lr1": {"config": {"lr": 0.1}}}}]},
    },
}


def test_experiments_expand_share_runs_and_keep_run_ids():
    runs = validate_workflow_config(copy.deepcopy(TINY))
    by = runs_by_experiment(runs)
    assert set(by) == {"skew", "pers", "abl"}
    assert sorted(r.run_id for r in by["skew"]) == ["digits/dirichlet-a0p5-n10/fedavg/default/ps0_s0",
                                                    "digits/dirichlet-a0p5-n10/fedproto/default/ps0_s0"]
    shared = next(r for r in runs if r.run_id == "digits/dirichlet-a0p5-n10/fedavg/default/ps0_s0")
    assert shared.experiments == ("skew", "abl") and shared.kind == "main"  # trained once, reported twice
    assert [r.config.eval_mode for r in by["pers"]] == ["personalized"] * 2
    assert {r.seed for r in by["pers"]} == {0, 1} and by["pers"][0].config.client_models == ("cnn", "resnet10")
    assert by["pers"][0].config.rounds == 2  # top-level defaults inherited
    lr1 = next(r for r in by["abl"] if r.variant == "lr1")
    assert lr1.kind == "ablation" and lr1.config.lr == 0.1
    specs = experiments_of(TINY)
    assert specs["abl"].kind == "ablation" and specs["skew"].kind == "comparison"
    # the same runs as the same sweep written without experiments (ids and config hashes)
    legacy = {k: v for k, v in TINY.items() if k != "experiments"} | TINY["experiments"]["skew"]
    assert {(r.run_id, r.config_hash) for r in expand_sweep(legacy)} == {(r.run_id, r.config_hash) for r in by["skew"]}
    assert {r.experiments for r in expand_sweep(legacy)} == {("main",)}


@pytest.mark.parametrize("change, key", [
    (lambda c: c.update(methods={"fedavg": {"default": {}}}), "methods: is set at the top level"),
    (lambda c: c["experiments"]["skew"].update(kind="table"), "experiments.skew.kind:"),
    (lambda c: c["experiments"]["skew"].update(colour="red"), "experiments.skew.colour:"),
    (lambda c: c["experiments"]["skew"]["methods"].update(fedprox={"default": {"mu": -1}}),
     "experiments.skew.methods.fedprox.default.mu:"),
    (lambda c: c["experiments"]["pers"]["methods"].update(fedavg={"default": {}}),  # fedavg has no personalized mode
     "experiments.pers.defaults.eval_mode:"),
    (lambda c: c["experiments"]["pers"].update(heterogeneity=[{"partition": "dirichlet", "alpha": 0.5}]),
     "experiments.pers: run 'digits/dirichlet-a0p5-n10/fedproto/default/ps0_s0' is also declared"),
    (lambda c: c["defaults"].update(rounds=0), "defaults.rounds:"),
    (lambda c: c["experiments"].update({"bad/name": {"datasets": {"digits": {}}}}), "experiments.bad/name:"),
])
def test_experiment_errors_name_the_key(change, key):
    config = copy.deepcopy(TINY)
    change(config)
    with pytest.raises(SweepConfigError) as info:
        validate_workflow_config(config)
    assert str(info.value).startswith(key), str(info.value)


def _paper_runs():
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    warnings = []
    return config, expand_sweep(config, warn=warnings.append)


def test_paper_config_declares_every_experiment():
    config, runs = _paper_runs()
    by = runs_by_experiment(runs)
    assert list(experiments_of(config)) == ["label_skew", "label_skew_balanced", "label_skew_published",
                                            "feature_shift", "model_heterogeneity", "text", "sun397", "fedproto_mnist",
                                            "fedproto_femnist", "fedproto_cifar10", "fedproto_cifar100", "ablation"]
    assert set(by) == set(experiments_of(config))  # every loader is registered: every experiment has runs
    assert {r.config.eval_mode for r in by["label_skew"]} == {"global"}
    assert {r.method for r in by["label_skew"]} >= set(METHOD_ORDER) - {"local"}  # local: personalized only
    published = by["label_skew_published"]
    assert {r.method for r in published} == {"fedproto", "fedtgp", "fedsa", "protonorm", "gfpl"}
    assert {r.config.eval_mode for r in published} == {"personalized"}
    assert {r.het for r in published} == {r.het for r in by["label_skew"] if r.dataset in ("cifar10", "cifar100")}
    hetero = by["model_heterogeneity"]
    assert {r.config.eval_mode for r in hetero} == {"personalized"}
    assert all(len(set(r.config.client_models)) >= 3 for r in hetero)
    assert {r.method for r in hetero} >= {"fedproto", "fedtgp", "fedsa", "protonorm", "gfpl"}
    assert {r.config.partition for r in by["feature_shift"]} == {"domains"}
    assert {r.dataset for r in by["feature_shift"]} == {"digit_domains", "office_caltech"}
    assert {r.dataset for r in by["text"]} == {"agnews"} and {r.dataset for r in by["sun397"]} == {"sun397"}
    gfpl = {r.variant: r.config.method_params for r in by["ablation"] if r.method == "gfpl"}
    assert gfpl["projection"]["classifier_input"] == "projection" and gfpl["etf"]["eval_rule"] == "etf"
    assert {"no_hpcl", "L1", "default"} <= {r.variant for r in by["ablation"] if r.method == "fedhpro"}
    assert experiments_of(config)["ablation"].kind == "ablation"
    assert pending_datasets_of(config) >= {"digit_domains", "office_caltech", "agnews", "sun397"}
    text = (REPO / "config" / "paper.yaml").read_text()
    assert "/work/" not in text and "shared/specs" not in text  # no path outside the repo
    for tag in ("(A1", "(A3)", "(A5)", "(A7"):
        assert tag in text and tag.strip("()") in (REPO / "docs" / "assumptions.md").read_text()


def test_quick_default_has_a_model_heterogeneity_block():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    by = runs_by_experiment(expand_sweep(config))
    assert set(by) == {"label_skew", "model_heterogeneity", "ablation"}
    hetero = by["model_heterogeneity"]
    assert {r.method for r in hetero} >= {"fedproto", "fedtgp", "fedsa", "protonorm", "gfpl"}
    assert all(r.config.eval_mode == "personalized" and len(set(r.config.client_models)) >= 2 for r in hetero)
    # the label-skew runs keep their run directories
    assert "digits/dirichlet-a0p5-n10/fedhpro/default/ps0_s1" in {r.run_id for r in by["label_skew"]}
    assert {r.variant for r in by["ablation"] if r.method == "gfpl"} == {"default", "projection", "etf"}
