"""A run's identity (issue 22 item 4): the config hash covers what can change a run's numbers, not how it is
executed (`fedhpro.config.EXECUTION_KEYS`); the run ids (config hashes) of every shipped workflow config are
pinned, so no change to the code moves a run to a new id (and reruns it) unnoticed."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from conftest import REPO, numbers
from fedhpro.config import EXECUTION_KEYS, RunConfig, from_dict
from fedhpro.plan import load_workflow_config
from fedhpro.sweep import expand_sweep

# config/*.yaml -> (runs, digest of the sorted "run_id config_hash" lines now, the same digest before the execution
# keys left the hash, runs whose id changed then). The changed runs are exactly those that set an execution key to a
# non-default value (checked below): paper.yaml's fedproto_* experiments and published-mnist.yaml (checkpoint_every:
# 5, diagnostics: false) rerun once. config/published.yaml is the published-results registry, not a workflow config.
PINNED = {
    "config.yaml": (70, "54dc6f55f493661c", "54dc6f55f493661c", 0),
    "paper.yaml": (1931, "d7df08a5aaa0d725", "2cd27916c3a33180", 216),
    "published-mnist.yaml": (15, "25a323c87d062159", "8cc3464b576b503a", 15),
}
BASE = {"dataset": "digits", "method": "fedproto", "eval_mode": "personalized", "num_clients": 6, "alpha": 0.5,
        "rounds": 3, "batch_size": 32, "lr": 0.05, "seed": 1}


def digest(ids: dict[str, str]) -> str:
    return hashlib.sha256("\n".join(f"{r} {h}" for r, h in sorted(ids.items())).encode()).hexdigest()[:16]


def execution_values(cfg: RunConfig) -> dict:
    """The execution keys `cfg` sets to a non-default value."""
    defaults = RunConfig().to_dict()
    return {k: getattr(cfg, k) for k in EXECUTION_KEYS if getattr(cfg, k) != defaults[k]}


def hash_before_issue_22(cfg: RunConfig) -> str:
    """The config hash as it was computed while the execution keys were part of it."""
    canonical = json.dumps({**cfg.canonical_dict(), **execution_values(cfg)}, sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_every_shipped_workflow_config_is_pinned():
    shipped = {p.name for p in (REPO / "config").glob("*.yaml")} - {"published.yaml"}
    assert shipped == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_run_ids_are_pinned_and_only_runs_setting_an_execution_key_moved(name):
    runs = expand_sweep(load_workflow_config(REPO / "config" / name), warn=lambda message: None)
    now = {run.run_id: run.config_hash for run in runs}
    before = {run.run_id: hash_before_issue_22(run.config) for run in runs}
    moved = {run.run_id for run in runs if now[run.run_id] != before[run.run_id]}
    assert (len(now), digest(now), digest(before), len(moved)) == PINNED[name]
    assert moved == {run.run_id for run in runs if execution_values(run.config)}


def test_execution_keys_are_recorded_but_not_hashed():
    cfg = from_dict(BASE)
    for change in ({"client_store": "disk"}, {"diagnostics": False}, {"diagnostics_every": 1},
                   {"checkpoint_every": 2}):
        other = from_dict({**BASE, **change})
        assert other.config_hash() == cfg.config_hash() and other.canonical_json() == cfg.canonical_json(), change
        key, value = next(iter(change.items()))
        assert other.to_dict()[key] == value and other.provenance_dict()[key] == value  # what config.json records
    for change in ({"eval_every": 2}, {"test_batch_size": 100}, {"precision": "bf16"}, {"device": "cpu"}):
        assert from_dict({**BASE, **change}).config_hash() != cfg.config_hash(), change  # these can change a number
    fedavg = {**BASE, "method": "fedavg", "eval_mode": "global"}  # batched: within float tolerance, not bit-equal
    assert from_dict({**fedavg, "engine": "batched"}).config_hash() != from_dict(fedavg).config_hash()


def test_checkpoint_every_changes_no_number(tmp_path):
    """Checkpointing every round or every second one, with a resume in between: the same numbers."""
    from fedhpro.train import train

    every = train(from_dict(BASE), tmp_path / "every")
    cfg = from_dict({**BASE, "checkpoint_every": 2})
    train(cfg, tmp_path / "sparse", stop_after_round=2)
    sparse = train(cfg, tmp_path / "sparse")
    pd.testing.assert_frame_equal(numbers(every), numbers(sparse), check_exact=True)



@pytest.mark.parametrize("first, then", [("memory", "disk"), ("disk", "memory")])
def test_resume_under_the_other_client_store_gives_the_same_numbers(tmp_path, first, then):
    """client_store is not hashed, so a run may resume under the other store: the checkpoint's client states are
    read from where it put them, and the numbers are those of an uninterrupted run."""
    from fedhpro.clientstore import CLIENT_STATES_DIR
    from fedhpro.train import train

    cfg = from_dict({**BASE, "clients_per_round": 4})
    whole = train(cfg, tmp_path / "whole")
    run = tmp_path / "run"
    train(cfg.replace(client_store=first), run, stop_after_round=2)
    resumed = train(cfg.replace(client_store=then), run)
    pd.testing.assert_frame_equal(numbers(whole), numbers(resumed), check_exact=True)
    info = json.loads((run / "config.json").read_text())
    assert [a["execution"]["client_store"] for a in info["attempts"]] == [first, then]
    assert info["config"]["client_store"] == then  # the values that wrote the results
    files = sorted(p.name for p in (run / CLIENT_STATES_DIR).glob("*")) if (run / CLIENT_STATES_DIR).exists() else []
    assert bool(files) == (then == "disk")  # memory: the disk files went once a checkpoint held the states


# ---------------------------------------------------------------- check_runnable: one answer to "is it runnable?"
@pytest.mark.parametrize("change, message", [
    ({"eval_mode": "personalized", "local_test_fraction": 0}, "config key 'local_test_fraction': 0 leaves"),
    ({"engine": "batched"}, "config key 'engine': method 'fedproto' supports engine"),  # the method's declaration
    ({"method": "fedavg", "engine": "batched", "eval_mode": "global", "channels_last": True},
     "config key 'channels_last': engine 'batched' does not support true"),  # the batched engine's own limits
    ({"method": "fedavg", "engine": "batched", "eval_mode": "global", "precision": "bf16"},
     "config key 'precision': engine 'batched' supports 'fp32' only"),
])
def test_check_runnable_is_asked_by_from_dict_train_and_the_sweep(tmp_path, change, message):
    import dataclasses

    from fedhpro.config import ConfigError, check_runnable
    from fedhpro.sweep import SweepConfigError, validate_workflow_config
    from fedhpro.train import train

    with pytest.raises(ConfigError, match=message) as err:
        from_dict({**BASE, **change})
    assert "\n" not in str(err.value)
    runnable = {k: v for k, v in change.items() if (k, v) in {("method", "fedavg"), ("eval_mode", "global")}}
    built = dataclasses.replace(from_dict({**BASE, **runnable}), **change)
    with pytest.raises(ConfigError, match=message):
        check_runnable(built)  # a RunConfig made without from_dict
    with pytest.raises(ConfigError, match=message):
        train(built, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    method = change.get("method", BASE["method"])
    defaults = {k: v for k, v in {**BASE, **change}.items() if k not in ("method", "dataset", "seed")}
    with pytest.raises(SweepConfigError, match=message):
        validate_workflow_config({"defaults": defaults, "datasets": {"digits": {}},
                                  "heterogeneity": [{"partition": "dirichlet", "alpha": 0.5}],
                                  "methods": {method: {"default": {}}}, "seeds": [0]})


def test_no_other_function_answers_whether_a_config_is_runnable():
    import fedhpro.config
    import fedhpro.sweep
    import fedhpro.train

    assert not hasattr(fedhpro.sweep, "check_supported") and not hasattr(fedhpro.train, "check_run")
    assert not hasattr(fedhpro.config, "_validate")


# ---------------------------------------------------------------- a finished run asked with other execution keys
def test_finished_run_without_diagnostics_is_returned_as_computed_and_tables_say_not_computed(tmp_path, caplog):
    from fedhpro.aggregate import NOT_COMPUTED, build_tables, collect
    from fedhpro.diagnostics import DIAGNOSTIC_COLUMNS
    from fedhpro.train import train

    cfg = from_dict({**BASE, "rounds": 2})
    off = train(cfg.replace(diagnostics=False), tmp_path / "off")
    text = (tmp_path / "off" / "config.json").read_text()
    with caplog.at_level("WARNING", logger="fedhpro.train"):
        again = train(cfg, tmp_path / "off")  # the same run id: returned as computed, not rerun
    assert "diagnostics: False (asked: True)" in caplog.text and "not computed" in caplog.text
    pd.testing.assert_frame_equal(off, again)
    assert off[list(DIAGNOSTIC_COLUMNS)].isna().all().all()  # missing, not zero
    assert (tmp_path / "off" / "config.json").read_text() == text  # records the values it was computed with
    assert json.loads(text)["config"]["diagnostics"] is False

    def diagnostics_cells(run_dirs):
        table = next(t for t in build_tables(collect(run_dirs)) if t.name == "diagnostics")
        return table.rows[0][2:], table.caption

    train(cfg.replace(seed=2), tmp_path / "on")  # another seed of the same setting, with diagnostics
    cells, caption = diagnostics_cells([tmp_path / "off", tmp_path / "on"])
    assert all(cell.endswith("(n=1; 1 not computed)") for cell in cells), cells
    train(cfg.replace(seed=3, diagnostics=False), tmp_path / "off3")
    fedavg = train(from_dict({**BASE, "rounds": 2, "method": "fedavg", "eval_mode": "global"}), tmp_path / "avg")
    assert fedavg["proto_agree"].notna().any()  # so the table has columns for the FedProto row to say it of
    table = next(t for t in build_tables(collect([tmp_path / "off", tmp_path / "off3", tmp_path / "avg"]))
                 if t.name == "diagnostics")
    fedproto = next(row for row in table.rows if "FedProto" in row[1])
    assert set(fedproto[2:]) == {NOT_COMPUTED} and f"{NOT_COMPUTED}: the run(s) had `diagnostics: false`" in \
        table.caption
