"""Experiments (fedhpro.sweep), per-experiment tables (fedhpro.aggregate) and readable figures (fedhpro.figures).

The tables and figures are exercised on synthetic metrics frames (the columns `collect` returns), so
the personalized sample-weighted accuracy and the prototype diagnostics are covered whether or not
the training code of this checkout writes them.
"""

from __future__ import annotations

import copy
import re
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
from fedhpro.labels import METHOD_ORDER, STYLES, VARIANT_STYLES, grey_level, method_label, style_of
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
        out["proto_cons_centred"] = 0.3 + 0.05 * rounds
        out["proto_margin"] = -0.1 + 0.02 * rounds
        out["proto_nearest"] = 0.4 + 0.01 * rounds
        out["proto_agree_nearest"] = 0.6 + 0.01 * rounds
    return out


def frames(*parts: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True, sort=False)


def caption(table) -> str:
    return table.caption


# ---------------------------------------------------------------------------------------- styles
MAIN_ROWS = [(m, "default") for m in METHOD_ORDER] + list(VARIANT_STYLES)


def test_every_method_has_its_own_colour_and_marker():
    assert set(METHOD_ORDER) <= set(STYLES)
    styles = [style_of(m, v) for m, v in MAIN_ROWS]
    assert len({s["color"] for s in styles}) == len(MAIN_ROWS)  # no colour shared by two rows
    assert len({s["marker"] for s in styles}) == len(MAIN_ROWS)  # nor a marker
    # FedAvg and FedHPro, MOON and any FedHPro variant: never the same colour (the old figures' clashes)
    assert style_of("fedavg")["color"] != style_of("fedhpro")["color"]
    assert style_of("moon")["color"] not in {style_of("fedhpro", v)["color"] for v in ("default", "fedavg", "paper")}
    assert style_of("unknown_method") == style_of("unknown_method")  # deterministic fallback


def test_palette_stays_apart_in_greyscale():
    """Printed in grey, two rows whose colours come out within 0.1 of each other in lightness differ in line
    style (and every row has its own marker): checked on the styles and on a figure rendered in greyscale."""
    styles = {row: style_of(*row) for row in MAIN_ROWS}
    for i, (a, sa) in enumerate(styles.items()):
        for b, sb in list(styles.items())[i + 1:]:
            if abs(grey_level(sa["color"]) - grey_level(sb["color"])) < 0.1:
                assert sa["linestyle"] != sb["linestyle"], (a, b)
    # rendered: each line's pixels, converted to grey, keep the lightness the check above assumed
    parts = [frame(m, variant=v, aggregation="fedavg" if "fedavg" in v else "last_client", base=0.06 * i)
             for i, (m, v) in enumerate(MAIN_ROWS)]  # 6 points apart: the markers do not overlap
    fig = figures._accuracy_figure(figures.curve_data(frames(*parts)), "round", "Round", "")
    fig.set_dpi(figures.DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    ax = fig.axes[0]
    for line in ax.get_lines():
        x, y = line.get_xdata()[0], line.get_ydata()[0]  # the first marker's centre
        px, py = ax.transData.transform((x, y))
        row = int(round(canvas.get_width_height()[1] - py))
        assert grey[row, int(round(px))] == pytest.approx(grey_level(line.get_color()), abs=0.08)


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
def test_legend_lies_below_every_axes(n_settings):
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
        assert legend.y1 <= ax.get_tightbbox(renderer).y0 + 1  # below the panels and their axis labels
    # one panel: one column wide; a grid: the text width
    assert fig.get_figwidth() == (figures.COL_W if n_settings == 1 else figures.TEXT_W)


# ---------------------------------------------------------------------------------------- figures at paper scale
PAPER_ROWS = [(m, "default", None) for m in METHOD_ORDER if m != "fedhpro"] + [
    ("fedhpro", v, a) for v, a in (("default", "last_client"), ("fedavg", "fedavg"), ("paper", "last_client"),
                                   ("paper_fedavg", "fedavg"))]
PAPER_SETTINGS = [(ds, a) for ds in ("cifar10", "cifar100", "tinyimagenet", "digit_domains") for a in (0.05, 0.1, 0.5, 1.0)]


def paper_scale_frame() -> pd.DataFrame:
    """16 settings x 14 main-table rows x 2 seeds, accuracies spread so the lines cross little."""
    return frames(*[frame(m, variant=v, aggregation=agg, dataset=ds, alpha=a, seed=s, base=0.2 + 0.03 * i)
                    for i, (m, v, agg) in enumerate(PAPER_ROWS) for ds, a in PAPER_SETTINGS for s in (0, 1)])


def _font_sizes(fig) -> list[float]:
    texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label,
                                            *ax.get_xticklabels(), *ax.get_yticklabels()) if t.get_text()]
    texts += [t for leg in fig.legends for t in leg.get_texts()]
    return [t.get_fontsize() for t in texts]


@pytest.mark.slow  # renders 4 figures of 4 panels x 14 curves as PNG and PDF (about 30 s)
def test_paper_scale_experiment_splits_into_readable_figures(tmp_path):
    df = paper_scale_frame()
    paths = figures.plot_accuracy(df, tmp_path, title="Label skew")
    # one figure per dataset (4 settings each), PNG + PDF
    assert sorted(p.name for p in paths) == sorted(f"accuracy_{ds}.{ext}" for ds in
                                                   ("cifar10", "cifar100", "tinyimagenet", "digit-domains")
                                                   for ext in ("png", "pdf"))
    groups = figures.figure_groups(figures._main_rows(figures.curve_data(df)), "accuracy")
    assert [len(g) for _, g in groups] == [4, 4, 4, 4]
    for name, group in groups:
        fig = figures._accuracy_figure(group, "round", "Round", name)
        FigureCanvasAgg(fig).draw()
        assert len(fig.axes) == 4 and len(fig.legends[0].get_texts()) == len(PAPER_ROWS)
        assert len({ax.get_ylim() for ax in fig.axes}) == 1  # one y-range per figure
        assert all(ax.get_ylabel() for ax in fig.axes[::2])  # the left column names it
        assert min(_font_sizes(fig)) >= 6.0  # legible at print size, and the figure is printed at its own size
        assert fig.get_figwidth() <= figures.TEXT_W
        for ax in fig.axes:  # bands on FedHPro's published row and the best other row only
            assert len(ax.collections) == 2
    # the PNG is rendered at print size: width in pixels = inches x DPI (plus a tight bounding box)
    png = tmp_path / "accuracy_cifar10.png"
    width = int.from_bytes(png.read_bytes()[16:20], "big")
    assert width <= figures.TEXT_W * figures.DPI + 10


def test_figure_groups_keep_a_small_experiment_in_one_figure():
    settings = figures.curve_data(frames(frame("fedavg"), frame("fedavg", alpha=0.1)))
    assert [(n, len(g)) for n, g in figures.figure_groups(settings, "accuracy")] == [("accuracy", 2)]
    many = figures.curve_data(frames(*[frame("fedavg", alpha=a) for a in (0.01, 0.05, 0.1, 0.3, 0.5, 1, 5)]))
    assert [(n, len(g)) for n, g in figures.figure_groups(many, "accuracy")] == [("accuracy_digits", 6),
                                                                                 ("accuracy_digits_2", 1)]


def test_bands_on_every_line_of_a_sparse_panel():
    data = figures.curve_data(frames(*[frame(m, seed=s) for m in ("fedavg", "moon", "fedproto") for s in (0, 1)]))
    fig = figures._accuracy_figure(data, "round", "Round", "")
    assert len(fig.axes[0].collections) == 3


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
    groups = figures.ablation_deltas(figures.final_runs(df), "comparison")
    assert [(g["method"], [r["variant"] for r in g["rows"]]) for g in groups] == [("fedhpro", ["no_hpcl"])]
    # an experiment without ablation variants has no ablation figure
    plain = figures.write_figures(frames(frame("fedavg"), frame("moon")), tmp_path / "plain")
    assert not [p for p in plain if p.name.startswith("ablation")]


def ablation_frame() -> pd.DataFrame:
    """FedHPro's default and fedavg references and a variant of each, GFPL and a variant; 3 seeds on 2 settings.
    no_hpcl: 5 points below its reference with little seed noise; no_hpcl_fedavg: 1 point below with a lot."""
    parts = []
    noise = {0: -0.04, 1: 0.0, 2: 0.04}
    for alpha in (0.5, 0.1):
        for s in (0, 1, 2):
            parts += [frame("fedhpro", aggregation="last_client", alpha=alpha, seed=s, base=0.5),
                      frame("fedhpro", variant="fedavg", aggregation="fedavg", alpha=alpha, seed=s, base=0.6),
                      frame("fedhpro", variant="no_hpcl", aggregation="last_client", alpha=alpha, seed=s,
                            base=0.45 + noise[s] / 20),
                      frame("fedhpro", variant="no_hpcl_fedavg", aggregation="fedavg", alpha=alpha, seed=s,
                            base=0.59 + noise[s]),
                      frame("gfpl", alpha=alpha, seed=s, base=0.4), frame("gfpl", variant="etf", alpha=alpha, seed=s,
                                                                         base=0.42)]
    return frames(*parts)


def test_ablation_figure_is_delta_against_the_default_of_the_same_aggregation(tmp_path):
    df = ablation_frame()
    paths = figures.write_figures(df, tmp_path, kind="ablation", title="Ablations")
    assert {p.name for p in paths} == {"ablation.png", "ablation.pdf"}
    groups = figures.ablation_deltas(figures.final_runs(df), "ablation")
    assert [g["method"] for g in groups] == ["gfpl", "fedhpro"]  # paper order
    rows = {r["variant"]: r for r in groups[1]["rows"]}
    assert {v: r["reference"] for v, r in rows.items()} == {"no_hpcl": "default", "no_hpcl_fedavg": "fedavg"}
    strong = list(rows["no_hpcl"]["per_setting"].values())[0]
    weak = list(rows["no_hpcl_fedavg"]["per_setting"].values())[0]
    assert strong["delta"] == pytest.approx(-5.0, abs=1e-6) and strong["n"] == 3 and strong["noise"] is False
    assert weak["delta"] == pytest.approx(-1.0, abs=1e-6) and weak["noise"] is True  # SE = 4/sqrt(3) points
    assert weak["se"] == pytest.approx(4.0 / np.sqrt(3), rel=1e-6)
    fig = figures._ablation_figure(groups, "x")
    assert len(fig.axes) == 2 and len({ax.get_xlim() for ax in fig.axes}) == 1
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["no_hpcl", "no_hpcl (vs fedavg)"]
    assert all(ax.get_ylabel() and ax.get_xlabel().startswith("Δ accuracy") for ax in fig.axes)
    # error bars: one per (variant, setting), ±1 SE wide
    bars = [c for c in fig.axes[1].containers]
    assert len(bars) == 4


def clients_frame(df: pd.DataFrame, n_clients: int = 10) -> pd.DataFrame:
    """Per-client rows (the clients.parquet columns plus the run's keys, as `collect_clients` returns them):
    client c of a run scores the run's mean accuracy + (c - 4.5) / 100."""
    rows = []
    for run_id, run in df.groupby("run_id"):
        first = run.iloc[0]
        for _, r in run.iterrows():
            for c in range(n_clients):
                acc = float(r["acc"]) + (c - 4.5) / 100
                rows.append({**{k: first[k] for k in ("run_dir", "method", "variant", "eval_mode", "dataset",
                                                      "partition", "alpha", "classes_per_client", "imbalance_ratio",
                                                      "num_clients", "model", "aggregation", "seed",
                                                      "partition_seed")},
                             "run_id": run_id, "round": int(r["round"]), "client": c, "client_acc": acc,
                             "client_test_size": 40, "client_correct": int(round(acc * 40))})
    return pd.DataFrame(rows)


def test_clients_figure_shows_each_methods_distribution_and_worst_decile(tmp_path):
    pers = frames(*[frame(m, eval_mode="personalized", seed=s, base=b) for m, b in (("fedproto", 0.4), ("gfpl", 0.5))
                    for s in (0, 1)])
    clients = clients_frame(pers)
    paths = figures.write_figures(pers, tmp_path, title="Model heterogeneity", clients=clients)
    assert {"clients.png", "clients.pdf"} <= {p.name for p in paths}
    (setting,) = figures.client_distributions(clients)
    assert [b["name"] for b in setting["boxes"]] == ["FedProto", "GFPL (reconstructed)"]
    box = setting["boxes"][0]
    assert len(box["acc"]) == 20  # 10 clients x 2 seeds, the last round only
    final = 100 * (0.4 + 0.03 * ROUNDS)
    assert box["acc"].min() == pytest.approx(final - 4.5, abs=1e-9)
    fig = figures._clients_figure([setting], "x")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "Client accuracy (%)"
    worst = ax.collections[0].get_offsets()[:, 1]  # the worst-10% markers: worst 2 of 20 clients
    assert worst[0] == pytest.approx(final - 4.5 + 0.5, abs=1e-6)  # client 0 of seeds 0 and 1 (1 point apart)
    assert figures.worst_mean(np.arange(10.0)) == 0.0 and figures.worst_mean(np.arange(20.0)) == 0.5
    # no per-client results (older runs) or only global-mode runs: no figure, no error
    assert figures.plot_clients(None, tmp_path / "none") == []
    glob_ = frames(frame("fedavg"))
    assert figures.plot_clients(clients_frame(glob_), tmp_path / "none") == []


def test_diagnostics_figure_per_setting_when_recorded(tmp_path):
    df = frames(frame("fedproto", diagnostics=True), frame("fedhpro", diagnostics=True, aggregation="last_client"),
                frame("fedavg"), frame("fedproto", alpha=0.1, diagnostics=True), frame("fedavg", alpha=0.1))
    paths = figures.plot_diagnostics(df, tmp_path, title="Label skew")
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert pngs == ["diagnostics_digits_dirichlet_a0.1_n10_global_auto.png",
                    "diagnostics_digits_dirichlet_a0.5_n10_global_auto.png"]
    setting = figures._main_rows(figures.curve_data(df, ("acc", *figures.DIAGNOSTIC_COLUMNS)))[0]
    fig = figures._diagnostics_figure(setting, list(figures.DIAGNOSTIC_COLUMNS), "x")
    assert len({ax.get_title() for ax in fig.axes}) == len(figures.DIAGNOSTIC_COLUMNS)  # distinct panels
    for ax, text in zip(fig.axes, figures.DIAGNOSTIC_COLUMNS.values()):
        assert text.startswith(ax.get_title()) and ax.get_ylabel() and ax.get_ylabel() in text  # a y-label each
    assert set(_line_colours(fig)) == {"FedProto", "FedHPro (official code)"}  # FedAvg recorded none
    line = next(ln for ln in setting["lines"] if ln["method"] == "fedproto")
    np.testing.assert_allclose(line["proto_cons_centred_mean"], 0.3 + 0.05 * np.arange(1, ROUNDS + 1))
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
    assert set(tables) == {"main", "main_weighted", "clients", "communication"}
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
    assert rows[("GFPL (reconstructed)", "projection")][-1] == "+5.00 (n=1, no SE)"  # one seed: noise unknown
    assert rows[("FedHPro", "no_hpcl")][-1] == "-10.00 (n=1, no SE)"
    assert rows[("FedHPro", "default")][-1] == "reference"
    assert table.caption.startswith("Ablations.")
    assert "±" not in table.caption.split("Δ:")[0]  # one seed: no ± promised


def test_ablation_table_says_when_a_delta_is_inside_the_noise():
    table = build_tables(ablation_frame(), "final", 1, kind="ablation", title="Ablations")[0]
    rows = {(r[0], r[1]): r for r in table.rows}
    assert rows[("FedHPro", "default")][-1] == rows[("FedHPro", "fedavg")][-1] == "reference"
    # no_hpcl: -5 points on both settings, SE ~0.08: resolved; no_hpcl_fedavg: -1 point, SE 4/sqrt(3)/sqrt(2)
    assert rows[("FedHPro", "no_hpcl")][-1] == "-5.00 ± 0.08"
    se = np.sqrt(2 * (4 / np.sqrt(3)) ** 2) / 2
    assert rows[("FedHPro", "no_hpcl_fedavg")][-1] == f"-1.00 ± {se:.2f} (noise) vs fedavg"
    assert rows[("FedHPro", "no_hpcl_fedavg")][2] == "FedAvg aggregation"
    assert "|Δ| < 2 SE" in table.caption and "over 3 seeds" in table.caption


def test_method_notes_once_per_experiment_and_only_when_needed():
    df = frames(frame("fedavg", seed=0), frame("fedavg", seed=1), frame("fedhpro", aggregation="last_client"),
                frame("fedhpro", seed=1, aggregation="last_client"))
    tables = build_tables(df, "final", 1, title="Label skew")
    note = "last sampled client's trained model"
    assert [note in t.caption for t in tables] == [True, False]  # main, communication
    assert "Row names as explained in the main table's caption." in tables[1].caption
    plain = build_tables(frames(frame("fedavg"), frame("moon")), "final", 1, title="Label skew")
    assert not any(note in t.caption or "Row names" in t.caption or "reconstructed" in t.caption for t in plain)
    gfpl = build_tables(frames(frame("gfpl")), "final", 1, title="x")
    assert "GFPL is reconstructed" in gfpl[0].caption and "last sampled" not in gfpl[0].caption
    # personalized rows: which methods predict by the nearest prototype (and which by their classifier)
    pers = build_tables(frames(*[frame(m, eval_mode="personalized") for m in ("fedproto", "fedtgp", "gfpl")]),
                        "final", 1, title="x")
    assert ("Personalized mode: FedProto, FedTGP predict by the nearest global prototype; GFPL (reconstructed) by "
            "its classifier") in pers[0].caption
    assert "nearest" not in build_tables(frames(frame("fedproto")), "final", 1, title="x")[0].caption


def test_one_seed_shows_no_plus_minus():
    tables = build_tables(frames(frame("fedavg"), frame("moon")), "final", 1, title="Label skew")
    assert "1 seed" in tables[0].caption and "±" not in tables[0].caption
    assert all("±" not in cell for row in tables[0].rows for cell in row)
    two = build_tables(frames(*[frame(m, seed=s) for m in ("fedavg", "moon") for s in (0, 1)]), "final", 1, title="x")
    assert "mean ± std over 2 seeds" in two[0].caption


def test_clients_table_reports_spread_and_worst_decile():
    pers = frames(*[frame(m, eval_mode="personalized", seed=s, base=b) for m, b in (("fedproto", 0.4), ("gfpl", 0.5))
                    for s in (0, 1)])
    clients = clients_frame(pers)
    tables = {t.name: t for t in build_tables(pers, "final", 1, title="Model heterogeneity", clients=clients)}
    table = tables["clients"]
    assert table.header == ["Setting", "Method", "Mean (%)", "Client std (points)", "Worst 10% (%)"]
    row = next(r for r in table.rows if r[1] == "FedProto")
    assert row[3] == "5.00 ± 0.00"  # client_acc_std of the synthetic metrics (0.05)
    final = [100 * (0.4 + 0.03 * ROUNDS + 0.01 * s) - 4.5 for s in (0, 1)]  # client 0 per seed
    assert row[4] == f"{np.mean(final):.2f} ± {np.std(final, ddof=1):.2f}"
    # without per-client results the worst-decile column says so; a global-mode experiment has no such table
    old = {t.name: t for t in build_tables(pers, "final", 1, title="x")}
    assert all(r[4] == "–" for r in old["clients"].rows)
    assert "clients" not in {t.name for t in build_tables(frames(frame("fedavg")), "final", 1, title="x")}


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


# ---------------------------------------------------------------------------------------- README figures
def _dry_run(*args: str) -> str:
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "snakemake"), "-n", "--nolock", "--cores", "1", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow  # two Snakemake dry runs of the quick default (the run table imports torch): about 40 s
def test_readme_figures_are_regenerated_by_the_quick_default(tmp_path):
    out = _dry_run("--forceall")
    jobs = set(re.findall(r"output: (docs/figures/\S+\.png)", out))
    assert jobs == {f"docs/figures/{name}.png" for name in ("accuracy", "communication", "ablation", "diagnostics")}
    # another config (--configfile, e.g. the paper's grid) leaves the README's figures alone
    config = tmp_path / "config.yaml"
    config.write_text((REPO / "config" / "config.yaml").read_text().replace("results: results",
                                                                           f"results: {tmp_path / 'res'}"))
    assert "docs/figures" not in _dry_run("--forceall", "--configfile", str(config))


def test_collect_clients_reads_the_per_client_file_defensively(tmp_path):
    from fedhpro.aggregate import MetricsFileError, collect_clients

    pers = frames(*[frame(m, eval_mode="personalized", seed=s) for m in ("fedproto", "gfpl") for s in (0, 1)])
    pers["run_dir"] = [str(tmp_path / rid) for rid in pers["run_id"]]
    written = clients_frame(pers)
    run_ids = sorted(pers["run_id"].unique())
    for rid in run_ids[:3]:  # the fourth run predates the file: no per-client results, not an error
        (tmp_path / rid).mkdir()
        written.loc[written["run_id"] == rid, list(agg_client_columns())].to_parquet(tmp_path / rid / "clients.parquet")
    got = collect_clients(pers)
    assert sorted(got["run_id"].unique()) == run_ids[:3]
    assert len(got) == 3 * ROUNDS * 10
    row = got[(got["run_id"] == run_ids[0]) & (got["client"] == 0) & (got["round"] == 1)].iloc[0]
    first = pers[pers["run_id"] == run_ids[0]].iloc[0]
    assert row["method"] == first["method"] and row["eval_mode"] == "personalized" and row["seed"] == first["seed"]
    assert row["client_acc"] == pytest.approx(first["acc"] - 0.045)
    # zero rows (a run without per-client test splits): nothing; a file of another run or lacking a column: named
    empty = written.iloc[0:0][list(agg_client_columns())]
    empty.to_parquet(tmp_path / run_ids[0] / "clients.parquet")
    assert run_ids[0] not in set(collect_clients(pers)["run_id"])
    other = written[written["run_id"] == run_ids[2]][list(agg_client_columns())]
    other.to_parquet(tmp_path / run_ids[1] / "clients.parquet")
    with pytest.raises(MetricsFileError, match="belong to another run"):
        collect_clients(pers)
    other.drop(columns=["client_acc"]).to_parquet(tmp_path / run_ids[1] / "clients.parquet")
    with pytest.raises(MetricsFileError, match=r"lack column\(s\) client_acc"):
        collect_clients(pers)


def agg_client_columns() -> tuple[str, ...]:
    from fedhpro.aggregate import CLIENT_COLUMNS

    return CLIENT_COLUMNS
