"""Section `batched clients`: `engine: batched` against sequential clients (FedAvg), local time per round."""

from __future__ import annotations

import statistics

import torch

from fedhpro.batched import MIN_FILL
from fedhpro.bench.common import BenchConfig, new_engine, relative_weight_difference, sync
from fedhpro.bench.report import Report
from fedhpro.data import ArrayData


def bench_batched(cfg: BenchConfig, data: ArrayData, report: Report) -> None:
    device = torch.device(cfg.device)
    default_fill = MIN_FILL.get(device.type, 1.0)
    report.section("batched clients",
                   f"FedAvg, engine sequential vs batched, {cfg.batched_epochs} local epochs, batch {cfg.batch_size}, "
                   f"Dirichlet 0.5, all clients every round; local time per round (time_local), medians of "
                   f"{max(cfg.rounds, 2)} ABBA-interleaved rounds after a warm-up; batched pads a step's unequal batches "
                   f"into one call when their fill >= {default_fill} ({device.type} default), 'padded' = one padded "
                   "call per step (the CUDA policy)", slug="batched")
    out = {}
    modes = {"sequential": None, "batched": default_fill}
    if default_fill != 0.0:
        modes["batched, padded"] = 0.0
    for k in cfg.batched_clients:
        engines = {}
        for mode, fill in modes.items():
            run_cfg = cfg.run_config("fedavg", num_clients=k, engine="sequential" if fill is None else "batched",
                                     local_epochs=cfg.batched_epochs, eval_every=1000)
            engines[mode] = new_engine(run_cfg, data)
            if fill is not None:
                engines[mode].local.min_fill = fill
            engines[mode].run_round(1)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for rep, r in enumerate(range(2, 2 + max(cfg.rounds, 2))):
            for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):  # ABBA
                sync(device)
                times[mode].append(engines[mode].run_round(r).time_local)
        drift = relative_weight_difference(engines["sequential"].server.model, engines["batched"].server.model)
        mid = {mode: statistics.median(v) for mode, v in times.items()}
        speedup = {m: statistics.median(a / b for a, b in zip(times["sequential"], times[m]))
                   for m in modes if m != "sequential"}
        out[k] = {"times": times, "speedup": speedup, "relative_weight_drift": drift}
        report.figure(f"{k} clients: " + " / ".join(modes) + " local time (s)",
                      " / ".join(f"{mid[m]:.3f}" for m in modes), out[k])
        for mode, value in speedup.items():
            report.figure(f"{k} clients: {mode} speed-up", f"{value:.2f}x", value)
        report.figure(f"{k} clients: global weights, relative L2 difference", f"{drift:.1e}", drift,
                      f"batched vs sequential after {1 + max(cfg.rounds, 2)} rounds: float-order noise, amplified "
                      "by training")
    report.data["batched"] = out
