"""Aggregation of real runs (scikit-learn digits): tidy table, reporting rules, tables, divergence, schema, figures."""

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import digits_run
from fedhpro import aggregate as agg
from fedhpro.aggregate import (DuplicateRunError, MetricsFileError, SchemaVersionError, collect, latex_escape,
                               summarize, summarize_runs, write_tables)
from fedhpro.config import from_dict
from fedhpro.figures import curve_data, write_figures
from fedhpro.methods import fast_test_params
from fedhpro.runio import METRICS, METRICS_SCHEMA_VERSION
from fedhpro.train import train

BASE = digits_run(rounds=3, num_clients=5, device="cpu")
K = 2  # last_k used throughout (runs have 3 rounds, so final / last 2 / best all differ in general)
RULE_PHRASES = {"final": "of the final round", "last_k": f"as the mean of the last {K} rounds",
                "best": "of the best round"}


def _runs_spec():
    # FedHPro with its declared fast_test_params: these tests check aggregation of real runs, not FedHPro's
    # accuracy, and its default server steps made the module's setup a third slower
    fast = fast_test_params("fedhpro")
    spec = {}
    for method in ("fedavg", "fedhpro"):
        for alpha in (0.5, 0.1):
            for seed in (0, 1):
                spec[f"{method}_a{alpha}_s{seed}"] = {"method": method, "alpha": alpha, "seed": seed,
                                                      **({"method_params": fast} if method == "fedhpro" else {})}
    spec["fedhpro-nohpcl_a0.5_s0"] = {"method": "fedhpro", "variant": "no_hpcl",
                                      "method_params": {**fast, "hpcl": False}, "alpha": 0.5, "seed": 0}
    return spec


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """9 real runs: {FedAvg, FedHPro} x Dir(0.5), Dir(0.1) x seeds 0, 1, and a FedHPro variant (seed 0)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend (2-core CI machines)
    try:
        for name, changes in _runs_spec().items():
            train(from_dict({**BASE, **changes}), root / name)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def df(runs_root):
    return collect(str(runs_root / "**" / METRICS))


def read(runs_root: Path, name: str) -> pd.DataFrame:
    return pq.read_table(runs_root / name / METRICS).to_pandas()


def rewrite(src_dir: Path, dst_dir: Path, edit=None, meta_changes=None) -> Path:
    """Copy a run's metrics.parquet, editing its rows and/or its schema metadata (everything else kept)."""
    table = pq.read_table(src_dir / METRICS)
    meta = dict(table.schema.metadata)
    frame = table.to_pandas()
    if edit is not None:
        frame = edit(frame)
    meta.update(meta_changes or {})
    out = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(meta)
    dst_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, dst_dir / METRICS)
    return dst_dir


def copy_runs(runs_root: Path, dst: Path, skip=()) -> Path:
    for run in sorted(runs_root.iterdir()):
        if run.name not in skip:
            (dst / run.name).mkdir(parents=True)
            shutil.copy(run / METRICS, dst / run.name / METRICS)
    return dst


def diverge(frame: pd.DataFrame, at: int) -> pd.DataFrame:
    """What `train` writes when round `at` blows up: rounds up to `at`, that one without metrics, all 'diverged'."""
    frame = frame[frame["round"] <= at].copy()
    last = frame["round"] == at
    for col in ("train_loss", "test_acc", "test_loss"):
        frame.loc[last, col] = np.nan
    frame["status"] = "diverged"
    return frame


def hand_value(frame: pd.DataFrame, rule: str) -> float:
    acc = frame.sort_values("round")["test_acc"].to_numpy(float)
    return {"final": acc[-1], "last_k": acc[-K:].mean(), "best": acc.max()}[rule]


def summary_row(summary: pd.DataFrame, **keys) -> pd.Series:
    sel = np.ones(len(summary), bool)
    for k, v in keys.items():
        sel &= np.isclose(summary[k], v) if isinstance(v, float) else (summary[k] == v).to_numpy()
    assert sel.sum() == 1, keys
    return summary[sel].iloc[0]


def strip_escaped(tex: str) -> str:
    return tex.replace(r"\{", "").replace(r"\}", "").replace(r"\&", "")


# ---------------------------------------------------------------------------------------------------- collect
def test_tidy_table_has_one_row_per_run_and_round(df, runs_root):
    names = sorted(_runs_spec())
    assert df["run_dir"].nunique() == len(names) == df["run_id"].nunique()
    assert len(df) == sum(len(read(runs_root, n)) for n in names) == 3 * len(names)
    assert not df.duplicated(["run_dir", "round"]).any()
    for name in names:
        mine = df[df["run_dir"] == str(runs_root / name)].sort_values("round")
        raw = read(runs_root, name)
        assert list(mine["round"]) == list(raw["round"]) == [1, 2, 3]
        np.testing.assert_array_equal(mine["bytes_up"].to_numpy(), raw["bytes_up"].to_numpy())
        assert raw["test_acc"].notna().all() and raw["client_acc_mean"].isna().all()  # global mode
        np.testing.assert_allclose(mine["acc"].to_numpy(), raw["test_acc"].to_numpy())


def test_missing_file_and_empty_pattern_are_named(runs_root, tmp_path):
    with pytest.raises(MetricsFileError, match=re.escape(f"{tmp_path / 'nope'} (no such run directory or file)")):
        collect([runs_root / "fedavg_a0.5_s0", tmp_path / "nope"])
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(MetricsFileError, match=re.escape(str(tmp_path / "unfinished" / METRICS))):
        collect([runs_root / "fedavg_a0.5_s0", tmp_path / "unfinished"])
    with pytest.raises(MetricsFileError, match="no metrics files match"):
        collect(str(tmp_path / "**" / "metrics.parquet"))


def test_other_schema_version_is_refused_naming_the_run(runs_root, tmp_path):
    old = rewrite(runs_root / "fedavg_a0.5_s0", tmp_path / "old-run",
                  meta_changes={b"fedhpro.schema_version": b"0"})
    good = runs_root / "fedhpro_a0.5_s0"
    with pytest.raises(SchemaVersionError) as info:
        collect([good, old])
    msg = str(info.value)
    assert str(old) in msg and "schema version 0" in msg and str(METRICS_SCHEMA_VERSION) in msg
    assert "regenerate" in msg and str(good) not in msg
    # the CLI reports it as an error, writes nothing
    assert agg.main(["--runs", str(good), "--runs", str(old), "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()


def test_duplicate_run_is_refused(runs_root, tmp_path):
    dup = rewrite(runs_root / "fedavg_a0.5_s0", tmp_path / "copy")
    with pytest.raises(DuplicateRunError, match="copy"):
        collect([runs_root / "fedavg_a0.5_s0", dup])


# ---------------------------------------------------------------------------------------------------- rules
@pytest.mark.parametrize("rule", ["final", "last_k", "best"])
def test_reporting_rules_match_the_parquet(df, runs_root, rule):
    runs = summarize_runs(df, rule, K)
    assert len(runs) == df["run_dir"].nunique()
    for name in _runs_spec():
        raw = read(runs_root, name)
        row = runs[runs["run_dir"] == str(runs_root / name)].iloc[0]
        assert row["status"] == "finished" and pd.isna(row["diverged_round"])
        assert row["acc"] == pytest.approx(hand_value(raw, rule), abs=1e-12)


def test_rules_differ_and_are_ordered(df):
    final, last, best = (summarize_runs(df, r, K).set_index("run_dir")["acc"] for r in ("final", "last_k", "best"))
    assert (best >= final - 1e-12).all() and (best >= last - 1e-12).all()
    assert not np.allclose(final, last)  # the rules give different numbers on these runs


def test_mean_std_and_n_over_seeds(df, runs_root):
    summary = summarize(df, "last_k", K)
    for method in ("fedavg", "fedhpro"):
        for alpha in (0.5, 0.1):
            vals = np.array([hand_value(read(runs_root, f"{method}_a{alpha}_s{s}"), "last_k") for s in (0, 1)]) * 100
            row = summary_row(summary, method=method, variant="default", eval_mode="global", alpha=alpha)
            assert row["n"] == 2 and row["n_diverged"] == 0
            assert row["acc_mean_pct"] == pytest.approx(vals.mean())
            assert row["acc_std_pct"] == pytest.approx(vals.std(ddof=1))
            assert row["cell"] == f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}"
    single = summary_row(summary, method="fedhpro", variant="no_hpcl")
    assert single["n"] == 1 and np.isnan(single["acc_std_pct"]) and single["cell"].endswith("(n=1)")


# ---------------------------------------------------------------------------------------------------- tables
@pytest.fixture(scope="module")
def tables(df, tmp_path_factory):
    out = {}
    for rule in ("final", "last_k", "best"):
        d = tmp_path_factory.mktemp(f"tables_{rule}")
        out[rule] = (d, write_tables(df, d, rule=rule, last_k=K))
    return out


def test_write_tables_writes_every_format(tables):
    d, paths = tables["final"]
    names = sorted(p.name for p in paths)
    expected = [f"{t}.{e}" for t in ("ablation", "communication", "diagnostics", "main") for e in ("csv", "md", "tex")]
    assert names == sorted(expected + ["runs.csv", "settings.csv"])
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert not (d / "domains.md").exists()  # no domain_acc_* columns on digits
    runs = pd.read_csv(d / "runs.csv")
    assert len(runs) == len(_runs_spec()) and set(runs["status"]) == {"finished"}


@pytest.mark.parametrize("rule", ["final", "last_k", "best"])
def test_captions_state_the_rule_in_every_format(tables, rule):
    d, _ = tables[rule]
    phrase = RULE_PHRASES[rule]
    for name in ("main", "ablation", "communication"):
        md_first = (d / f"{name}.md").read_text().splitlines()[0]
        assert md_first.startswith("Table: ") and f"Accuracy (%) {phrase}, mean ± std" in md_first
        csv_first = (d / f"{name}.csv").read_text().splitlines()[0]
        assert csv_first.startswith("# ") and phrase in csv_first
        caption = re.search(r"\\caption\{(.*)\}\n", (d / f"{name}.tex").read_text()).group(1)
        assert latex_escape(phrase) in caption and r"\%" in caption and r"$\pm$" in caption


def test_main_table_cells_and_bold_best(tables, df):
    d, _ = tables["last_k"]
    summary = summarize(df, "last_k", K)
    md = (d / "main.md").read_text().splitlines()
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header[0] == "Method"
    assert header[1:] == ["digits Dir(0.5)", "digits Dir(0.1)"]
    body = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in md[4:]}
    assert list(body) == ["FedAvg", "FedHPro (official code)"]  # its ablation variant: ablation table only
    col = header.index("digits Dir(0.1)") - 1
    means = {m: summary_row(summary, method=m, variant="default", alpha=0.1)["acc_mean_pct"]
             for m in ("fedavg", "fedhpro")}
    best = max(means, key=means.get)
    label = {"fedavg": "FedAvg", "fedhpro": "FedHPro (official code)"}
    for m in means:
        cell = body[label[m]][col]
        text = summary_row(summary, method=m, variant="default", alpha=0.1)["cell"]
        assert cell == (f"**{text}**" if m == best else text)
    # every column has exactly the bold cells whose rounded mean is the column's best
    n_bold = sum(c.startswith("**") for row in body.values() for c in row)
    assert n_bold >= len(header) - 1
    tex = (d / "main.tex").read_text()
    assert tex.count(r"\textbf{") == n_bold
    csv_text = (d / "main.csv").read_text()
    assert "**" not in csv_text and r"\textbf" not in csv_text
    parsed = pd.read_csv(d / "main.csv", skiprows=1)
    assert list(parsed.columns) == header and len(parsed) == 2


def test_latex_is_syntactically_sound(tables):
    for rule, (d, paths) in tables.items():
        for path in [p for p in paths if p.suffix == ".tex"]:
            tex = path.read_text()
            flat = strip_escaped(tex)
            depth = 0
            for ch in flat:
                depth += {"{": 1, "}": -1}.get(ch, 0)
                assert depth >= 0, path
            assert depth == 0, path
            assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
            assert tex.index(r"\begin{table}") < tex.index(r"\caption{") < tex.index(r"\begin{tabular}") \
                < tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule") \
                < tex.index(r"\end{tabular}") < tex.index(r"\end{table}")
            spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
            rows = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")].splitlines()[1:]
            for line in rows:
                if line == r"\midrule":
                    continue
                assert line.endswith(r"\\"), line
                assert strip_escaped(line).count("&") == len(spec) - 1, line
            assert tex.count("$") % 2 == 0
            assert "_" not in tex.replace(r"\_", ""), path  # the variant name no_hpcl is escaped


def test_latex_escape():
    assert latex_escape("a_b & 50% #1 {x} ~ ^ \\ ±ρ") == \
        r"a\_b \& 50\% \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{} $\pm$$\rho$"


def test_ablation_table_has_default_reference_and_delta(tables, df):
    d, _ = tables["final"]
    summary = summarize(df, "final", K)
    lines = (d / "ablation.md").read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Variant", "Aggregation", "digits Dir(0.5)", "Δ vs default"]  # only where variants ran
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in lines[4:]]
    assert [r[0] for r in rows] == ["default", "no_hpcl"]
    assert [r[1] for r in rows] == ["last-client aggregation"] * 2
    ref = summary_row(summary, method="fedhpro", variant="default", alpha=0.5, eval_mode="global")
    var = summary_row(summary, method="fedhpro", variant="no_hpcl")
    assert rows[0][3] == "reference"
    # the variant ran seed 0 only: Δ is its paired difference with the default's seed 0, with no SE
    runs = summarize_runs(df, "final", K)
    seed0 = runs[(runs["method"] == "fedhpro") & (runs["alpha"] == 0.5) & (runs["seed"] == 0)]
    paired = 100 * (seed0.loc[seed0["variant"] == "no_hpcl", "acc"].iloc[0]
                    - seed0.loc[seed0["variant"] == "default", "acc"].iloc[0])
    assert rows[1][3] == f"{paired:+.2f} (n=1, no SE)"
    assert rows[0][2].strip("*") == ref["cell"] and rows[1][2].strip("*") == var["cell"]
    # the aggregation note is in the main table's caption, once per experiment; the others point to it
    assert "last sampled client" in (d / "main.md").read_text().splitlines()[0]
    assert "last sampled client" not in lines[0] and "main table's caption" in lines[0]
    tex = (d / "ablation.tex").read_text()
    assert r"$\Delta$ vs default" in tex and r"no\_hpcl" in tex


def test_communication_table_matches_bytes(tables, df, runs_root):
    d, _ = tables["final"]
    table = pd.read_csv(d / "communication.csv", skiprows=1)
    assert list(table.columns) == ["Setting", "Method", "Up (MB/round)", "Down (MB/round)", "Total (MB)",
                                   "Target (%)", "To target (MB)", "Client s/round", "Server s/round",
                                   "Accuracy (%)"]
    frames = [read(runs_root, f"fedhpro_a0.1_s{s}") for s in (0, 1)]
    up = np.mean([f["bytes_up"].mean() for f in frames]) / 1e6
    down = np.mean([f["bytes_down"].mean() for f in frames]) / 1e6
    total = np.mean([(f["bytes_up"] + f["bytes_down"]).sum() for f in frames]) / 1e6
    row = table[(table["Setting"] == "digits Dir(0.1)") & (table["Method"] == "FedHPro (official code)")].iloc[0]
    assert float(row["Up (MB/round)"]) == pytest.approx(up, abs=0.006)
    assert float(row["Down (MB/round)"]) == pytest.approx(down, abs=0.006)
    assert float(row["Total (MB)"]) == pytest.approx(total, abs=0.006)
    assert up > 0 and down > 0
    # measured seconds per round: the metrics' time_local / time_server, mean over rounds and seeds
    client_s = np.mean([f["time_local"].mean() for f in frames])
    server_s = np.mean([f["time_server"].mean() for f in frames])
    assert float(row["Client s/round"]) == pytest.approx(client_s, rel=0.06, abs=0.002)
    assert float(row["Server s/round"]) == pytest.approx(server_s, rel=0.06, abs=0.002)
    # MB to the target: cumulative bytes at the first round at or above 90% of the setting's median accuracy
    summary = summarize(df, "final", K)
    here = summary[np.isclose(summary["alpha"], 0.1)]
    target = 0.9 * here["acc_mean_pct"].median()
    assert float(row["Target (%)"]) == pytest.approx(target, abs=0.051)
    reached = []
    for f in frames:
        f = f.sort_values("round")
        cum = (f["bytes_up"] + f["bytes_down"]).cumsum() / 1e6
        hit = f["test_acc"] * 100 >= target
        if hit.any():
            reached.append(cum[hit.to_numpy()].iloc[0])
    cell = str(row["To target (MB)"])
    if not reached:
        assert cell == "not reached"
    else:
        assert float(cell.split(" ")[0]) == pytest.approx(np.mean(reached), abs=0.006)
        assert cell.endswith("seeds)") == (len(reached) < 2)
    assert len(table) == len(summarize(df))


@pytest.mark.parametrize("mode", ["global", "personalized"])
def test_fedhpro_upload_ratio_from_real_bytes(tmp_path, mode):
    """FedHPro's upload per round against FedProto's, from the bytes of real one-round runs (digits, 10 classes):
    stated in the communication caption and equal to the bytes ratio. Personalized (no weights shared): about the
    number of classes (one classifier gradient per class against one prototype per class); global mode: both
    also send the model, so a little above 1."""
    spec = {**BASE, "rounds": 1, "alpha": 0.5}
    if mode == "personalized":
        spec.update(eval_mode="personalized", client_models=["cnn", "resnet10"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("fedproto", "fedhpro"):
            train(from_dict({**spec, "method": method}), tmp_path / method)
    finally:
        torch.set_num_threads(threads)
    df = collect([str(tmp_path / "fedproto"), str(tmp_path / "fedhpro")])
    ratio = read(tmp_path, "fedhpro")["bytes_up"].mean() / read(tmp_path, "fedproto")["bytes_up"].mean()
    (comm,) = [t for t in agg.build_tables(df, "final", 1, title="x") if t.name == "communication"]
    assert f"digits Dir(0.5)" in comm.caption and f": {ratio:.1f}x" in comm.caption
    assert "one classifier gradient per class" in comm.caption
    if mode == "personalized":  # measured 12.2x (10 classes; the uploaded head adds the rest)
        assert 8 < ratio < 16
    else:  # measured 1.11x
        assert 1.0 < ratio < 1.5


def test_personalized_accuracy_is_the_client_mean(runs_root, tmp_path):
    def personalize(f):
        f = f.copy()
        f["run_id"] = f["run_id"] + "-p"
        f["eval_mode"] = "personalized"
        f["client_acc_mean"] = np.minimum(f["test_acc"] + 0.1, 1.0)
        f["client_acc_std"] = 0.05
        f["test_acc"] = np.nan
        return f

    pers = [rewrite(runs_root / f"fedavg_a0.5_s{s}", tmp_path / f"pers{s}", edit=personalize) for s in (0, 1)]
    df = collect([runs_root / "fedavg_a0.5_s0", runs_root / "fedavg_a0.5_s1", *pers])
    p = df[df["eval_mode"] == "personalized"]
    np.testing.assert_array_equal(p["acc"].to_numpy(), p["client_acc_mean"].to_numpy())
    summary = summarize(df, "best", K)
    row = summary_row(summary, eval_mode="personalized")
    vals = np.array([min(read(runs_root, f"fedavg_a0.5_s{s}")["test_acc"].max() + 0.1, 1.0) for s in (0, 1)]) * 100
    assert row["acc_mean_pct"] == pytest.approx(vals.mean()) and row["n"] == 2
    # two settings that differ only in evaluation mode get labels that tell them apart
    assert sorted(summary["setting"]) == ["digits Dir(0.5) [global]", "digits Dir(0.5) [personalized]"]
    assert summary["setting_slug"].nunique() == 2


# ---------------------------------------------------------------------------------------------------- divergence
def test_diverged_seed_is_reported_and_excluded(runs_root, tmp_path):
    root = copy_runs(runs_root, tmp_path / "runs", skip={"fedavg_a0.5_s1", "fedavg_a0.1_s0", "fedavg_a0.1_s1"})
    rewrite(runs_root / "fedavg_a0.5_s1", root / "fedavg_a0.5_s1", edit=lambda f: diverge(f, 2))
    for s, at in ((0, 2), (1, 3)):  # every seed of FedAvg Dir(0.1) diverges
        rewrite(runs_root / f"fedavg_a0.1_s{s}", root / f"fedavg_a0.1_s{s}", edit=lambda f, at=at: diverge(f, at))
    version, config = agg.read_metrics_meta(root / "fedavg_a0.5_s1" / METRICS)
    assert version == METRICS_SCHEMA_VERSION and config["seed"] == 1  # metadata kept
    df = collect(str(root / "*"))
    runs = summarize_runs(df, "final", K).set_index("run_dir")
    div = runs.loc[str(root / "fedavg_a0.5_s1")]
    assert div["status"] == "diverged" and div["diverged_round"] == 2 and np.isnan(div["acc"])
    summary = summarize(df, "final", K)
    row = summary_row(summary, method="fedavg", variant="default", eval_mode="global", alpha=0.5)
    seed0 = hand_value(read(runs_root, "fedavg_a0.5_s0"), "final") * 100
    assert row["n"] == 1 and row["n_diverged"] == 1 and row["n_runs"] == 2
    assert row["acc_mean_pct"] == pytest.approx(seed0) and np.isnan(row["acc_std_pct"])
    assert row["cell"] == f"{seed0:.2f} (n=1, 1 diverged)"
    allgone = summary_row(summary, method="fedavg", variant="default", alpha=0.1)
    assert allgone["n"] == 0 and np.isnan(allgone["acc_mean_pct"])
    assert allgone["cell"] == "diverged (rounds 2, 3)"
    out = tmp_path / "tables"
    write_tables(df, out, "final")
    md = (out / "main.md").read_text()
    assert f"{seed0:.2f} (n=1, 1 diverged)" in md and "| diverged (rounds 2, 3) |" in md
    assert "**diverged" not in md
    csv_runs = pd.read_csv(out / "runs.csv")
    assert sorted(csv_runs.loc[csv_runs["status"] == "diverged", "diverged_round"]) == [2, 2, 3]
    # figures: diverged seeds are left out of the mean and named in the legend; all-diverged is drawn dashed
    lines = {(s["label"], ln["label"]): ln for s in curve_data(df) for ln in s["lines"]}
    half = lines[("digits Dir(0.5)", "FedAvg (1 diverged)")]
    assert half["n"] == 1 and not half["dashed"] and np.isnan(half["acc_std"]).all()
    np.testing.assert_allclose(half["acc_mean"], read(runs_root, "fedavg_a0.5_s0")["test_acc"] * 100)
    gone = lines[("digits Dir(0.1)", "FedAvg (2 diverged)")]
    assert gone["dashed"] and list(gone["round"]) == [1, 2]  # the rounds evaluated before divergence
    assert all(p.stat().st_size > 0 for p in write_figures(df, tmp_path / "figs"))
    # a single diverged seed reads "diverged (round r)"
    assert agg.format_cell(float("nan"), float("nan"), 0, 1, [7]) == "diverged (round 7)"


def test_domain_table_when_domain_columns_exist(runs_root, tmp_path):
    def add_domains(f):
        f = f.copy()
        f["domain_acc_mnist"] = f["test_acc"] * 0.5
        f["domain_acc_svhn"] = np.minimum(f["test_acc"] * 1.5, 1.0)
        return f

    names = ["fedhpro_a0.5_s0", "fedhpro_a0.5_s1"]
    for n in names:
        rewrite(runs_root / n, tmp_path / "runs" / n, edit=add_domains)
    df = collect([tmp_path / "runs" / n for n in names])
    paths = write_tables(df, tmp_path / "t", "best")
    assert {p.name for p in paths} >= {"domains.md", "domains.tex", "domains.csv"}
    table = pd.read_csv(tmp_path / "t" / "domains.csv", skiprows=1)
    assert list(table.columns) == ["Setting", "Method", "mnist", "svhn", "Avg", "All"]
    # best rule: each domain is read at the round where the overall accuracy is best
    at_best = [read(runs_root, n).sort_values("test_acc").iloc[-1]["test_acc"] for n in names]
    vals = np.array(at_best) * 50
    assert table["mnist"].iloc[0] == f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}"
    # Avg: per seed the mean of its domains, then mean ± std over seeds
    avg = np.array([(a * 0.5 + min(a * 1.5, 1.0)) / 2 for a in at_best]) * 100
    assert table["Avg"].iloc[0] == f"{avg.mean():.2f} ± {avg.std(ddof=1):.2f}"
    assert "of the best round" in (tmp_path / "t" / "domains.md").read_text().splitlines()[0]


# ---------------------------------------------------------------------------------------------------- figures, CLI
def test_figures_are_written_as_png_and_pdf(df, tmp_path):
    paths = write_figures(df, tmp_path / "figs")
    # one figure per kind with a panel per setting; FedHPro's ablation variant in a figure of its own
    # and, since FedHPro's runs record prototype diagnostics, one diagnostics figure per setting
    settings = sorted({p.stem for p in paths if p.stem.startswith("diagnostics_")})
    assert settings == ["diagnostics_digits_dirichlet_a0.1_n5_global_auto", "diagnostics_digits_dirichlet_a0.5_n5_global_auto"]
    assert sorted(p.name for p in paths) == sorted(f"{stem}.{ext}" for stem in ("accuracy", "communication", "ablation",
                                                                                 *settings) for ext in ("png", "pdf"))
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000
        assert data.startswith(b"\x89PNG") if p.suffix == ".png" else data.startswith(b"%PDF")
    again = write_figures(df, tmp_path / "figs2")
    assert [p.name for p in again] == [p.name for p in paths]
    pdf = [p for p in paths if p.suffix == ".pdf"][0]
    assert (tmp_path / "figs2" / pdf.name).read_bytes() == pdf.read_bytes()  # deterministic


def test_cli_writes_tables_and_figures(runs_root, tmp_path, capsys):
    rc = agg.main(["--runs", str(runs_root / "**" / METRICS), "--out", str(tmp_path / "tables"),
                   "--rule", "last_k", "--last-k", str(K), "--figures", str(tmp_path / "figures")])
    assert rc == 0
    assert f"{len(_runs_spec())} runs" in capsys.readouterr().out
    assert f"mean of the last {K} rounds" in (tmp_path / "tables" / "main.md").read_text()
    assert (tmp_path / "figures" / "communication.pdf").is_file()
    assert agg.main(["--runs", str(runs_root), "--out", str(tmp_path / "x")]) == 2  # no metrics.parquet there
    assert agg.main(["--runs", str(runs_root), "--out", str(tmp_path / "x"), "--rule", "median"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: fedhpro aggregate: argument --rule")  # one line, no usage block
