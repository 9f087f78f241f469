"""`fedhpro plan`: a sweep's cost computed from the stored round-times table, never guessed."""

from __future__ import annotations

import csv
import json
import time

import pandas as pd
import pytest
import yaml

from fedhpro import plan
from fedhpro.cli import main as cli_main
from fedhpro.config import from_dict
from fedhpro.sweep import expand_sweep

KIND = "Test GPU 80GB"
SWEEP = {"defaults": {"rounds": 10, "local_epochs": 2, "num_clients": 10, "batch_size": 32, "device": "cpu"},
         "datasets": {"digits": {}}, "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
         "methods": {"fedavg": {"default": {}}, "fedprox": {"default": {"mu": 0.1}},
                     "fedproto": {"default": {}}},
         "seeds": [0, 1, 2]}


def _row(method: str, params: dict | None = None, **values) -> plan.Measurement:
    cfg = from_dict({"dataset": "digits", "method": method, "method_params": params or {}, "num_clients": 10,
                     "batch_size": 32})
    base = dict(local_epochs=1, s_local=3.0, s_server=0.5, s_eval=1.0, s_io=0.25, runs_sharing=1,
                rounds_measured=4, source="test", measured="2026-12-07")
    base.update(values)
    return plan.Measurement(key=plan.run_key(cfg, KIND), **base)


def test_a_measurement_times_only_runs_of_its_own_execution_keys():
    """A compiled, bf16, channels-last or batched measurement never stands for an eager fp32 run, nor the reverse
    (they differ in speed, not in the round's work): such a run is listed as "no measurement"."""
    sweep = {**SWEEP, "methods": {"fedavg": {"default": {}}}}
    eager_row = _row("fedavg")
    compiled_cfg = from_dict({"dataset": "digits", "method": "fedavg", "num_clients": 10, "batch_size": 32,
                              "compile": "default"})
    compiled_row = plan.Measurement(**{**eager_row.__dict__, "key": plan.run_key(compiled_cfg, KIND), "s_local": 1.0})
    assert plan.execution_of(compiled_cfg) == {"compile": "default"} and compiled_row.key != eager_row.key
    for keys, rows, measured in (({}, [compiled_row], 0), ({}, [eager_row], 3),
                                 ({"compile": "default"}, [eager_row], 0),
                                 ({"compile": "default"}, [eager_row, compiled_row], 3),
                                 ({"precision": "bf16"}, [eager_row], 0), ({"engine": "batched"}, [eager_row], 0)):
        runs = expand_sweep({**sweep, "defaults": {**sweep["defaults"], **keys}})
        (one,) = plan.estimate(runs, rows, KIND).values()
        assert one.measured == measured, (keys, rows)
        if keys and not measured:
            assert all(json.dumps(keys)[1:-1] in text for text in one.unmeasured)  # the listing names them
    runs = expand_sweep({**sweep, "defaults": {**sweep["defaults"], "compile": "default"}})
    (one,) = plan.estimate(runs, [eager_row, compiled_row], KIND).values()
    assert one.gpu_seconds == pytest.approx(3 * 10 * (1.0 * 2 + 0.5 + 1.0 + 0.25))  # the compiled row's seconds


def test_the_estimate_is_the_measured_rows_scaled_by_epochs_and_rounds(tmp_path):
    runs = expand_sweep(SWEEP)
    table = [_row("fedavg"), _row("fedprox", runs_sharing=2, s_local=5.0)]
    est = plan.estimate(runs, table, KIND)
    (only,) = est.values()
    assert (only.runs, only.measured, only.as_default) == (9, 6, 3)  # fedprox (mu=0.1) timed by its default row
    fedavg_run = 10 * (3.0 * 2 / 1 + 0.5 + 1.0 + 0.25)  # rounds x (local x epochs/measured epochs + server + eval + io)
    fedprox_run = 10 * (5.0 * 2 + 0.5 + 1.0 + 0.25)
    assert only.gpu_seconds == pytest.approx(3 * fedavg_run + 3 * fedprox_run / 2)  # shared: half a GPU each
    # fedproto has no row: listed, not estimated
    assert sum(only.unmeasured.values()) == 3 and all("fedproto" in k for k in only.unmeasured)
    # --exact: the variant with other parameters is not timed by its default row
    exact = next(iter(plan.estimate(runs, table, KIND, exact=True).values()))
    assert (exact.measured, exact.as_default) == (3, 0)
    # another device kind: nothing measured
    assert next(iter(plan.estimate(runs, table, "other").values())).measured == 0
    # wall clock on 2 devices: fedavg runs on 2 slots, fedprox (measured 2 to a device) on 4 slots, one after the other
    assert only.wall_seconds(2) == pytest.approx(2 * fedavg_run + fedprox_run)


def test_makespan_schedules_longest_first():
    assert plan.makespan([], 3) == 0
    assert plan.makespan([7.0], 4) == 7.0  # never below the longest run
    # longest first onto the least loaded slot: 5|4, 5|7, 8|7, 8|10
    assert plan.makespan([3, 5, 3, 4, 3], 2) == 10
    assert plan.makespan([1.0] * 8, 4) == 2.0


def test_plan_cli_prints_each_experiment_and_says_what_has_no_measurement(tmp_path, capsys):
    times = tmp_path / "round-times.csv"
    plan.write_times(times, [_row("fedavg"), _row("fedproto")])
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"experiments": {"one": {"title": "t", **SWEEP}}}))
    t0 = time.process_time()  # CPU time: the other pytest-xdist worker shares the cores
    assert cli_main(["plan", "--configfile", str(config), "--times", str(times), "--device-kind", KIND,
                     "--gpus", "3", "--exact"]) == 0
    assert time.process_time() - t0 < 60
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("one ", "total"))}
    assert lines["one"][1:4] == ["9", "6", "0"]
    run = 10 * (3.0 * 2 + 0.5 + 1.0 + 0.25)
    assert lines["one"][4] == f">={6 * run / 3600:.2f}"  # lower bound: 3 runs are not measured
    assert "no measurement on 'Test GPU 80GB' for 3 of 9 runs" in out and "fedprox" in out


def test_record_times_a_finished_run_from_its_metrics(tmp_path, capsys):
    from fedhpro.train import train

    cfg = from_dict({"dataset": "digits", "method": "fedavg", "num_clients": 3, "rounds": 3, "batch_size": 64,
                     "device": "cpu", "eval_every": 2})
    run_dir = tmp_path / "run"
    train(cfg, run_dir, threads=1)
    times = tmp_path / "t.csv"
    assert plan.main(["--record", str(run_dir), "--times", str(times), "--device-kind", KIND]) == 0
    (m,) = plan.read_times(times)
    df = pd.read_parquet(run_dir / "metrics.parquet")
    rest = df[df["round"] > 1]  # the first round pays for warm-up
    assert m.key == plan.run_key(cfg, KIND) and m.local_epochs == 1 and m.rounds_measured == 2
    assert m.s_local == pytest.approx(rest["time_local"].median(), rel=1e-3)
    assert m.s_eval == pytest.approx(rest.loc[rest["time_eval"] > 0, "time_eval"].median(), rel=1e-3)
    # recorded again: the re-measurement replaces the row instead of adding one
    assert plan.main(["--record", str(run_dir), "--times", str(times), "--device-kind", KIND]) == 0
    assert len(plan.read_times(times)) == 1
    # an unfinished run is not timed
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((run_dir / "config.json").read_text())
    assert cli_main(["plan", "--record", str(tmp_path / "half"), "--times", str(times), "--device-kind", KIND]) == 2
    assert "no metrics.parquet" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("device_kind,dataset\n", "missing column(s)"),
    (",".join(plan.COLUMNS) + "\n" + ",".join(["x"] * len(plan.COLUMNS)) + "\n", "line 2"),
])
def test_a_bad_table_is_one_line_naming_it(tmp_path, capsys, text, message):
    times = tmp_path / "bad.csv"
    times.write_text(text)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    assert cli_main(["plan", "--configfile", str(config), "--times", str(times), "--device-kind", KIND]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: round-times table") and str(times) in err and message in err
    assert len(err.strip().splitlines()) == 1


def test_the_committed_table_loads_and_names_its_sources():
    rows = plan.read_times(plan.DEFAULT_TIMES)
    with plan.DEFAULT_TIMES.open() as f:
        assert next(csv.reader(f)) == list(plan.COLUMNS)
    assert all(m.source and m.measured for m in rows)
