"""`fedhpro bench --quick` runs end to end and prints every figure (no speed assertions)."""

import json

import pytest

from fedhpro.bench import BenchConfig, make_config, trained_samples
from fedhpro.cli import main as cli_main

FIGURES = [
    "limit: bare PyTorch loop, CE (samples/s)",
    "limit: bare loop with fedhpro's loss",
    "limit: bare loop with fedproto's loss",
    "fedavg: engine local training loop (samples/s)",
    "fedhpro: engine local training loop (samples/s)",
    "fedproto: engine local training loop (samples/s)",
    "fedavg: ratio to its bare loop (CE)",
    "fedhpro: ratio to its bare loop (same loss)",
    "fedproto: time_local basis",
    "fedhpro round / fedavg round",
    "fedavg: local / server / eval / ckpt (s)",
    "fedhpro: local / server / eval / ckpt (% of round)",
    "fedhpro: of local, client gradient step (setup, s)",
    "bare loop (CE): peak above start",
    "fedhpro round + checkpoint: peak above start",
    "3 clients: batched speed-up",
    "6 clients: batched speed-up",
    "clients, 6/round: round peak memory",
    "client state held in memory between rounds",
    "partition_labels dirichlet: 100,000 labels x 100 clients",
    "snakemake -n",
    "fedhpro plan, config/paper.yaml (s)",
    "fedavg fp32: local training (samples/s, x fp32)",
    "fedavg bf16: local training (samples/s, x fp32)",
    "fedavg channels_last: test accuracy (points vs fp32)",
    "fedhpro bf16 + channels_last: local training (samples/s, x fp32)",
    "fedhpro fp16: test accuracy (points vs fp32)",
]
TARGETS = ["local training >= 90% of bare-loop throughput", "FedHPro round <= 1.25x FedAvg round",
           "evaluation + checkpointing < 10% of a round", "memory follows participating clients",
           "partitioners:", "snakemake -n plans", "fedhpro plan prints config/paper.yaml's cost in < 60 s"]


@pytest.mark.slow
def test_bench_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    times = tmp_path / "round-times.csv"
    assert cli_main(["bench", "--quick", "--out", str(out), "--times", str(times)]) == 0
    text = capsys.readouterr().out
    # the round split (c, d) also lands in the round-times table `fedhpro plan` reads, keyed so that the quick
    # subset never stands for a real digits run
    from fedhpro.plan import read_times

    rows = read_times(times)
    assert sorted(m.key[4] for m in rows) == ["fedavg", "fedhpro", "fedproto"]
    assert all(m.key[1] == "digits:quick" and m.s_local > 0 and m.source.startswith("fedhpro bench") for m in rows)
    # machine, torch, device and threads: in the header and on every figure line
    assert "CPU:" in text and "torch " in text and "device cpu" in text and "torch threads 1" in text
    figure_lines = [line for line in text.splitlines() if line.startswith("  ") and "[" in line]
    assert len(figure_lines) > 40
    assert all("cpu, 1 thr, torch" in line for line in figure_lines)
    for figure in FIGURES:
        assert figure in text, figure
    for target in TARGETS:
        assert any(line.lstrip().startswith(("PASS:", "FAIL:", "N/A:")) and target in line
                   for line in text.splitlines()), target
    # files: one JSON per section, the summary JSON and the Markdown table
    stem = "bench_cpu-digits-cnn-quick"
    for section in ("throughput", "rounds", "memory", "quick_setting", "batched", "precision", "sharing", "scale"):
        payload = json.loads((out / f"{stem}_{section}.json").read_text())
        assert payload["figures"] and payload["machine"]["threads"] == 1
    sharing = json.loads((out / f"{stem}_sharing.json").read_text())["data"]
    assert set(sharing) == {"1", "2"} and sharing["2"]["run0_identical_to_alone"] is True  # its own process, same numbers
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["machine"]["torch"] and summary["checks"] and summary["complete"] is True
    assert summary["sections"] and not any(title.startswith("paper") for title in summary["sections"])  # --gpu only
    md = (out / f"{stem}.md").read_text()
    assert "| figure | value | note |" in md and "## Targets" in md and "batched speed-up" in md
    assert "## precision and channels_last" in md and "fedhpro bf16: test accuracy (points vs fp32)" in md
    precision = json.loads((out / f"{stem}_precision.json").read_text())["data"]
    for method in ("fedavg", "fedhpro"):
        rows = precision["results"][method]
        assert set(rows) == {"fp32", "bf16", "channels_last", "bf16 + channels_last", "fp16"}
        assert rows["fp32"]["speed_ratio"] == 1.0 and rows["fp32"]["acc_diff_points"] == 0.0
        assert all(r["samples_per_s"] > 0 and 0.0 <= r["test_acc"] <= 1.0 for r in rows.values())
        assert rows["bf16"]["relative_weight_difference"] > 0  # low precision really ran


def test_configs_and_sample_count():
    default = make_config(quick=False, gpu=False, device=None)
    assert (default.dataset, default.num_clients, default.local_epochs, default.batch_size) == ("digits", 10, 10, 64)
    assert default.batched_clients == (10, 50) and default.scale_clients == 1000 and default.sweep_runs == 5000
    assert (default.precision_clients, default.precision_rounds) == (2, 2)
    assert make_config(quick=True, gpu=False, device=None).precision_rounds == 1
    gpu = make_config(quick=False, gpu=True, device="cpu")
    assert gpu.dataset == "cifar10" and gpu.synthetic == (50000, 10000, 3, 32)
    cfg = gpu.run_config("fedavg")
    assert cfg.model == "auto" and cfg.num_clients == 10
    assert isinstance(default, BenchConfig)
    # engine.batches drops a trailing single-sample batch
    assert trained_samples(65, 64, 2) == 128 and trained_samples(64, 64, 1) == 64 and trained_samples(1, 64, 3) == 3


def test_bench_help_via_cli(capsys):
    assert cli_main(["bench", "--help"]) == 0  # through the CLI's one error handler: --help is a clean exit
    assert "--quick" in capsys.readouterr().out
