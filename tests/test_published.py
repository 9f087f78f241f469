"""The published-results registry (config/published.yaml) and fedhpro.published: loading and its one-line
errors, our number by the published metric and rule, Δ and verdict, the report, the reference line, and that
every entry is one planned cell of config/paper.yaml or says why not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedhpro.published import (PublishedError, compare, draw_reference, find_runs, load_registry, planned_cell,
                               report_markdown, run_value, verdict)

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "config" / "published.yaml"


@pytest.fixture(scope="module")
def registry():
    return load_registry(REGISTRY)


def test_every_number_of_the_issue_is_registered(registry):
    by_id = {e.id: e for e in registry.entries}
    log = [by_id["fedhpro-log-last"], by_id["fedhpro-log-best"], by_id["fedhpro-log-last5"]]
    assert [(e.rule, e.value) for e in log] == [("last", 64.24), ("best", 65.98), ("mean_last_k", 63.21)]
    assert log[2].k == 5 and all(e.setting["imbalance_ratio"] == 100 and e.setting["alpha"] == 0.5 for e in log)
    # the curve reproduces the three numbers (last, best at round 87, mean of the last 5)
    curve = np.array(registry.curves["fedhpro_log_c10_a0.5_rho100"]["values"])
    assert len(curve) == 100 and curve[-1] == 64.24 and curve.max() == 65.98 and int(curve.argmax()) + 1 == 87
    assert round(curve[-5:].mean(), 2) == 63.21
    fedsa = {e.row: e.value for e in registry.entries if e.source == "fedsa_page"}
    assert sorted(fedsa.values()) == sorted([84.27, 77.86, 45.56, 38.35, 51.28, 44.85, 70.86, 60.57, 62.23])
    ours = {e.value for e in registry.entries if e.source == "fedhpro_rows_issue"}
    assert ours == {79.7, 40.52, 64.52, 73.41}
    t1 = [e for e in registry.entries if e.source == "gfpl_table1"]
    assert len(t1) == 4 * 10 * 3  # datasets x methods x n
    assert {(e.setting["dataset"], e.method, e.setting["ways"], e.value, e.pm) for e in t1} >= {
        ("mnist", "fedproto", 3, 97.13, 0.30), ("mnist", "local", 5, 92.92, 3.17), ("cifar10", "gfpl", 3, 74.23, 1.60),
        ("femnist", "fedavg", 4, 91.39, 5.23), ("cifar100", "fedprox", 5, 64.33, 2.33)}
    assert sum(e.source == "gfpl_table2" for e in registry.entries) == 4 * 6
    assert all(e.placement == "not_run" and e.reason for e in t1 if e.method is None)  # FeSEM, FedPer, ...


def _write(tmp_path, change) -> Path:
    raw = yaml.safe_load(REGISTRY.read_text())
    change(raw)
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("change,needle", [
    (lambda r: r["entries"][0].update(rule="median"), "(fedhpro-log-last): key 'rule' must be one of"),
    (lambda r: r["entries"][1].pop("metric"), "(fedhpro-log-best): key 'metric' is missing"),
    (lambda r: r["entries"][0].update(pm=1.0), "key 'pm_over' must be one of seeds, clients when pm is given"),
    (lambda r: r["entries"][3].update(placement="approximate", reason=""), "key 'reason' is required"),
    (lambda r: r["entries"][0]["setting"].update(lr=0.1), "key 'setting.lr' is not a setting key"),
    (lambda r: r["entries"][2].update(k=0), "(fedhpro-log-last5): key 'k' must be an integer >= 1"),
    (lambda r: r["entries"][0].update(value=164.0), "key 'value' must be a percentage"),
    (lambda r: r["entries"][0].update(source="nowhere"), "key 'source' must be a key of 'sources'"),
    (lambda r: r["entries"][0].update(method="fedfoo"), "key 'method' must be a method of this project"),
    (lambda r: r["entries"].append(dict(r["entries"][0])), "duplicate id 'fedhpro-log-last'"),
])
def test_registry_errors_are_one_line_naming_entry_and_key(tmp_path, change, needle):
    with pytest.raises(PublishedError) as info:
        load_registry(_write(tmp_path, change))
    message = str(info.value)
    assert needle in message and "\n" not in message and "published.yaml: entries[" in message


def _metrics(acc, client_mean=None, client_weighted=None) -> pd.DataFrame:
    n = len(acc)
    return pd.DataFrame({"round": np.arange(1, n + 1), "test_acc": acc,
                         "client_acc_mean": client_mean if client_mean is not None else [np.nan] * n,
                         "client_acc_weighted": client_weighted if client_weighted is not None else [np.nan] * n})


def test_run_value_uses_the_published_metric_and_rule():
    m = _metrics([0.5, 0.9, 0.6, 0.7, np.nan, 0.8], client_mean=[0.1, 0.2, 0.3, 0.4, np.nan, 0.5],
                 client_weighted=[0.2] * 5 + [0.6])
    assert run_value(m, "global_test_acc", "last") == pytest.approx(80.0)
    assert run_value(m, "global_test_acc", "best") == pytest.approx(90.0)
    assert run_value(m, "global_test_acc", "mean_last_k", 3) == pytest.approx(70.0)  # evaluated rounds 3, 4, 6
    assert run_value(m, "client_mean", "last") == pytest.approx(50.0)
    assert run_value(m, "client_weighted", "last") == pytest.approx(60.0)  # pooled, not the client mean
    with pytest.raises(ValueError, match="no column domain_acc_caltech"):
        run_value(m, "domain:caltech", "last")


@pytest.mark.parametrize("delta,pm,want", [(0.3, 0.30, "inside ±"), (-0.31, 0.30, "inside 2×±"),
                                           (0.6, 0.30, "inside 2×±"), (-0.61, 0.30, "outside"),
                                           (5.0, None, "no ± published"), (float("nan"), 1.0, "not run")])
def test_verdict_bands(delta, pm, want):
    assert verdict(delta, pm) == want


def _fake_run(root: Path, name: str, config: dict, metrics: pd.DataFrame | None) -> None:
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": config, "config_hash": "x", "git_sha": "abc123def456"}))
    if metrics is not None:
        metrics.to_parquet(d / "metrics.parquet")


def test_compare_pairs_entries_with_matching_runs_and_says_why_not(tmp_path, registry):
    setting = {"dataset": "mnist", "partition": "nway", "ways": 3, "shots": 100, "stdev": 2, "num_clients": 20}
    base = {**setting, "method": "fedproto", "variant": "default", "rounds": 100, "local_epochs": 1}
    _fake_run(tmp_path, "s0", {**base, "seed": 0}, _metrics([0.5] * 4, client_mean=[0.9, 0.95, 0.96, 0.97]))
    _fake_run(tmp_path, "s1", {**base, "seed": 1}, _metrics([0.5] * 4, client_mean=[0.9, 0.95, 0.97, 0.99]))
    _fake_run(tmp_path, "s2", {**base, "seed": 2}, None)  # started, not finished: not counted
    _fake_run(tmp_path, "n4", {**base, "ways": 4, "seed": 0}, _metrics([0.5] * 4, client_mean=[0.1] * 4))
    rows = {r["id"]: r for r in compare(registry, find_runs(tmp_path))}
    row = rows["gfpl-t1-mnist-n3-fedproto"]
    assert row["n"] == 2 and row["ours_mean"] == pytest.approx(98.0) and row["ours_sd"] == pytest.approx(np.sqrt(2))
    assert row["delta"] == pytest.approx(98.0 - 97.13) and row["verdict"] == "outside"  # |0.87| > 2 x 0.30
    assert "1 more run(s) not finished" in row["why"] and row["commit"] == "abc123def456"
    assert rows["gfpl-t1-mnist-n4-fedproto"]["n"] == 1 and rows["gfpl-t1-mnist-n4-fedproto"]["verdict"] == "outside"
    assert rows["gfpl-t1-mnist-n3-local"]["n"] == 0 and "not run yet" in rows["gfpl-t1-mnist-n3-local"]["why"]
    assert "GPU-sized" in rows["fedhpro-log-last"]["why"]
    assert "not implemented" in rows["gfpl-t1-mnist-n3-fedpa"]["why"]
    text = report_markdown(list(rows.values()), registry, configs=["config/x.yaml"], commit="c0ffee")
    assert "| gfpl-t1-mnist-n3-fedproto | fedproto |" in text and "98.00 ± 1.41 (2)" in text and "c0ffee" in text
    assert text.count("\n| ") == len(rows) + 2  # every published cell once, plus the two table headers


def test_the_reference_line_is_the_official_curve(registry):
    from matplotlib.figure import Figure

    ax = Figure().add_subplot(1, 1, 1)
    cond = {"dataset": "cifar10", "partition": "creff", "alpha": 0.5, "imbalance_ratio": 100.0, "num_clients": 10,
            "eval_mode": "global"}
    assert draw_reference(ax, registry, method="fedhpro", setting=cond)
    (line,) = ax.get_lines()
    x, y = line.get_data()
    assert list(x) == list(range(1, 101)) and y[-1] == 64.24 and max(y) == 65.98 and line.get_linestyle() == "--"
    other = Figure().add_subplot(1, 1, 1)
    assert not draw_reference(other, registry, method="fedhpro", setting={**cond, "imbalance_ratio": 50.0})
    assert not other.get_lines()


@pytest.mark.slow
def test_each_entry_is_one_planned_cell_of_paper_yaml_or_says_why(registry):
    from fedhpro.sweep import expand_sweep, runs_by_experiment

    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert config["published"] == "config/published.yaml"
    by = runs_by_experiment(expand_sweep(config, warn=lambda message: None))
    for e in registry.entries:
        cells = {(r.dataset, r.het, r.method, r.variant) for r in planned_cell(e, by)}
        if e.placement in ("exact", "approximate"):
            assert len(cells) == 1, (e.id, sorted(cells))
            assert len(planned_cell(e, by)) == len(config["seeds"])  # every seed of that one cell
        else:
            assert e.reason, e.id


def test_experiment_table_shows_the_rules_side_by_side(tmp_path, registry):
    from fedhpro.published import write_experiment_table

    setting = {"dataset": "mnist", "partition": "nway", "ways": 3, "shots": 100, "stdev": 2, "num_clients": 20}
    _fake_run(tmp_path, "s0", {**setting, "method": "local", "variant": "default", "seed": 0},
              _metrics([np.nan] * 6, client_mean=[0.5, 0.96, 0.9, 0.92, 0.94, 0.93]))
    _fake_run(tmp_path, "x", {**setting, "method": "fedavg", "variant": "other", "seed": 0},
              _metrics([np.nan] * 6, client_mean=[0.5] * 6))  # a variant no entry names
    out = tmp_path / "tables"
    out.mkdir()
    print(write_experiment_table(REGISTRY, [tmp_path / "runs" / "s0", tmp_path / "runs" / "x"], out))
    table = pd.read_csv(out / "published.csv")
    assert list(table["Cell"]) == ["gfpl-t1-mnist-n3-local"]
    row = table.iloc[0]
    assert row["Ours"] == "93.00 ± – (n=1)" and row["Δ"] == pytest.approx(93.0 - 94.05)
    assert (row["ours, last"], row["ours, best"], row["ours, mean of last 5"]) == (93.0, 96.0, 93.0)
    assert row["Verdict"] == "inside ±"
    assert "| gfpl-t1-mnist-n3-local |" in (out / "published.md").read_text()
