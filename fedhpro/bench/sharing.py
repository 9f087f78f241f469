"""Section `sharing`: N runs training at the same time on one device, against one run alone.

Each run is its own process (spawned, as `slurm.runs_per_gpu` runs them: own CUDA context, RNG and torch
threads), with the bench's FedAvg config and seed = its index. After one warm-up round every process waits at
a barrier, then trains `sharing_rounds` rounds; throughput = runs x rounds / the slowest run's seconds.
Run 0 of every N has the config and seed of the run alone, so its final weights must equal the alone run's
(compared by a hash of the state dict; on a GPU cuDNN's kernel choice may break this, and the report says
whether it held).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from fedhpro.bench.common import BenchConfig, load_data, new_engine, sync
from fedhpro.bench.report import Report
from fedhpro.data import ArrayData


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _one_run(cfg: BenchConfig, seed: int, barrier, threads: int) -> dict:
    torch.set_num_threads(threads)
    engine = new_engine(cfg.run_config("fedavg", seed=seed, eval_every=1000), load_data(cfg))
    device = torch.device(cfg.device)
    engine.run_round(1)  # warm-up (allocator, cuDNN autotuning), not timed
    barrier.wait()
    sync(device)
    t0 = time.perf_counter()
    losses = [engine.run_round(r).train_loss for r in range(2, 2 + cfg.sharing_rounds)]
    sync(device)
    return {"seconds": time.perf_counter() - t0, "train_loss": losses, "digest": _state_digest(engine.server.model)}


def run_side_by_side(cfg: BenchConfig, n: int, threads: int) -> list[dict]:
    """`n` runs (seeds 0..n-1) started together in `n` spawned processes; each one's timing and result."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        barrier = manager.Barrier(n)
        return list(pool.map(_one_run, [cfg] * n, range(n), [barrier] * n, [threads] * n))


def bench_sharing(cfg: BenchConfig, data: ArrayData, report: Report) -> None:
    threads = 1
    report.section("runs sharing the device",
                   f"FedAvg, {cfg.local_epochs} local epochs, batch {cfg.batch_size}, {cfg.num_clients} clients; "
                   f"N runs (seeds 0..N-1, one spawned process each, {threads} torch thread each) started together "
                   f"after a warm-up round; {cfg.sharing_rounds} rounds each; throughput = N x rounds / slowest run",
                   slug="sharing")
    out = {}
    alone = None
    for n in cfg.sharing_runs:
        results = run_side_by_side(cfg, n, threads)
        wall = max(r["seconds"] for r in results)
        throughput = n * cfg.sharing_rounds / wall
        if alone is None:
            alone = {"throughput": throughput, **results[0]}
        same = results[0]["digest"] == alone["digest"] and results[0]["train_loss"] == alone["train_loss"]
        ratio = throughput / alone["throughput"]
        out[n] = {"seconds": [r["seconds"] for r in results], "rounds_per_s": throughput, "ratio": ratio,
                  "run0_identical_to_alone": same}
        report.figure(f"{n} run(s): rounds/s, all runs together", f"{throughput:.3f}", throughput,
                      f"slowest {wall:.1f} s, median {statistics.median(r['seconds'] for r in results):.1f} s")
        if n > 1:
            report.figure(f"{n} runs: throughput / one run alone", f"{ratio:.2f}x", ratio)
            report.figure(f"{n} runs: run 0 identical to the run alone", "yes" if same else "NO", same,
                          "final weights and every round's train loss")
    report.data["sharing"] = out
    if 4 in out:
        report.check("four runs sharing the device: >= 2.5x one run's throughput", out[4]["ratio"] >= 2.5,
                     f"{out[4]['ratio']:.2f}x")
    for n, v in out.items():
        if n > 1:
            report.check(f"{n} runs sharing: each run's numbers identical to running alone",
                         v["run0_identical_to_alone"], "run 0 vs the run alone")
