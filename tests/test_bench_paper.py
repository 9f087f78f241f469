"""The benchmark's `paper` section (fedhpro.bench.paper): the run it times is config/paper.yaml's CIFAR-10 FedHPro
cell, its data has CIFAR-10's class counts, the extrapolation to 100 rounds, the official code timed beside it
(a stand-in checkout here: the real one is never in this repository), and files that say when a benchmark was
cut short. No speed is asserted."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, stand_in_checkout
from fedhpro.bench import make_config
from fedhpro.bench.common import machine_info
from fedhpro.bench.paper import PAPER_ROUNDS, extrapolated_seconds, paper_arrays, paper_run_config
from fedhpro.bench.report import Report
from fedhpro.cli import main as cli_main
from fedhpro.parity import PROTOCOL, our_client_counts, partition_counts, write_cifar_python
from fedhpro.partition import partition_labels
from fedhpro.sweep import expand_sweep

PAPER_ONLY = ["--skip", "rounds", "--skip", "batched", "--skip", "precision", "--skip", "sharing", "--skip", "scale"]


def test_the_timed_run_is_paper_yamls_cifar10_fedhpro_cell(tmp_path):
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cells = [r for r in expand_sweep(config, warn=lambda m: None)
             if "label_skew" in r.experiments and r.dataset == "cifar10" and r.method == "fedhpro"
             and r.variant == "default" and r.config.partition == "creff" and r.config.alpha == 0.5
             and r.config.imbalance_ratio == 100]
    assert cells, "config/paper.yaml has no CIFAR-10 NID1 (0.5, 100) FedHPro default cell"
    ours = paper_run_config(tmp_path, "cpu").to_dict()
    assert ours["rounds"] == PAPER_ROUNDS and ours["local_epochs"] == 10
    where = ("dataset_options", "data_root", "device", "seed", "partition_seed")  # where the data is, which GPU, seed
    for cell in cells:
        theirs = cell.config.to_dict()
        assert {k: v for k, v in ours.items() if k not in where} == {k: v for k, v in theirs.items() if k not in where}
    # the one seed differs only because the bench uses the official log's (25), as the parity harness does
    assert ours["seed"] == ours["partition_seed"] == 25


def test_the_random_images_keep_cifar10s_class_counts_and_long_tail():
    arrays = paper_arrays(5000, 1000)
    assert arrays.train_x.shape == (50000, 3, 32, 32) and arrays.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(arrays.train_y).tolist() == [5000] * 10 and np.bincount(arrays.test_y).tolist() == [1000] * 10
    assert arrays.train_x.dtype == np.uint8 and arrays.train_x.std() > 50  # random pixels, not a constant
    parts = partition_labels(arrays.train_y, scheme="creff", seed=25, **PROTOCOL)
    assert sum(len(p) for p in parts) == 12406  # CIFAR-10's long tail at rho 100, as the paper trains on
    assert not np.array_equal(arrays.train_y, paper_arrays(5000, 1000, seed=1).train_y)


def test_extrapolation_to_the_papers_rounds():
    assert extrapolated_seconds(10.0, 7.0, [3.0, 5.0, 4.0]) == 10.0 + 7.0 + 99 * 4.0
    assert extrapolated_seconds(0.0, 1.0, [2.0], rounds=3) == 5.0
    with pytest.raises(ValueError, match="at least one measured round"):
        extrapolated_seconds(1.0, 1.0, [])


def quick_counts(tmp_path: Path) -> list[list[int]]:
    """The client x class counts of the quick paper data's partition (seed 25), as the official code prints them."""
    cfg = make_config(True, True, "cpu")
    return partition_counts(paper_arrays(cfg.paper_train_per_class, cfg.paper_test_per_class).train_y, 25)


def test_paper_section_times_ours_and_the_official_code(tmp_path, capsys):
    out, times = tmp_path / "bench", tmp_path / "round-times.csv"
    checkout = stand_in_checkout(tmp_path, quick_counts(tmp_path))
    assert cli_main(["bench", "--gpu", "--quick", "--device", "cpu", *PAPER_ONLY, "--official", str(checkout),
                     "--out", str(out), "--times", str(times)]) == 0
    text = capsys.readouterr().out
    assert "partition identical (client x class counts, seed 25)" in text
    stem = "bench_gpu-cifar10shape-resnet10-quick"
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["complete"] is True and summary["pending_sections"] == []
    data = json.loads((out / f"{stem}_paper.json").read_text())["data"]
    cfg = make_config(True, True, "cpu")
    ours = data["ours"]["none"]  # eager only: no --compile
    assert set(data["ours"]) == {"none"} and data["compile_failed"] == {}
    assert len(ours["seconds"]) == cfg.warmup + cfg.paper_rounds and all(s > 0 for s in ours["seconds"])
    assert ours["parts"]["io"][0] > 0  # a checkpoint after every measured round, as rounds 1-99 write
    assert len(data["official"]["seconds"]) == cfg.warmup + cfg.paper_rounds
    assert data["ratio_to_official"]["none"] == pytest.approx(data["official"]["median_round"]
                                                              / np.median(ours["seconds"][cfg.warmup:]))
    assert data["at_paper_budget"] is False
    # at the quick size the two targets are figures only, never a PASS or FAIL
    checks = {c["target"]: c["status"] for c in summary["checks"]}
    assert [s for t, s in checks.items() if "paper-config" in t or "official code" in t] == ["N/A", "N/A"]
    # the measured rounds land in the round-times table under the paper cell's key, marked quick
    from fedhpro.plan import current_device_kind, read_times, run_key

    (row,) = read_times(times)
    key = run_key(paper_run_config(tmp_path, "cpu"), current_device_kind("cpu"))
    assert row.key == (key[0], "cifar10:quick") + key[2:] and row.local_epochs == 1 and row.s_local > 0
    md = (out / f"{stem}.md").read_text()
    assert "official s/round / ours s/round" in md and "Incomplete" not in md


def test_a_failing_official_run_is_reported_and_the_benchmark_goes_on(tmp_path, capsys):
    checkout = stand_in_checkout(tmp_path, quick_counts(tmp_path), fail=True)
    out = tmp_path / "bench"
    assert cli_main(["bench", "--gpu", "--quick", "--device", "cpu", *PAPER_ONLY, "--official", str(checkout),
                     "--out", str(out)]) == 0
    data = json.loads((out / "bench_gpu-cifar10shape-resnet10-quick_paper.json").read_text())["data"]
    assert "exited 1" in data["official"]["failed"] and "boom" in data["official"]["failed"]
    assert "N/A: ours >= 5x the official code's speed per round" in capsys.readouterr().out
    assert set(data["ours"]) == {"none"}  # our run's figures are there all the same


def test_official_is_refused_up_front(tmp_path, capsys):
    from conftest import one_line_error

    err = one_line_error(capsys, cli_main(["bench", "--quick", "--official", str(tmp_path)]))
    assert "--official" in err and "--gpu" in err
    err = one_line_error(capsys, cli_main(["bench", "--gpu", "--quick", "--device", "cpu", "--official",
                                           str(tmp_path)]))
    assert "not a checkout of the official FedHPro code" in err
    err = one_line_error(capsys, cli_main(["bench", "--gpu", "--quick", "--device", "cpu", "--compile",
                                           "reduce-overhead"]))
    assert "'compile': 'reduce-overhead' (CUDA graphs) needs a CUDA device" in err


def test_files_of_a_benchmark_cut_short_say_so(tmp_path):
    cfg = make_config(True, True, "cpu")
    report = Report(machine_info("cpu", 1), cfg)
    report.section("paper: x", slug="paper")
    report.figure("a figure", "1", 1)
    report.write(tmp_path, pending=["rounds", "sharing"])
    summary = json.loads((tmp_path / f"bench_{cfg.name}.json").read_text())
    assert summary["complete"] is False and summary["pending_sections"] == ["rounds", "sharing"]
    assert (tmp_path / f"bench_{cfg.name}.md").read_text().splitlines()[2].startswith(
        "**Incomplete: the benchmark stopped before section(s) rounds, sharing")
    report.write(tmp_path, pending=[])
    assert json.loads((tmp_path / f"bench_{cfg.name}.json").read_text())["complete"] is True
    assert "Incomplete" not in (tmp_path / f"bench_{cfg.name}.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_the_paper_archive_is_what_both_codes_read(tmp_path):
    # the section writes the python archive the official main_run.py reads; ours reads the same files
    from fedhpro.data.cifar import load_cifar

    arrays = paper_arrays(30, 5)
    folder = write_cifar_python(arrays, tmp_path / "data" / "CIFAR10")
    data = load_cifar(tmp_path, "cifar10", path=str(folder.parent), source="python", cache=False)
    assert np.array_equal(data.train_x.numpy(), arrays.train_x) and np.array_equal(data.train_y.numpy(), arrays.train_y)
    # so the partition counts the section takes from the arrays are those of the files both codes read
    assert our_client_counts(folder.parent, 25) == partition_counts(arrays.train_y, 25)


GPU_CHECK = REPO / "scripts" / "gpu-check.sh"


def test_gpu_check_script_refuses_bad_arguments(tmp_path):
    import subprocess

    for args, said in ((["4", str(tmp_path)], "part must be 1, 2 or 3"),
                       (["1", str(tmp_path), str(tmp_path)], "is not a checkout of mala-lab/FedHPro")):
        proc = subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and said in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_check_part_1_packs_what_the_device_tool_returns(tmp_path):
    """The device check's part 1 at the quick size on the CPU (the GPU check itself needs a lent GPU): a few files
    in OUT (the device tool returns at most eight), the benchmark's files in one archive, complete."""
    import os
    import subprocess
    import tarfile

    checkout = stand_in_checkout(tmp_path, quick_counts(tmp_path))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU_CHECK), "1", str(out), str(checkout), "--", "--quick", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COMPILE": "none"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check part 1: fedhpro bench exited 0" in proc.stdout
    assert {p.name for p in out.iterdir()} <= {"bench-part1.tar.gz", "bench-part1.md", "bench-part1.log",
                                               "nvidia-smi.txt"}
    with tarfile.open(out / "bench-part1.tar.gz") as tf:
        names = set(tf.getnames())
        summary = json.loads(tf.extractfile("bench/bench_gpu-cifar10shape-resnet10-quick.json").read())
    assert {"bench/bench_gpu-cifar10shape-resnet10-quick_paper.json", "bench/round-times.csv"} <= names
    assert summary["complete"] is True and "official" in summary["data"]["paper"]


@pytest.mark.slow
def test_paper_section_times_a_compiled_run_beside_the_eager_one(tmp_path, capsys):
    """`--compile default` on the CPU (reduce-overhead, the GPU's mode, needs CUDA): a second run of the same cell,
    its own figures, checks and round-times row (keyed by its execution, so it never times an eager run)."""
    out, times = tmp_path / "bench", tmp_path / "round-times.csv"
    assert cli_main(["bench", "--gpu", "--quick", "--device", "cpu", *PAPER_ONLY, "--compile", "default",
                     "--out", str(out), "--times", str(times)]) == 0
    text = capsys.readouterr().out
    assert "ours, compile default: extrapolated 100-round run (min)" in text
    data = json.loads((out / "bench_gpu-cifar10shape-resnet10-quick_paper.json").read_text())["data"]
    assert set(data["ours"]) == {"none", "default"} and data["compile_failed"] == {}
    assert data["config_hash"]["none"] != data["config_hash"]["default"]
    eager, compiled = data["ours"]["none"], data["ours"]["default"]
    assert compiled["train_loss"] != eager["train_loss"]  # really compiled: fused kernels round differently ...
    assert np.allclose(compiled["train_loss"], eager["train_loss"], rtol=0.05)  # ... the same training otherwise
    from fedhpro.plan import read_times

    rows = read_times(times)
    assert sorted(m.key[-1] for m in rows) == ['{"compile": "default"}', "{}"]


def test_a_time_limit_during_the_official_run_still_writes_the_section(tmp_path):
    """SIGINT (what `timeout` in scripts/gpu-check.sh sends at the device call's limit) while the official code runs:
    the section ends with the official run marked interrupted, its files say so and are marked incomplete, and
    the benchmark stops there."""
    import os
    import signal
    import subprocess
    import sys

    checkout = stand_in_checkout(tmp_path, quick_counts(tmp_path), hang=True)
    out = tmp_path / "bench"
    # started with SIGINT ignored, as a background shell (CI, a device tool) starts it: `python -m fedhpro.bench`
    # puts the KeyboardInterrupt handler back, so the interrupt still lands (and the official child gets it too)
    proc = subprocess.Popen([sys.executable, "-m", "fedhpro.bench", "--gpu", "--quick", "--device", "cpu",
                             "--skip", "rounds", "--skip", "batched", "--skip", "precision", "--skip", "scale",
                             "--official", str(checkout), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    for line in proc.stdout:  # the official stand-in has printed its partition and now sleeps
        lines.append(line)
        if "partition identical" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    try:
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:  # never leave it (and the hanging stand-in) behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "".join(lines) + rest
    summary = json.loads((out / "bench_gpu-cifar10shape-resnet10-quick.json").read_text())
    assert summary["complete"] is False and summary["pending_sections"] == ["sharing"]  # it stopped after paper
    data = summary["data"]["paper"]
    assert data["interrupted"] is True and data["official"] == {"failed": "interrupted (time limit)"}
    assert len(data["ours"]["none"]["seconds"]) == 2  # the eager run's figures are kept
