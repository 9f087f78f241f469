"""Section `precision and channels_last`: bf16, fp16 and channels-last against fp32 (FedAvg and FedHPro)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fedhpro.bench.common import (BenchConfig, ClientTimer, new_engine, relative_weight_difference, sync,
                                  trained_samples)
from fedhpro.bench.report import Report
from fedhpro.config import ConfigError
from fedhpro.data import ArrayData
from fedhpro.engine import RoundResult, autocast_context

PRECISION_VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True},
                      "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
                      "fp16": {"precision": "fp16"}}


def bench_precision(cfg: BenchConfig, data: ArrayData, report: Report) -> None:
    """`precision` (autocast of local training and evaluation; fp16 with loss scaling) and `channels_last`,
    side by side with fp32: FedAvg and FedHPro, one short training per setting from the same seed, the settings'
    rounds interleaved (ABBA order per round). Throughput = the local-training loop (`Client.train` minus
    setup/upload, as in (a, b)) over the rounds after the first (the warm-up; all rounds when there is one);
    accuracy = the global model's test accuracy after the last round. fp16 runs on every device (torch's CPU
    autocast supports float16 and `GradScaler("cpu")` works)."""

    device = torch.device(cfg.device)
    qs, rounds, k = cfg.quick_setting, cfg.precision_rounds, cfg.precision_clients

    def warm_up(ctx) -> None:
        """A few steps of a throwaway model under the setting's autocast and layout (kernel selection, caches),
        outside the run's RNG streams; matters when only one round is measured."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = ctx.make_model()
            x, y = ctx.prepare(ctx.clients[0].x[:qs["batch_size"]], train=False), ctx.clients[0].y[:qs["batch_size"]]
            for _ in range(3):
                with autocast_context(ctx):
                    loss = F.cross_entropy(model(x)[1], y)
                loss.backward()
            sync(device)

    flags = ""
    if device.type == "cpu":
        try:
            present = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            present = set()
        wanted = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
        flags = "; CPU bf16/fp16 instructions: " + (", ".join(f for f in wanted if f in present) or
                                                    "none (low-precision convolutions use slow generic kernels)")
    report.section("precision and channels_last",
                   f"FedAvg and FedHPro, {k} clients (iid), {rounds} round(s) x {qs['local_epochs']} local epoch, "
                   f"batch {qs['batch_size']}, lr {qs['lr']}, momentum {qs['momentum']}, same seed; autocast covers "
                   "local-training forward + loss and evaluation, client gradients and server steps stay fp32; "
                   f"throughput over round {'1' if rounds == 1 else '2' if rounds == 2 else f'2..{rounds}'} "
                   "(Client.train minus setup/upload), ABBA order per round; accuracy on the test set after the "
                   "last round; fp16: a fresh GradScaler per local training"
                   + (" (random labels: accuracy means nothing here)" if cfg.synthetic else "") + flags,
                   slug="precision")
    out: dict[str, dict] = {}
    for m in ("fedavg", "fedhpro"):
        engines, timers, refused = {}, {}, {}
        for name, switches in PRECISION_VARIANTS.items():
            run_cfg = cfg.run_config(m, **qs, num_clients=k, partition="iid", alpha=None, eval_every=1000,
                                     **switches)
            try:
                engines[name] = new_engine(run_cfg, data)
            except ConfigError as err:  # e.g. bf16 on a GPU without it
                refused[name] = str(err)
                continue
            timers[name] = ClientTimer(engines[name].client, device)
            warm_up(engines[name].ctx)
        rows = {name: {"loop_s": 0.0, "samples": 0} for name in engines}
        for r in range(1, rounds + 1):
            for name in (list(engines) if r % 2 else list(engines)[::-1]):  # ABBA
                engine, timer = engines[name], timers[name]
                timer.reset()
                res = engine.run_round(r)
                if r > 1 or rounds == 1:
                    rows[name]["loop_s"] += timer.train - timer.setup - timer.upload
                    rows[name]["samples"] += sum(trained_samples(engine.ctx.clients[c].num_samples,
                                                                 qs["batch_size"], qs["local_epochs"])
                                                 for c in res.selected)
        for name, row in rows.items():
            engine = engines[name]
            res = RoundResult(round=rounds, selected=[], train_loss=float("nan"))
            engine.evaluate_into(res)
            row["test_acc"] = res.test_acc
            row["samples_per_s"] = row["samples"] / max(row["loop_s"], 1e-9)
            row["relative_weight_difference"] = relative_weight_difference(engines["fp32"].server.model,
                                                                           engine.server.model)
        base = rows["fp32"]
        for name, row in rows.items():
            row["speed_ratio"] = row["samples_per_s"] / base["samples_per_s"]
            row["acc_diff_points"] = 100 * (row["test_acc"] - base["test_acc"])
            report.figure(f"{m} {name}: local training (samples/s, x fp32)",
                          f"{row['samples_per_s']:,.0f} ({row['speed_ratio']:.2f}x)", row["samples_per_s"])
            report.figure(f"{m} {name}: test accuracy (points vs fp32)",
                          f"{row['test_acc']:.4f} ({row['acc_diff_points']:+.1f})", row["test_acc"],
                          "" if name == "fp32" else f"global weights vs fp32: relative L2 difference "
                                                    f"{row['relative_weight_difference']:.1e}")
        for name, why in refused.items():
            report.figure(f"{m} {name}", "not supported", None, why)
        out[m] = {**rows, **{name: {"refused": why} for name, why in refused.items()}}
    report.data["precision"] = {"setting": {**qs, "clients": k, "rounds": rounds, "partition": "iid"},
                                "variants": PRECISION_VARIANTS, "results": out}
