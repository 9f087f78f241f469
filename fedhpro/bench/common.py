"""What every benchmark section shares: the bench configs, the data, engines started as `fedhpro.train` starts
them, timers of the client hooks and peak-memory meters."""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from fedhpro.config import RunConfig, from_dict
from fedhpro.data import ArrayData, load_dataset
from fedhpro.engine import Engine
from fedhpro.local import batch_sizes
from fedhpro.methods import fast_test_params
from fedhpro.plan import cpu_model
from fedhpro.train import build_context, start_engine

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
    sharing_runs: tuple[int, ...] = (1, 2, 4)  # `sharing` section: runs training at once on the device
    sharing_rounds: int = 2
    # torch.compile mode of the engine runs and bare loops of sections paper (beside eager) and rounds (`--compile`)
    compile: str = "none"
    # `paper` section (--gpu only): config/paper.yaml's CIFAR-10 FedHPro cell on CIFAR-10-sized random images
    paper_train_per_class: int = 5000
    paper_test_per_class: int = 1000
    paper_local_epochs: int = 10
    paper_rounds: int = 2  # measured rounds after the warm-up

    def run_config(self, method: str, **changes: Any) -> RunConfig:
        raw = {"dataset": self.dataset, "method": method, "num_clients": self.num_clients, "partition": "dirichlet",
               "alpha": 0.5, "local_epochs": self.local_epochs, "batch_size": self.batch_size, "lr": self.lr,
               "momentum": self.momentum, "device": self.device, "seed": 0, "partition_seed": 0,
               "rounds": 1000, "eval_every": 1, "checkpoint_every": 1}
        if method == "fedhpro":
            raw["method_params"] = dict(self.fedhpro_params)
        raw.update(changes)
        return from_dict(raw)


def make_config(quick: bool, gpu: bool, device: str | None) -> BenchConfig:
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
                      sharing_runs=(1, 2), sharing_rounds=1,
                      paper_train_per_class=100, paper_test_per_class=20, paper_local_epochs=1, paper_rounds=1,
                      quick_setting={"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
                      subset=(300, 100))
        if gpu:
            cfg = replace(cfg, synthetic=(96, 40, 3, 32), batch_size=16)
    return cfg


# ---------------------------------------------------------------------------------------------- helpers
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


def load_data(cfg: BenchConfig) -> ArrayData:
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


def synthetic_digits(num_samples: int, seed: int = 0) -> ArrayData:
    """Random 8x8 uint8 images with 10 labels: digits-shaped data of any size (scale measurements)."""
    gen = torch.Generator().manual_seed(seed)
    return ArrayData(train_x=torch.randint(0, 256, (num_samples, 1, 8, 8), dtype=torch.uint8, generator=gen),
                     train_y=torch.randint(0, 10, (num_samples,), generator=gen),
                     test_x=torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8, generator=gen),
                     test_y=torch.randint(0, 10, (200,), generator=gen), num_classes=10, mean=(0.3,), std=(0.3,))


def trained_samples(n: int, batch_size: int, epochs: int) -> int:
    """Samples `engine.batches` feeds per client in `epochs` epochs (`fedhpro.local.batch_sizes`)."""
    return epochs * sum(batch_sizes(n, batch_size))


def new_engine(run_cfg: RunConfig, data: ArrayData, out_dir: Path | None = None) -> Engine:
    """A fresh engine for `run_cfg` on `data`, started exactly as `fedhpro.train` starts a run from round 1
    (`start_engine`: torch seeded with the run's seed, then the engine built and its client states reset)."""
    return start_engine(build_context(run_cfg, data=data), out_dir)[0]


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


