"""Sections (a)-(e) and (c'): the engine's local training against a bare PyTorch loop, the round time and its
split, peak memory, and FedHPro against FedAvg at the pipeline's quick setting (see `fedhpro.bench`).

Every measured round is `fedhpro.train.record_round`, the step `train` runs: the engine's round, the metrics
row, the checkpoint (every round here, `checkpoint_every: 1`), so the checkpoint I/O is what a run writes."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fedhpro.augment import apply_augment
from fedhpro.bench.common import (BenchConfig, ClientTimer, mib, new_engine, sync, tensor_peak,
                                  trained_samples)
from fedhpro.bench.report import Report
from fedhpro.data import ArrayData
from fedhpro.engine import Context, batches
from fedhpro.methods import METHODS
from fedhpro.train import record_round

METHODS_COMPARED = ("fedavg", "fedhpro", "fedproto")
PAIRS = (("plain", "fedavg"), ("fedhpro", "fedhpro"), ("fedproto", "fedproto"))  # (bare loop, engine)


def bare_loop(model, optimizer, client_data, loss_fn, *, epochs: int, batch_size: int, augment: str,
              augment_per_sample: bool, gen: torch.Generator, device: torch.device) -> int:
    """The limit: plain PyTorch over pre-normalised tensor-resident client data; returns samples trained."""
    model.train()
    samples = 0
    for x_all, y_all in client_data:
        for _ in range(epochs):
            for idx in batches(len(y_all), batch_size, gen, device):
                x = x_all[idx]
                if augment != "none":
                    x = apply_augment(augment, x, gen, per_sample=augment_per_sample)
                loss = loss_fn(model, x, y_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                samples += idx.numel()
    return samples


def plain_loss(model, x, y):
    return F.cross_entropy(model(x)[1], y)


class TimedRun:
    """One method's run, stepped round by round as `fedhpro.train` steps it (`record_round`), with the Client's
    train/setup/upload hooks timed."""

    def __init__(self, cfg: BenchConfig, method: str, data: ArrayData, out_dir: Path, **changes):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.device = out_dir, torch.device(cfg.device)
        self.engine = new_engine(cfg.run_config(method, **changes), data, out_dir)
        self.timer = ClientTimer(self.engine.client, self.device)
        self.rows: list[dict] = []

    def round(self, r: int) -> dict:
        """Round `r` -> its timings (s): the engine's round (`wall`: local + server + evaluation), the
        checkpoint (`io`), their sum (`round_total`), the `RoundResult` times and the client hooks' times."""
        engine, timer = self.engine, self.timer
        timer.reset()
        sync(self.device)
        t0 = time.perf_counter()
        res = record_round(engine, r, self.rows, self.out_dir)
        sync(self.device)
        total = time.perf_counter() - t0
        io = self.rows[-1]["time_io"]
        cfg = engine.cfg
        samples = sum(trained_samples(engine.ctx.clients[c].num_samples, cfg.batch_size, cfg.local_epochs)
                      for c in res.selected)
        return {"round": r, "wall": total - io, "io": io, "round_total": total, "local": res.time_local,
                "server": res.time_server, "eval": res.time_eval, "train": timer.train, "setup": timer.setup,
                "upload": timer.upload, "loop": timer.train - timer.setup - timer.upload, "samples": samples,
                "test_acc": res.test_acc}


class BareLoops:
    """The bare loops over the engine's (pre-normalised) client data: plain CE, and the same loop with FedHPro's
    and FedProto's own loss (`Client.loss` after `Client.setup` on a warmed-up broadcast)."""

    def __init__(self, cfg: BenchConfig, ctx: Context):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.client_data = [(ctx.prepare(c.x, train=False), c.y) for c in ctx.clients]
        self.augment, self.per_sample = ctx.augment, ctx.cfg.augment_per == "sample"
        self.gen = torch.Generator().manual_seed(1)
        self.losses: dict[str, tuple[Callable, torch.nn.Module]] = {"plain": (plain_loss, ctx.make_model())}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.compiled: dict[str, torch.nn.Module] = {}

    def add_method_losses(self, runs: dict[str, TimedRun], round_idx: int) -> None:
        for m in ("fedhpro", "fedproto"):
            engine = runs[m].engine
            client = METHODS[m].Client(engine.ctx)
            model = engine.ctx.make_model()
            model.load_state_dict(engine.server.model.state_dict())
            client.setup(engine.ctx.clients[0], model, engine.server.broadcast(round_idx), {},
                         torch.Generator().manual_seed(0), round_idx)
            self.losses[m] = (client.loss, model)
        self.optimizers = {k: torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum)
                           for k, (_, model) in self.losses.items()}

    def run(self, key: str, epochs: int | None = None) -> dict:
        fn, model = self.losses[key]
        if self.cfg.compile != "none":  # the same torch.compile as the engine's runs (`compile`), made once
            model = self.compiled.setdefault(key, torch.compile(model, mode=self.cfg.compile))
        sync(self.device)
        t0 = time.perf_counter()
        n = bare_loop(model, self.optimizers[key], self.client_data, fn, epochs=epochs or self.cfg.local_epochs,
                      batch_size=self.cfg.batch_size, augment=self.augment, augment_per_sample=self.per_sample,
                      gen=self.gen, device=self.device)
        sync(self.device)
        return {"seconds": time.perf_counter() - t0, "samples": n}


def bench_rounds(cfg: BenchConfig, data: ArrayData, report: Report) -> list:
    """(a)-(e) and the quick setting; returns the round-times rows of (c, d) (`fedhpro.plan.Measurement`)."""
    device = torch.device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="fedhpro-bench-") as tmp:
        runs = {m: TimedRun(cfg, m, data, Path(tmp) / m, compile=cfg.compile) for m in METHODS_COMPARED}
        ctx0 = runs["fedavg"].engine.ctx
        assert all(len(run.engine.ctx.clients) == len(ctx0.clients) for run in runs.values())
        bare = BareLoops(cfg, ctx0)
        # warm-up rounds (not counted), then the bare loops' method losses from the warmed-up payloads
        for r in range(1, cfg.warmup + 1):
            for m in METHODS_COMPARED:
                runs[m].round(r)
        bare.add_method_losses(runs, cfg.warmup + 1)
        for key in bare.losses:  # warm-up of the bare loops too
            bare.run(key)
        records: dict[str, list[dict]] = {m: [] for m in METHODS_COMPARED}
        bare_records: dict[str, list[dict]] = {}
        for rep in range(cfg.rounds):
            r = cfg.warmup + 1 + rep
            # ABBA: every engine round runs next to its bare loop, and which goes first (and the order of the
            # pairs) alternates between repeats, so drifts in the machine's load cancel out of the ratios
            for key, m in (PAIRS if rep % 2 == 0 else PAIRS[::-1]):
                jobs = [lambda: bare_records.setdefault(key, []).append(bare.run(key)),
                        lambda: records[m].append(runs[m].round(r))]
                for job in (jobs if rep % 2 == 0 else jobs[::-1]):
                    job()
        # (e) memory: separate passes (the profiler slows what it watches), one local epoch per client: a step's
        # memory does not depend on how many steps came before it
        memory = {"bare loop (CE)": tensor_peak(lambda: bare.run("plain", 1), device)}
        for m in METHODS_COMPARED:
            run = TimedRun(cfg, m, data, Path(tmp) / f"{m}-memory", local_epochs=1, compile=cfg.compile)
            run.round(1)
            memory[f"{m} round + checkpoint"] = tensor_peak(lambda: run.round(2), device)
        measured = round_time_rows(cfg, {m: runs[m].engine.cfg for m in METHODS_COMPARED}, records)
    report_throughput(cfg, ctx0, bare_records, records, report)
    report_round_split(records, report)
    report_memory(memory, report)
    bench_quick_setting(cfg, data, report)
    return measured


def round_time_rows(cfg: BenchConfig, run_configs: dict, records: dict[str, list[dict]]) -> list:
    """(c, d) as rows of the round-times table that `fedhpro plan` estimates sweeps from (`bench --times`).
    The quick config's tiny subset is keyed `<dataset>:quick`, so it never stands for a real run."""
    from fedhpro.plan import Measurement, current_device_kind, run_key

    kind = current_device_kind(cfg.device)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    rows = []
    for m, recs in records.items():
        run_cfg = run_configs[m]
        key = run_key(run_cfg, kind)
        if cfg.subset is not None or (cfg.synthetic and cfg.name.endswith("-quick")):
            key = (key[0], f"{key[1]}:quick") + key[2:]
        mid = {k: statistics.median(x[k] for x in recs) for k in ("local", "server", "eval", "io")}
        rows.append(Measurement(key=key, local_epochs=run_cfg.local_epochs, s_local=mid["local"],
                                s_server=mid["server"], s_eval=mid["eval"], s_io=mid["io"], runs_sharing=1,
                                rounds_measured=len(recs), source=f"fedhpro bench ({cfg.name})", measured=today))
    return rows


def report_throughput(cfg: BenchConfig, ctx0: Context, bare: dict[str, list[dict]], records: dict[str, list[dict]],
                      report: Report) -> None:
    """(a) + (b)"""
    med = statistics.median
    report.section("(a, b) local training throughput",
                   f"{len(ctx0.clients)} clients, {cfg.local_epochs} local epochs, batch {cfg.batch_size}, SGD lr "
                   f"{cfg.lr} momentum {cfg.momentum}, model {ctx0.model_names[0]}, augment {ctx0.augment}, "
                   f"compile {cfg.compile} (engine and bare loop alike); medians "
                   f"of {cfg.rounds} repeats after a warm-up, each engine round run next to its bare loop (ABBA "
                   "order); ratio = median of the per-repeat ratios", slug="throughput")
    limit = {k: med(b["samples"] / b["seconds"] for b in v) for k, v in bare.items()}
    report.figure("limit: bare PyTorch loop, CE (samples/s)", f"{limit['plain']:,.0f}", limit["plain"],
                  f"best {max(b['samples'] / b['seconds'] for b in bare['plain']):,.0f}")
    for m in ("fedhpro", "fedproto"):
        report.figure(f"limit: bare loop with {m}'s loss (samples/s)", f"{limit[m]:,.0f}", limit[m])
    report.data["throughput"] = {"limit": limit, "bare": bare, "records": records}
    ratios = {}
    for key, m in PAIRS:
        recs, own = records[m], bare[key]

        def ratio(field: str) -> float:
            return med((x["samples"] / x[field]) / (b["samples"] / b["seconds"]) for x, b in zip(recs, own))

        loop, incl, local = (med(x["samples"] / x[f] for x in recs) for f in ("loop", "train", "local"))
        ratios[m] = ratio("loop")
        report.figure(f"{m}: engine local training loop (samples/s)", f"{loop:,.0f}", loop,
                      "Client.train minus setup/upload")
        report.figure(f"{m}: ratio to its bare loop" + (" (CE)" if m == "fedavg" else " (same loss)"),
                      f"{ratios[m]:.3f}", ratios[m])
        if m != "fedavg":
            plain = med((x["samples"] / x["loop"]) / (b["samples"] / b["seconds"])
                        for x, b in zip(recs, bare["plain"]))
            report.figure(f"{m}: ratio to the plain CE bare loop", f"{plain:.3f}", plain,
                          "includes the method's extra loss terms")
        report.figure(f"{m}: incl. setup + upload (samples/s, ratio)", f"{incl:,.0f} ({ratio('train'):.3f})", incl,
                      "FedHPro's setup = per-class client gradients" if m == "fedhpro" else "")
        report.figure(f"{m}: time_local basis (samples/s, ratio)", f"{local:,.0f} ({ratio('local'):.3f})", local,
                      "adds broadcast, weight loading, upload copies")
    for key, m in PAIRS:
        spread = [(x["samples"] / x["loop"]) / (b["samples"] / b["seconds"]) for x, b in zip(records[m], bare[key])]
        report.check(f"{m} local training >= 90% of bare-loop throughput", ratios[m] >= 0.9,
                     f"{ratios[m]:.1%} (repeats {min(spread):.1%}..{max(spread):.1%})")


def report_round_split(records: dict[str, list[dict]], report: Report) -> None:
    """(c) + (d)"""
    med = statistics.median
    report.section("(c, d) round time and its split",
                   "round = run_round wall (local + server + evaluation) + checkpoint write; medians of the repeats; "
                   "FedHPro/FedAvg = median of the per-repeat ratios", slug="rounds")
    for m in METHODS_COMPARED:
        recs = records[m]
        mid = {k: med(x[k] for x in recs) for k in ("local", "server", "eval", "io", "round_total")}
        total = mid["round_total"]
        report.figure(f"{m}: round (median / best, s)", f"{total:.3f} / {min(x['round_total'] for x in recs):.3f}",
                      total)
        report.figure(f"{m}: local / server / eval / ckpt (s)",
                      f"{mid['local']:.3f} / {mid['server']:.3f} / {mid['eval']:.3f} / {mid['io']:.3f}", mid)
        report.figure(f"{m}: local / server / eval / ckpt (% of round)",
                      " / ".join(f"{100 * mid[k] / total:.1f}" for k in ("local", "server", "eval", "io")), None)
        if m == "fedhpro":
            setup = med(x["setup"] for x in recs)
            report.figure("fedhpro: of local, client gradient step (setup, s)", f"{setup:.3f}", setup)
    per_rep = [h["round_total"] / a["round_total"] for h, a in zip(records["fedhpro"], records["fedavg"])]
    ratio = med(per_rep)
    report.figure("fedhpro round / fedavg round", f"{ratio:.3f}", ratio,
                  f"repeats {min(per_rep):.3f}..{max(per_rep):.3f}")
    report.check("FedHPro round <= 1.25x FedAvg round", ratio <= 1.25,
                 f"{ratio:.3f}x (repeats {min(per_rep):.3f}..{max(per_rep):.3f})")
    for m in METHODS_COMPARED:
        frac = med((x["eval"] + x["io"]) / x["round_total"] for x in records[m])
        report.check(f"{m}: evaluation + checkpointing < 10% of a round", frac < 0.10, f"{frac:.1%}")


def report_memory(memory: dict[str, tuple[int, str]], report: Report) -> None:
    """(e)"""
    report.section("(e) peak memory", "one local epoch per client (a step's memory does not grow with the number "
                   "of steps); measured separately from the timings; " + memory["bare loop (CE)"][1], slug="memory")
    for k, (peak, _) in memory.items():
        report.figure(f"{k}: peak above start", mib(peak), peak)
    report.data["memory"] = {k: v[0] for k, v in memory.items()}


def bench_quick_setting(cfg: BenchConfig, data: ArrayData, report: Report) -> None:
    """(c'): the pipeline's quick setting (config/config.yaml defaults), the same comparison, informational."""
    device = torch.device(cfg.device)
    qs = cfg.quick_setting
    report.section("(c') FedHPro vs FedAvg at the pipeline's quick setting",
                   f"local_epochs {qs['local_epochs']}, batch {qs['batch_size']}, lr {qs['lr']}, momentum "
                   f"{qs['momentum']} (config/config.yaml defaults); FedHPro's per-round server work and client "
                   "gradient pass are fixed costs, so their share grows as local work shrinks", slug="quick_setting")
    times: dict[str, list[float]] = {"fedavg": [], "fedhpro": []}
    engines = {}
    for m in times:
        engines[m] = new_engine(cfg.run_config(m, **qs), data)
        engines[m].run_round(1)
    for rep, r in enumerate(range(2, 2 + max(cfg.rounds, 2))):
        for m in (("fedavg", "fedhpro") if rep % 2 == 0 else ("fedhpro", "fedavg")):
            sync(device)
            t0 = time.perf_counter()
            engines[m].run_round(r)
            sync(device)
            times[m].append(time.perf_counter() - t0)
    q = statistics.median(h / a for h, a in zip(times["fedhpro"], times["fedavg"]))
    report.figure("fedavg round / fedhpro round (median, s)",
                  f"{statistics.median(times['fedavg']):.3f} / {statistics.median(times['fedhpro']):.3f}", times)
    report.figure("fedhpro round / fedavg round", f"{q:.3f}", q, "informational: no target at this setting")
