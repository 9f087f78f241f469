"""`fedhpro bench`: how fast the engine trains, side by side with a bare PyTorch loop, in one process.

    fedhpro bench [--quick] [--gpu] [--out results/bench] [--threads 1] [--rounds 3]

Everything is measured in one process on the same data, model, batch size and optimiser, with
the measurements interleaved (each engine round next to its bare loop, ABBA order, repeated), so
that load from other processes hits both alike; ratios are medians of the per-repeat ratios.

Figures (every one printed with the machine, torch version, device and thread count):

(a) limit: a bare training loop over tensor-resident, pre-normalised client data (same clients,
    batch schedule, model, SGD): samples/s. For FedHPro and FedProto also the same bare loop with
    the method's own loss (`Client.loss` after `Client.setup`), the fair limit for their extra terms;
(b) the engine's local-training throughput inside federated rounds, as a ratio to the limit.
    Counted: `Client.train` minus `Client.setup` (FedHPro's per-class client gradients) and
    `Client.upload`, i.e. batch indexing, uint8 -> float normalisation (and augmentation), forward,
    backward, optimiser step, the per-batch loss check. Also shown: incl. setup/upload, and
    `RoundResult.time_local` (adds broadcast, weight loading and upload copies);
(c) FedHPro's full round (local + server + evaluation + checkpoint) against FedAvg's;
(d) per-round wall time split into local training, server step, evaluation and checkpoint I/O
    (checkpoints written exactly as `fedhpro.train` does);
(e) peak memory of each measured region: CPU = peak RSS above the region's starting RSS (the
    kernel's high-water mark, reset through /proc/self/clear_refs; `ru_maxrss` otherwise), CUDA =
    `torch.cuda.max_memory_allocated` above the starting allocation;
then `engine: batched` against sequential clients (FedAvg at 10 and 50 clients); `precision` and
`channels_last` (FedAvg and FedHPro, a short same-seed training under fp32, bf16, channels-last, bf16 +
channels-last and fp16: local-training throughput against fp32 and final test accuracy against fp32); and
scale: memory at 1,000 clients with 10% participation, personalized client state, partitioning 1,000,000
labels over 1,000 clients, and `snakemake -n` planning a 5,000-run sweep.

Targets are printed as PASS/FAIL lines (never asserted): local training >= 90% of the bare loop,
FedHPro round <= 1.25x FedAvg round, evaluation + checkpointing < 10% of a round.

Default config: digits (scikit-learn, 8x8), the small CNN, 10 clients (Dirichlet 0.5), FedHPro's
official local training (10 epochs, batch 64, SGD lr 0.1) and official method defaults (feature
matching 100 steps, re-training 100 epochs, 30 hyper-prototype steps). `--gpu`: ResNet-10 on random
uint8 tensors of CIFAR-10's shape (50,000 x 3 x 32 x 32), 10 clients, on CUDA when available.
`--quick`: a tiny config that runs every section in seconds (for tests; its figures mean little).
Timings are medians over repeats (default 4, ABBA-interleaved); with other processes on the machine
single repeats move by 10-20%, so read the ratios, not the absolute throughputs.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
METHODS_COMPARED = ("fedavg", "fedhpro", "fedproto")


# ---------------------------------------------------------------------------------------------- configs
@dataclass
class BenchConfig:
    name: str
    dataset: str  # the RunConfig dataset (its spec gives the default model and augmentation)
    synthetic: tuple[int, int, int, int] | None  # (train, test, channels, side): random uint8 images
    device: str
    subset: tuple[int, int] | None = None  # first (train, test) samples only (quick)
    num_clients: int = 10
    local_epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.0
    warmup: int = 1
    rounds: int = 4  # measured rounds (repeats) after the warm-up
    fedhpro_params: dict = field(default_factory=dict)
    quick_setting: dict = field(default_factory=lambda: {"local_epochs": 1, "batch_size": 32, "lr": 0.05,
                                                         "momentum": 0.9})
    batched_clients: tuple[int, ...] = (10, 50)
    batched_epochs: int = 2
    scale_clients: int = 1000
    scale_participation: float = 0.1
    scale_samples_per_client: int = 100
    scale_personal_rounds: int = 3  # personalized rounds per client store (memory, disk)
    partition_labels: int = 1_000_000
    partition_clients: int = 1000
    sweep_runs: int = 5000
    precision_clients: int = 2  # `precision`/`channels_last` section: a short iid training at the quick setting
    precision_rounds: int = 2

    def run_config(self, method: str, **changes: Any):
        from fedhpro.config import from_dict

        raw = {"dataset": self.dataset, "method": method, "num_clients": self.num_clients, "partition": "dirichlet",
               "alpha": 0.5, "local_epochs": self.local_epochs, "batch_size": self.batch_size, "lr": self.lr,
               "momentum": self.momentum, "device": self.device, "seed": 0, "partition_seed": 0,
               "rounds": 1000, "eval_every": 1, "checkpoint_every": 1}
        if method == "fedhpro":
            raw["method_params"] = dict(self.fedhpro_params)
        raw.update(changes)
        return from_dict(raw)


def make_config(quick: bool, gpu: bool, device: str | None) -> BenchConfig:
    from fedhpro.methods import fast_test_params

    dev = device or ("cuda" if gpu and torch.cuda.is_available() else "cpu")
    if gpu:
        cfg = BenchConfig(name="gpu-cifar10shape-resnet10", dataset="cifar10", synthetic=(50000, 10000, 3, 32),
                          device=dev, local_epochs=2)
    else:
        cfg = BenchConfig(name="cpu-digits-cnn", dataset="digits", synthetic=None, device=dev)
    if quick:
        cfg = replace(cfg, name=cfg.name + "-quick", num_clients=3, local_epochs=1, rounds=1,
                      fedhpro_params=fast_test_params("fedhpro"),
                      batched_clients=(3, 6), batched_epochs=1, scale_clients=60, scale_samples_per_client=8,
                      scale_personal_rounds=2,
                      partition_labels=100_000, partition_clients=100, sweep_runs=8, precision_rounds=1,
                      quick_setting={"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
                      subset=(300, 100))
        if gpu:
            cfg = replace(cfg, synthetic=(96, 40, 3, 32), batch_size=16)
    return cfg


# ---------------------------------------------------------------------------------------------- helpers
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: str, threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device, "threads": threads,
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a region above its start (bytes): CUDA allocator, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.how = ""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.how = "cuda max_memory_allocated"
        elif _reset_hwm() and _status_kb("VmHWM") is not None:
            self.base = _status_kb("VmRSS") * 1024
            self.how = "RSS high-water mark (VmHWM reset)"
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.how = "ru_maxrss delta (process peak)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.how.startswith("RSS"):
            self.peak = _status_kb("VmHWM") * 1024 - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        self.peak = max(int(self.peak), 0)


@contextmanager
def _quiet_stderr():
    """Silence C-level stderr (the profiler's start-up log lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_peak(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Peak bytes of live tensors allocated by `fn` above its start, and how it was measured.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the allocation/free events of `torch.profiler`
    (profile_memory=True) summed in time order (falls back to the RSS high-water mark).
    """
    if device.type == "cuda":
        with PeakMemory(device) as mem:
            fn()
        return mem.peak, mem.how
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        return peak, "peak live CPU tensor bytes (torch.profiler memory events)"
    except Exception:  # noqa: BLE001 - a private profiler API; the RSS mark still tells something
        with PeakMemory(device) as mem:
            fn()
        return mem.peak, mem.how


def relative_weight_difference(reference: torch.nn.Module, other: torch.nn.Module) -> float:
    """||w_other - w_ref|| / ||w_ref|| over every floating-point tensor of the two state_dicts (float64)."""
    ref, mine = ([v.double().flatten() for v in m.state_dict().values() if v.is_floating_point()]
                 for m in (reference, other))
    return ((torch.cat(mine) - torch.cat(ref)).norm() / torch.cat(ref).norm()).item()


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def load_data(cfg: BenchConfig):
    from fedhpro.data import ArrayData, load_dataset

    if cfg.synthetic is None:
        data = load_dataset(cfg.dataset)
        if cfg.subset:
            (n, t) = cfg.subset
            data = replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n], test_x=data.test_x[:t],
                           test_y=data.test_y[:t])
        return data
    n_train, n_test, ch, side = cfg.synthetic
    gen = torch.Generator().manual_seed(0)
    return ArrayData(
        train_x=torch.randint(0, 256, (n_train, ch, side, side), dtype=torch.uint8, generator=gen),
        train_y=torch.randint(0, 10, (n_train,), generator=gen),
        test_x=torch.randint(0, 256, (n_test, ch, side, side), dtype=torch.uint8, generator=gen),
        test_y=torch.randint(0, 10, (n_test,), generator=gen), num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


def synthetic_digits(num_samples: int, seed: int = 0):
    """Random 8x8 uint8 images with 10 labels: digits-shaped data of any size (scale measurements)."""
    from fedhpro.data import ArrayData

    gen = torch.Generator().manual_seed(seed)
    return ArrayData(train_x=torch.randint(0, 256, (num_samples, 1, 8, 8), dtype=torch.uint8, generator=gen),
                     train_y=torch.randint(0, 10, (num_samples,), generator=gen),
                     test_x=torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8, generator=gen),
                     test_y=torch.randint(0, 10, (200,), generator=gen), num_classes=10, mean=(0.3,), std=(0.3,))


def trained_samples(n: int, batch_size: int, epochs: int) -> int:
    """Samples `engine.batches` feeds per client (a trailing batch of one sample is dropped)."""
    return epochs * (n - 1 if n > 1 and n % batch_size == 1 else n)


class ClientTimer:
    """Wraps a Client object's train/setup/upload (instance attributes) to time them."""

    def __init__(self, client, device: torch.device):
        self.device = device
        self.train = self.setup = self.upload = 0.0
        for name in ("train", "setup", "upload"):
            setattr(client, name, self._wrap(name, getattr(client, name)))

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            setattr(self, name, getattr(self, name) + time.perf_counter() - t0)
            return out

        return timed

    def reset(self) -> None:
        self.train = self.setup = self.upload = 0.0


# ---------------------------------------------------------------------------------------------- report
class Report:
    def __init__(self, info: dict, cfg: BenchConfig):
        self.info = info
        self.cfg = cfg
        self.tag = f"{info['device']}, {info['threads']} thr, torch {info['torch']}, {info['cpu']}"
        if "gpu" in info:
            self.tag = f"{info['gpu']}, " + self.tag
        self.sections: dict[str, list[dict]] = {}
        self.slugs: dict[str, str] = {}
        self.checks: list[dict] = []
        self.data: dict[str, Any] = {}

    def header(self) -> None:
        i = self.info
        print(f"fedhpro bench [{self.cfg.name}]")
        print(f"machine: {i['platform']}; CPU: {i['cpu']} ({i['cpu_count']} logical cores); python {i['python']}")
        print(f"torch {i['torch']}; device {i['device']}{' (' + i['gpu'] + ')' if 'gpu' in i else ''}; "
              f"torch threads {i['threads']}; 1-min load average at start {i['loadavg_1min']}")
        sys.stdout.flush()

    def section(self, name: str, note: str = "", *, slug: str) -> None:
        self.sections.setdefault(name, [])
        self.slugs[name] = slug
        self._current = name
        print(f"\n== {name} ==" + (f"\n   {note}" if note else ""))

    def figure(self, label: str, value: str, raw: Any = None, note: str = "") -> None:
        row = {"figure": label, "value": value, "raw": raw, "note": note, "context": self.tag}
        self.sections[self._current].append(row)
        print(f"  {label:<58} {value:>22}   [{self.tag}]" + (f"  ({note})" if note else ""))
        sys.stdout.flush()

    def check(self, label: str, passed: bool | None, detail: str) -> None:
        status = "PASS" if passed else ("FAIL" if passed is not None else "N/A")
        self.checks.append({"target": label, "status": status, "detail": detail, "context": self.tag})
        print(f"  {status}: {label} -- {detail}   [{self.tag}]")
        sys.stdout.flush()

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        stem = "bench" if self.cfg.name == "cpu-digits-cnn" else f"bench_{self.cfg.name}"
        for name, rows in self.sections.items():
            path = out / f"{stem}_{self.slugs[name]}.json"
            path.write_text(json.dumps({"machine": self.info, "config": self.cfg.name, "section": name,
                                        "figures": rows, "data": self.data.get(self.slugs[name])}, indent=2, default=str))
            written.append(path)
        path = out / f"{stem}.json"
        path.write_text(json.dumps({"machine": self.info, "config": self.cfg.__dict__, "sections": self.sections,
                                    "checks": self.checks, "data": self.data}, indent=2, default=str))
        written.append(path)
        md = [f"# fedhpro bench: {self.cfg.name}", "",
              f"Machine: {self.info['platform']}; CPU: {self.info['cpu']} ({self.info['cpu_count']} logical cores); "
              f"torch {self.info['torch']}; device {self.info['device']}"
              f"{' (' + self.info['gpu'] + ')' if 'gpu' in self.info else ''}; torch threads {self.info['threads']}; "
              f"1-min load average at start {self.info['loadavg_1min']}.", "",
              f"Every figure below: [{self.tag}].", ""]
        for name, rows in self.sections.items():
            md += [f"## {name}", "", "| figure | value | note |", "| --- | ---: | --- |"]
            md += [f"| {r['figure']} | {r['value']} | {r['note']} |" for r in rows]
            md.append("")
        md += ["## Targets", "", "| status | target | measured |", "| --- | --- | --- |"]
        md += [f"| {c['status']} | {c['target']} | {c['detail']} |" for c in self.checks]
        path = out / f"{stem}.md"
        path.write_text("\n".join(md) + "\n")
        written.append(path)
        return written


# ---------------------------------------------------------------------------------------------- (a)-(e)
def bare_loop(model, optimizer, client_data, loss_fn, *, epochs: int, batch_size: int, augment: str,
              augment_per_sample: bool, gen: torch.Generator, device: torch.device) -> int:
    """The limit: plain PyTorch over pre-normalised tensor-resident client data; returns samples trained."""
    from fedhpro.augment import apply_augment
    from fedhpro.engine import batches

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


def bench_rounds(cfg: BenchConfig, data, report: Report) -> None:
    from fedhpro.engine import Engine
    from fedhpro.methods import METHODS
    from fedhpro.runio import save_checkpoint
    from fedhpro.train import build_context, result_row

    device = torch.device(cfg.device)
    contexts = {m: build_context(cfg.run_config(m), data=data) for m in METHODS_COMPARED}
    engines, timers = {}, {}
    for m, ctx in contexts.items():
        torch.manual_seed(0)
        engines[m] = Engine(ctx, METHODS[m])
        timers[m] = ClientTimer(engines[m].client, device)
    ctx0 = contexts["fedavg"]
    assert all(len(c.clients) == len(ctx0.clients) for c in contexts.values())
    client_data = [(ctx0.prepare(c.x, train=False), c.y) for c in ctx0.clients]  # pre-normalised
    tmp = Path(tempfile.mkdtemp(prefix="fedhpro-bench-"))
    rows: dict[str, list] = {}
    records: dict[str, list[dict]] = {m: [] for m in METHODS_COMPARED}
    bare: dict[str, list[dict]] = {}
    gen = torch.Generator().manual_seed(1)
    epochs, bs = cfg.local_epochs, cfg.batch_size
    aug, per_sample = ctx0.augment, ctx0.cfg.augment_per == "sample"

    def run_round(m: str, r: int) -> dict:
        engine, timer = engines[m], timers[m]
        timer.reset()
        sync(device)
        t0 = time.perf_counter()
        res = engine.run_round(r)
        sync(device)
        wall = time.perf_counter() - t0
        io = checkpoint(m, engine, res, r)
        samples = sum(trained_samples(engine.ctx.clients[c].num_samples, bs, epochs) for c in res.selected)
        return {"round": r, "wall": wall, "io": io, "round_total": wall + io, "local": res.time_local,
                "server": res.time_server, "eval": res.time_eval, "train": timer.train, "setup": timer.setup,
                "upload": timer.upload, "loop": timer.train - timer.setup - timer.upload, "samples": samples,
                "test_acc": res.test_acc}

    def checkpoint(m: str, engine, res, r: int) -> float:
        """What `fedhpro.train` does after a round (metrics row, checkpoint) -> seconds of checkpoint I/O."""
        rows.setdefault(m, []).append(result_row(engine.cfg, res, "running"))
        (tmp / m).mkdir(exist_ok=True)
        t0 = time.perf_counter()
        save_checkpoint(tmp / m, {"round": r, "config_hash": engine.cfg.config_hash(), "rows": rows[m],
                                  "engine": engine.state_dict()})
        return time.perf_counter() - t0

    def run_bare(loss_fn, model, optimizer, n_epochs: int = epochs) -> dict:
        sync(device)
        t0 = time.perf_counter()
        n = bare_loop(model, optimizer, client_data, loss_fn, epochs=n_epochs, batch_size=bs, augment=aug,
                      augment_per_sample=per_sample, gen=gen, device=device)
        sync(device)
        return {"seconds": time.perf_counter() - t0, "samples": n}

    def optimizer_for(model):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    # warm-up rounds (not counted), then the bare loops' models and method losses from the warmed-up payloads
    for r in range(1, cfg.warmup + 1):
        for m in METHODS_COMPARED:
            run_round(m, r)
    losses = {"plain": (plain_loss, ctx0.make_model())}
    for m in ("fedhpro", "fedproto"):
        engine = engines[m]
        client = METHODS[m].Client(engine.ctx)
        model = engine.ctx.make_model()
        model.load_state_dict(engine.server.model.state_dict())
        client.setup(engine.ctx.clients[0], model, engine.server.broadcast(cfg.warmup + 1), {},
                     torch.Generator().manual_seed(0))
        losses[m] = (client.loss, model)
    optimizers = {k: optimizer_for(model) for k, (_, model) in losses.items()}
    for k, (fn, model) in losses.items():  # warm-up of the bare loops too
        run_bare(fn, model, optimizers[k])
    pairs = (("plain", "fedavg"), ("fedhpro", "fedhpro"), ("fedproto", "fedproto"))  # (bare loop, engine)
    for rep in range(cfg.rounds):
        r = cfg.warmup + 1 + rep
        # ABBA: every engine round runs next to its bare loop, and which goes first (and the order of the
        # pairs) alternates between repeats, so drifts in the machine's load cancel out of the ratios
        for key, m in (pairs if rep % 2 == 0 else pairs[::-1]):
            fn, model = losses[key]
            jobs = [lambda: bare.setdefault(key, []).append(run_bare(fn, model, optimizers[key])),
                    lambda: records[m].append(run_round(m, r))]
            for job in (jobs if rep % 2 == 0 else jobs[::-1]):
                job()

    # ---- (e) memory: separate passes (the profiler slows what it watches), one local epoch per client:
    # a step's memory does not depend on how many steps came before it
    memory: dict[str, tuple[int, str]] = {}
    fn, model = losses["plain"]
    memory["bare loop (CE)"] = tensor_peak(lambda: run_bare(fn, model, optimizers["plain"], 1), device)
    for m in METHODS_COMPARED:
        ctx = build_context(cfg.run_config(m, local_epochs=1), data=data)
        torch.manual_seed(0)
        engine = Engine(ctx, METHODS[m])
        checkpoint(m + "-memory", engine, engine.run_round(1), 1)
        memory[f"{m} round + checkpoint"] = tensor_peak(
            lambda: checkpoint(m + "-memory", engine, engine.run_round(2), 2), device)
    shutil.rmtree(tmp, ignore_errors=True)

    # ---- (a) + (b)
    med = statistics.median
    report.section("(a, b) local training throughput",
                   f"{len(ctx0.clients)} clients, {epochs} local epochs, batch {bs}, SGD lr {cfg.lr} momentum "
                   f"{cfg.momentum}, model {ctx0.model_names[0]}, augment {aug}; medians of {cfg.rounds} repeats "
                   "after a warm-up, each engine round run next to its bare loop (ABBA order); ratio = median of "
                   "the per-repeat ratios", slug="throughput")
    limit = {k: med(b["samples"] / b["seconds"] for b in v) for k, v in bare.items()}
    report.figure("limit: bare PyTorch loop, CE (samples/s)", f"{limit['plain']:,.0f}", limit["plain"],
                  f"best {max(b['samples'] / b['seconds'] for b in bare['plain']):,.0f}")
    for m in ("fedhpro", "fedproto"):
        report.figure(f"limit: bare loop with {m}'s loss (samples/s)", f"{limit[m]:,.0f}", limit[m])
    report.data["throughput"] = {"limit": limit, "bare": bare, "records": records}
    ratios = {}
    for key, m in pairs:
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
    for key, m in pairs:
        spread = [(x["samples"] / x["loop"]) / (b["samples"] / b["seconds"]) for x, b in zip(records[m], bare[key])]
        report.check(f"{m} local training >= 90% of bare-loop throughput", ratios[m] >= 0.9,
                     f"{ratios[m]:.1%} (repeats {min(spread):.1%}..{max(spread):.1%})")

    # ---- (c) + (d)
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

    # ---- (e)
    report.section("(e) peak memory", "one local epoch per client (a step's memory does not grow with the number "
                   "of steps); measured separately from the timings; " + memory["bare loop (CE)"][1], slug="memory")
    for k, (peak, how) in memory.items():
        report.figure(f"{k}: peak above start", mib(peak), peak)
    report.data["memory"] = {k: v[0] for k, v in memory.items()}

    # ---- the pipeline's quick setting (config/config.yaml defaults): the same comparison, informational
    qs = cfg.quick_setting
    report.section("(c') FedHPro vs FedAvg at the pipeline's quick setting",
                   f"local_epochs {qs['local_epochs']}, batch {qs['batch_size']}, lr {qs['lr']}, momentum "
                   f"{qs['momentum']} (config/config.yaml defaults); FedHPro's per-round server work and client "
                   "gradient pass are fixed costs, so their share grows as local work shrinks", slug="quick_setting")
    times: dict[str, list[float]] = {"fedavg": [], "fedhpro": []}
    quick_engines = {}
    for m in times:
        ctx = build_context(cfg.run_config(m, **qs), data=data)
        torch.manual_seed(0)
        quick_engines[m] = Engine(ctx, METHODS[m])
        quick_engines[m].run_round(1)
    for rep, r in enumerate(range(2, 2 + max(cfg.rounds, 2))):
        for m in (("fedavg", "fedhpro") if rep % 2 == 0 else ("fedhpro", "fedavg")):
            sync(device)
            t0 = time.perf_counter()
            quick_engines[m].run_round(r)
            sync(device)
            times[m].append(time.perf_counter() - t0)
    q = statistics.median(h / a for h, a in zip(times["fedhpro"], times["fedavg"]))
    report.figure("fedavg round / fedhpro round (median, s)",
                  f"{statistics.median(times['fedavg']):.3f} / {statistics.median(times['fedhpro']):.3f}", times)
    report.figure("fedhpro round / fedavg round", f"{q:.3f}", q, "informational: no target at this setting")


# ---------------------------------------------------------------------------------------------- batched
def bench_batched(cfg: BenchConfig, data, report: Report) -> None:
    from fedhpro.batched import MIN_FILL
    from fedhpro.engine import Engine
    from fedhpro.methods import METHODS
    from fedhpro.train import build_context

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
            ctx = build_context(run_cfg, data=data)
            torch.manual_seed(0)
            engines[mode] = Engine(ctx, METHODS["fedavg"])
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


# ---------------------------------------------------------------------------------------------- precision
PRECISION_VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True},
                      "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
                      "fp16": {"precision": "fp16"}}


def bench_precision(cfg: BenchConfig, data, report: Report) -> None:
    """`precision` (autocast of local training and evaluation; fp16 with loss scaling) and `channels_last`,
    side by side with fp32: FedAvg and FedHPro, one short training per setting from the same seed, the settings'
    rounds interleaved (ABBA order per round). Throughput = the local-training loop (`Client.train` minus
    setup/upload, as in (a, b)) over the rounds after the first (the warm-up; all rounds when there is one);
    accuracy = the global model's test accuracy after the last round. fp16 runs on every device (torch's CPU
    autocast supports float16 and `GradScaler("cpu")` works)."""
    from fedhpro.config import ConfigError
    from fedhpro.engine import Engine, RoundResult, autocast_context
    from fedhpro.methods import METHODS
    from fedhpro.train import build_context

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
                ctx = build_context(run_cfg, data=data)
            except ConfigError as err:  # e.g. bf16 on a GPU without it
                refused[name] = str(err)
                continue
            torch.manual_seed(0)
            engines[name] = Engine(ctx, METHODS[m])
            timers[name] = ClientTimer(engines[name].client, device)
            warm_up(ctx)
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


# ---------------------------------------------------------------------------------------------- scale
def bench_scale(cfg: BenchConfig, report: Report) -> None:
    from fedhpro.engine import Engine, RoundResult, tensor_bytes
    from fedhpro.methods import METHODS
    from fedhpro.partition import partition_labels
    from fedhpro.train import build_context

    device = torch.device(cfg.device)
    n_big, frac, per = cfg.scale_clients, cfg.scale_participation, cfg.scale_samples_per_client
    k = max(1, int(round(n_big * frac)))
    report.section("scale", f"synthetic 8x8 digits-shaped data, {per} samples per client, small CNN, "
                            f"1 local epoch, batch {cfg.batch_size}, device {cfg.device}", slug="scale")
    out: dict[str, Any] = {}

    def fedavg_round(num_clients: int) -> dict:
        data = synthetic_digits(num_clients * per)
        run_cfg = cfg.run_config("fedavg", dataset="digits", num_clients=num_clients, clients_per_round=k,
                                 partition="iid", alpha=None, local_epochs=1, eval_every=1000, model="cnn")
        ctx = build_context(run_cfg, data=data)
        torch.manual_seed(0)
        engine = Engine(ctx, METHODS["fedavg"])
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
    out["fedavg_global"] = [small, big]
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

    # personalized client state (FedProto, personalized): CPU tensors, in memory or on disk (client_store)
    data = synthetic_digits(n_big * per, seed=1)
    rounds = cfg.scale_personal_rounds
    stores: dict[str, dict] = {}
    for store in ("memory", "disk"):
        run_cfg = cfg.run_config("fedproto", dataset="digits", num_clients=n_big, clients_per_round=k,
                                 partition="iid", alpha=None, local_epochs=1, eval_every=1000, model="cnn",
                                 eval_mode="personalized", client_store=store)
        ctx = build_context(run_cfg, data=data)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(ctx, METHODS["fedproto"], client_dir=Path(tmp) / "client_states")
            times = []
            for r in range(1, rounds + 1):
                t0 = time.perf_counter()
                engine.run_round(r)
                times.append(time.perf_counter() - t0)
            states = engine.client_states
            t0 = time.perf_counter()
            ckpt = io.BytesIO()
            torch.save(engine.state_dict(), ckpt)
            states.commit()
            ckpt_s = time.perf_counter() - t0
            held = states.nbytes_in_memory()
            on_cpu = all(v.device.type == "cpu" for v in states[next(iter(states.keys()))]["model"].values())
            t0 = time.perf_counter()
            engine.evaluate_into(RoundResult(round=rounds, selected=[], train_loss=0.0))
            eval_s = time.perf_counter() - t0
            stores[store] = {"clients_with_state": len(states), "held_bytes": held, "on_cpu": on_cpu,
                             "disk_bytes": states.nbytes_on_disk() if store == "disk" else 0,
                             "checkpoint_bytes": len(ckpt.getvalue()), "checkpoint_s": ckpt_s,
                             "round_s_median": float(np.median(times)), "eval_all_s": eval_s}
    out["personalized"] = stores
    model_bytes = tensor_bytes(ctx.make_model().state_dict())
    for store, row in stores.items():
        label = f"fedproto personalized, {n_big} clients, {k}/round, client_store {store}"
        report.figure(f"{label}: clients with a state after {rounds} rounds", f"{row['clients_with_state']}",
                      row["clients_with_state"], f"model state_dict {model_bytes / 1024:.0f} KiB per client")
        report.figure(f"  client state held in memory between rounds", mib(row["held_bytes"]), row["held_bytes"],
                      f"on CPU: {row['on_cpu']}" + (f"; on disk {mib(row['disk_bytes'])}" if store == "disk" else ""))
        report.figure(f"  checkpoint size / time", f"{mib(row['checkpoint_bytes'])} / {row['checkpoint_s']:.2f} s",
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

    # partitioning
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
    out["partition_s"] = timings
    report.check(f"partitioners: {cfg.partition_labels:,} labels x {cfg.partition_clients} clients in seconds",
                 max(timings.values()) < 10.0, f"slowest {max(timings, key=timings.get)} "
                                               f"{max(timings.values()):.2f} s (target < 10 s)")

    # snakemake -n
    out["snakemake"] = snakemake_plan(cfg.sweep_runs, report)
    report.data["scale"] = out


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
    import yaml

    from fedhpro.sweep import expand_sweep

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


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from fedhpro.cliutil import ArgumentParser, positive_int

    p = ArgumentParser(prog="fedhpro bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny config that runs every section in seconds")
    p.add_argument("--gpu", action="store_true", help="ResNet-10 on CIFAR-10-shaped data (CUDA when available)")
    p.add_argument("--device", default=None, help="override the device (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1, as the pipeline's jobs)")
    p.add_argument("--rounds", type=int, default=None, help="measured repeats after the warm-up (default 4; quick 1)")
    p.add_argument("--out", default=None, help="write <out>/bench*.json and <out>/bench*.md (e.g. results/bench)")
    p.add_argument("--skip", action="append", default=[], choices=("rounds", "batched", "precision", "scale"),
                   help="leave a section out (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = make_config(args.quick, args.gpu, args.device)
    if args.rounds is not None:
        cfg = replace(cfg, rounds=max(1, args.rounds))
    info = machine_info(cfg.device, torch.get_num_threads())
    report = Report(info, cfg)
    report.header()
    if args.gpu and not cfg.device.startswith("cuda"):
        print("note: --gpu without a CUDA device: running the GPU config on the CPU")
    t0 = time.perf_counter()
    data = load_data(cfg)
    if "rounds" not in args.skip:
        bench_rounds(cfg, data, report)
    if "batched" not in args.skip:
        bench_batched(cfg, data, report)
    if "precision" not in args.skip:
        bench_precision(cfg, data, report)
    if "scale" not in args.skip:
        bench_scale(cfg, report)
    total = time.perf_counter() - t0
    print(f"\nbenchmark wall time {total:.1f} s; 1-min load average at end {os.getloadavg()[0]:.2f}")
    print("targets: " + ", ".join(f"{c['status']}" for c in report.checks))
    if args.out:
        for path in report.write(Path(args.out)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
