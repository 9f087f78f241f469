"""Nothing silently wrong, round three (issue 23, the non-cluster items): every case below is correct behaviour
or a one-line error naming the key, file or run, and nothing is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedhpro import aggregate as agg
from fedhpro.cli import main as cli_main
from fedhpro.config import from_dict
from fedhpro.runio import METRICS
from fedhpro.train import train

TINY = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 3, "rounds": 1,
        "batch_size": 64, "device": "cpu", "method": "fedavg"}
# FedHPro's server steps cut down: the runs only need to exist (seconds each)
HPRO_FAST = {"matching_steps": 2, "feature_matching_steps": 2, "retrain_epochs": 2, "prototypes_per_class": 2,
             "features_per_class": 5, "real_batch": 16}


def cfg_of(**changes):
    return from_dict({**TINY, **changes})


def hpro(params: dict | None = None, **changes):
    return cfg_of(method="fedhpro", method_params={**HPRO_FAST, **(params or {})}, **changes)


def one_line_error(capsys, rc, expect_rc=2) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == expect_rc, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


# ------------------------------------------------------------------ 1: one (method, variant) row, one config
@pytest.mark.parametrize("mode", ["global", "personalized"])
@pytest.mark.parametrize("a, b, difference, same_seed", [
    ({}, {"aggregation": "fedavg"}, "method_params.aggregation: 'last_client' vs 'fedavg'", True),
    ({}, {"aggregation": "fedavg"}, "method_params.aggregation: 'last_client' vs 'fedavg'", False),
    ({"aggregation": "fedavg"}, {"aggregation": "fedavg", "hpcl": False}, "method_params.hpcl: True vs False", True),
    ({}, {"temperature": 0.1}, "method_params.temperature: 0.05 vs 0.1", False),
], ids=["aggregation-same-seed", "aggregation-other-seed", "hpcl", "temperature"])
def test_aggregate_refuses_one_variant_name_over_two_fedhpro_configs(tmp_path, capsys, mode, a, b, difference,
                                                                      same_seed):
    """Two FedHPro runs under one variant name that differ in a method parameter (aggregation among them, which
    is shown in the row label but was not part of the row key) are refused, naming both directories and the
    parameter, by collect and so by every table (main, personalized, ablation, communication)."""
    runs = tmp_path / "runs"
    train(hpro(a, eval_mode=mode), runs / "a", progress=False)
    train(hpro(b, eval_mode=mode, seed=0 if same_seed else 1), runs / "b", progress=False)
    with pytest.raises(agg.MixedSeedsError) as info:
        agg.collect(str(runs / "**" / METRICS))
    text = str(info.value)
    assert str(runs / "a") in text and str(runs / "b") in text
    assert difference in text, text
    for kind in ("comparison", "ablation"):
        err = one_line_error(capsys, cli_main(["aggregate", "--runs", str(runs / "**" / METRICS), "--kind", kind,
                                               "--out", str(tmp_path / kind)]))
        assert str(runs / "a") in err and str(runs / "b") in err and difference.split(":")[0] in err
        assert not (tmp_path / kind / "main.md").exists() and not (tmp_path / kind / "communication.md").exists()
    # under their own variant names they are two rows, each labelled by its own aggregation
    shutil.rmtree(runs / "b")
    train(hpro(b, eval_mode=mode, variant="other"), runs / "b", progress=False)
    summary = agg.summarize(agg.collect(str(runs / "**" / METRICS)))
    assert sorted(summary["variant"]) == ["default", "other"] and summary["n"].tolist() == [1, 1]
