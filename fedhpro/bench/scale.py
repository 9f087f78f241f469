"""Section `scale`: memory at many clients with partial participation, personalized client state in memory and
on disk (with the checkpoint `fedhpro.train` writes), the partitioners on a million labels, and `snakemake -n`
planning a sweep of thousands of runs, and `fedhpro plan` printing the cost of config/paper.yaml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import numpy as np
import torch
import yaml

from fedhpro.bench.common import BenchConfig, mib, new_engine, synthetic_digits, tensor_peak
from fedhpro.bench.report import Report
from fedhpro.engine import RoundResult, tensor_bytes
from fedhpro.partition import partition_labels
from fedhpro.runio import CHECKPOINT
from fedhpro.sweep import expand_sweep
from fedhpro.train import record_round, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def bench_scale(cfg: BenchConfig, report: Report) -> None:
    n_big, frac, per = cfg.scale_clients, cfg.scale_participation, cfg.scale_samples_per_client
    k = max(1, int(round(n_big * frac)))
    report.section("scale", f"synthetic 8x8 digits-shaped data, {per} samples per client, small CNN, "
                            f"1 local epoch, batch {cfg.batch_size}, device {cfg.device}", slug="scale")
    report.data["scale"] = {"fedavg_global": scale_global(cfg, k, report),
                            "personalized": scale_personalized(cfg, k, report),
                            "partition_s": scale_partitioners(cfg, report),
                            "snakemake": snakemake_plan(cfg.sweep_runs, report),
                            "plan": paper_cost_estimate(report)}


def paper_cost_estimate(report: Report) -> dict:
    """`fedhpro plan --configfile config/paper.yaml` as a user types it (its own process, from its start to the
    printed totals): the cost of the paper grid before it is submitted (target: under 60 s)."""
    config = REPO / "config" / "paper.yaml"
    if not config.exists():
        report.figure("fedhpro plan, config/paper.yaml", "not measured", None, "no config/paper.yaml")
        report.check("fedhpro plan prints config/paper.yaml's cost in < 60 s", None, "no config/paper.yaml")
        return {"measured": False}
    exe = Path(sys.executable).with_name("fedhpro")  # the venv's console script, as a user runs it
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from fedhpro.cli import main; "
                                                                    "sys.exit(main())"])
    cmd += ["plan", "--configfile", str(config)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, text = None, "timed out after 300 s"
    seconds = time.perf_counter() - t0
    ok = rc == 0 and "total" in text
    totals = [re.search(r"\s(\d+)\s", line) for line in text.splitlines() if line.startswith("total")]
    runs = totals[0].group(1) if ok and totals and totals[0] else "?"
    why = f"{runs} runs, per experiment and in total" if ok else (text.strip().splitlines() or [f"exit {rc}"])[-1]
    report.figure("fedhpro plan, config/paper.yaml (s)", f"{seconds:.1f}" if ok else "failed", seconds, why)
    report.check("fedhpro plan prints config/paper.yaml's cost in < 60 s", ok and seconds < 60,
                 f"{seconds:.1f} s" + ("" if ok else f" (exit {rc})"))
    return {"measured": True, "seconds": seconds, "rc": rc, "runs": runs}


def scale_global(cfg: BenchConfig, k: int, report: Report) -> list[dict]:
    """FedAvg (global mode), `k` clients per round out of `k` and out of `scale_clients`: round memory and time."""
    device = torch.device(cfg.device)
    n_big, frac, per = cfg.scale_clients, cfg.scale_participation, cfg.scale_samples_per_client

    def fedavg_round(num_clients: int) -> dict:
        run_cfg = cfg.run_config("fedavg", dataset="digits", num_clients=num_clients, clients_per_round=k,
                                 partition="iid", alpha=None, local_epochs=1, eval_every=1000, model="cnn")
        engine = new_engine(run_cfg, synthetic_digits(num_clients * per))
        engine.run_round(1)
        times = []
        for r in (2, 3):
            t0 = time.perf_counter()
            engine.run_round(r)
            times.append(time.perf_counter() - t0)
        dt = min(times)
        peak, how = tensor_peak(lambda: engine.run_round(4), device)
        return {"clients": num_clients, "participating": k, "round_s": dt, "peak_bytes": peak,
                "client_states": len(engine.client_states), "client_state_bytes": tensor_bytes(engine.client_states),
                "memory_how": how}

    small, big = fedavg_round(k), fedavg_round(n_big)
    for row in (small, big):
        report.figure(f"fedavg {row['clients']} clients, {k}/round: round peak memory", mib(row["peak_bytes"]), row,
                      row["memory_how"])
        report.figure(f"fedavg {row['clients']} clients, {k}/round: round time (best of 2)",
                      f"{row['round_s']:.2f} s", row["round_s"])
        report.figure(f"fedavg {row['clients']} clients: client_states entries / bytes",
                      f"{row['client_states']} / {row['client_state_bytes']}", None, "global mode keeps no tensors")
    ratio = big["peak_bytes"] / max(small["peak_bytes"], 1)
    report.figure(f"peak memory ratio {n_big} vs {k} clients (same {k} per round)", f"{ratio:.2f}", ratio)
    report.check(f"{n_big} clients at {frac:.0%} participation: memory follows participating clients",
                 ratio <= 1.5, f"round peak {mib(big['peak_bytes'])} vs {mib(small['peak_bytes'])} with only "
                               f"{k} clients in total (ratio {ratio:.2f}, target <= 1.5)")
    return [small, big]


def scale_personalized(cfg: BenchConfig, k: int, report: Report) -> dict[str, dict]:
    """FedProto, personalized, `scale_clients` clients: CPU client state in memory or on disk (`client_store`),
    stepped as `fedhpro.train` steps a run (`record_round`), then the checkpoint it writes (`write_checkpoint`)."""
    n_big, frac = cfg.scale_clients, cfg.scale_participation
    data = synthetic_digits(n_big * cfg.scale_samples_per_client, seed=1)
    rounds = cfg.scale_personal_rounds
    stores: dict[str, dict] = {}
    for store in ("memory", "disk"):
        # checkpoint_every beyond the measured rounds: the rounds are timed without it, the checkpoint after them
        run_cfg = cfg.run_config("fedproto", dataset="digits", num_clients=n_big, clients_per_round=k,
                                 partition="iid", alpha=None, local_epochs=1, eval_every=1000, checkpoint_every=1000,
                                 model="cnn", eval_mode="personalized", client_store=store)
        with tempfile.TemporaryDirectory(prefix="fedhpro-bench-") as tmp:
            run_dir = Path(tmp)
            engine = new_engine(run_cfg, data, run_dir)
            rows: list[dict] = []
            times = []
            for r in range(1, rounds + 1):
                t0 = time.perf_counter()
                record_round(engine, r, rows, run_dir)
                times.append(time.perf_counter() - t0)
            states = engine.client_states
            ckpt_s = write_checkpoint(engine, run_dir, rows, rounds)
            held = states.nbytes_in_memory()
            on_cpu = all(v.device.type == "cpu" for v in states[next(iter(states.keys()))]["model"].values())
            t0 = time.perf_counter()
            engine.evaluate_into(RoundResult(round=rounds, selected=[], train_loss=0.0))
            eval_s = time.perf_counter() - t0
            stores[store] = {"clients_with_state": len(states), "held_bytes": held, "on_cpu": on_cpu,
                             "disk_bytes": states.nbytes_on_disk() if store == "disk" else 0,
                             "checkpoint_bytes": (run_dir / CHECKPOINT).stat().st_size, "checkpoint_s": ckpt_s,
                             "round_s_median": float(np.median(times)), "eval_all_s": eval_s}
    model_bytes = tensor_bytes(engine.ctx.make_model().state_dict())
    for store, row in stores.items():
        label = f"fedproto personalized, {n_big} clients, {k}/round, client_store {store}"
        report.figure(f"{label}: clients with a state after {rounds} rounds", f"{row['clients_with_state']}",
                      row["clients_with_state"], f"model state_dict {model_bytes / 1024:.0f} KiB per client")
        report.figure("  client state held in memory between rounds", mib(row["held_bytes"]), row["held_bytes"],
                      f"on CPU: {row['on_cpu']}" + (f"; on disk {mib(row['disk_bytes'])}" if store == "disk" else ""))
        report.figure("  checkpoint size / time", f"{mib(row['checkpoint_bytes'])} / {row['checkpoint_s']:.2f} s",
                      row["checkpoint_bytes"])
        report.figure(f"  round time (median of {rounds}) / evaluation of all {n_big} clients",
                      f"{row['round_s_median']:.2f} s / {row['eval_all_s']:.1f} s", row["round_s_median"],
                      "never-sampled clients are evaluated with their initial model, rebuilt, not stored")
    disk, memory = stores["disk"], stores["memory"]
    report.check(f"{n_big} clients at {frac:.0%} participation, personalized: client state in memory and the "
                 "checkpoint follow the participating clients (client_store disk)",
                 disk["held_bytes"] == 0 and disk["checkpoint_bytes"] < model_bytes,
                 f"between rounds {mib(disk['held_bytes'])} held (memory store: {mib(memory['held_bytes'])}); "
                 f"checkpoint {mib(disk['checkpoint_bytes'])} (memory store: {mib(memory['checkpoint_bytes'])}); "
                 f"round time {disk['round_s_median'] / memory['round_s_median']:.2f}x the memory store's")
    return stores


def scale_partitioners(cfg: BenchConfig, report: Report) -> dict[str, float]:
    labels = np.random.RandomState(0).randint(0, 10, cfg.partition_labels)
    timings = {}
    for scheme, kw in (("iid", {}), ("dirichlet", {"alpha": 0.5}), ("pathological", {"classes_per_client": 2}),
                       ("creff", {"alpha": 0.5, "imbalance_ratio": 100.0})):
        t0 = time.perf_counter()
        parts = partition_labels(labels, scheme=scheme, num_clients=cfg.partition_clients, seed=0, **kw)
        timings[scheme] = time.perf_counter() - t0
        report.figure(f"partition_labels {scheme}: {cfg.partition_labels:,} labels x {cfg.partition_clients} "
                      "clients", f"{timings[scheme]:.2f} s", timings[scheme],
                      f"{sum(len(p) for p in parts):,} samples assigned")
    report.check(f"partitioners: {cfg.partition_labels:,} labels x {cfg.partition_clients} clients in seconds",
                 max(timings.values()) < 10.0, f"slowest {max(timings, key=timings.get)} "
                                               f"{max(timings.values()):.2f} s (target < 10 s)")
    return timings


def snakemake_plan(target_runs: int, report: Report) -> dict:
    snakefile = REPO / "Snakefile"
    exe = Path(sys.executable).with_name("snakemake")
    exe = str(exe) if exe.exists() else shutil.which("snakemake")
    base = REPO / "config" / "config.yaml"
    if not snakefile.exists() or exe is None or not base.exists():
        report.figure(f"snakemake -n, {target_runs}-run sweep", "not measured yet", None,
                      "no Snakefile / snakemake / config/config.yaml")
        report.check(f"snakemake -n plans a {target_runs}-run sweep in < 60 s", None, "not measured yet")
        return {"measured": False}
    raw = yaml.safe_load(base.read_text())
    with tempfile.TemporaryDirectory(prefix="fedhpro-bench-smk-") as tmp:
        raw["results"], raw["data_root"] = f"{tmp}/results", f"{tmp}/data"
        one = dict(raw, seeds=[0])
        two = dict(raw, seeds=[0, 1])
        n1, n2 = len(expand_sweep(one, warn=lambda m: None)), len(expand_sweep(two, warn=lambda m: None))
        per_seed, fixed = n2 - n1, n1 - (n2 - n1)
        seeds = max(1, -(-(target_runs - fixed) // max(per_seed, 1)))
        raw["seeds"] = list(range(seeds))
        t0 = time.perf_counter()
        runs = len(expand_sweep(raw, warn=lambda m: None))
        expand_s = time.perf_counter() - t0
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        cmd = [exe, "-s", str(snakefile), "-d", tmp, "--configfile", str(cfg_path), "-n", "--cores", "2",
               "--quiet", "all"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            rc, tail = None, "timed out after 300 s"
        plan_s = time.perf_counter() - t0
    ok = rc == 0
    report.figure(f"sweep runs (seeds x {per_seed} + {fixed})", f"{runs:,}", runs,
                  f"expand_sweep alone {expand_s:.1f} s")
    report.figure("snakemake -n (dry run, whole DAG)", f"{plan_s:.1f} s" if ok else "failed", plan_s,
                  "" if ok else tail.strip().splitlines()[-1] if tail.strip() else f"exit {rc}")
    report.check(f"snakemake -n plans a {runs:,}-run sweep in < 60 s", ok and plan_s < 60,
                 f"{plan_s:.1f} s" + ("" if ok else f" (exit {rc})"))
    return {"measured": True, "runs": runs, "expand_s": expand_s, "plan_s": plan_s, "rc": rc,
            "tail": tail if not ok else ""}
