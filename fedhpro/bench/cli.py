"""`python -m fedhpro.bench` and `fedhpro bench`: options, the sections in order, the report files."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedhpro.bench.batched import bench_batched
from fedhpro.bench.common import load_data, machine_info, make_config
from fedhpro.bench.paper import bench_paper
from fedhpro.bench.precision import bench_precision
from fedhpro.bench.report import Report
from fedhpro.bench.rounds import bench_rounds
from fedhpro.bench.scale import bench_scale
from fedhpro.bench.sharing import bench_sharing
from fedhpro.cliutil import ArgumentParser, check_out_dir, positive_int
from fedhpro.config import COMPILE_MODES
from fedhpro.local import check_compile
from fedhpro.plan import read_times, write_times

DESCRIPTION = "`fedhpro bench`: how fast the engine trains, side by side with a bare PyTorch loop, in one process."
# In the order they run: `paper` first (the GPU targets of the paper config), so that a benchmark cut short (a
# device window's time limit) has already written it; every section's files are written as soon as it ends.
SECTIONS = ("paper", "rounds", "batched", "precision", "sharing", "scale")
GPU_ONLY = ("paper",)  # the paper config is CIFAR-10 + ResNet-10: left out of the default (CPU digits) bench


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fedhpro bench", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny config that runs every section in seconds")
    p.add_argument("--gpu", action="store_true", help="ResNet-10 on CIFAR-10-shaped data (CUDA when available)")
    p.add_argument("--device", default=None, help="override the device (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1, as the pipeline's jobs)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="measured repeats after the warm-up (default 4; quick 1)")
    p.add_argument("--out", default=None, help="write <out>/bench*.json and <out>/bench*.md (e.g. results/bench)")
    p.add_argument("--times", default=None, metavar="CSV",
                   help="also add the measured seconds per round (sections rounds and paper) to this round-times "
                        "table, which `fedhpro plan` estimates sweeps from (e.g. config/round-times.csv)")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS,
                   help="leave a section out (repeatable)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile mode (run config key compile) of section rounds' engine runs and bare loops, "
                        "and of a second run beside the eager one in section paper (default none: eager only)")
    p.add_argument("--official", default=None, metavar="CHECKOUT",
                   help="section paper (--gpu): also time the official FedHPro code, a checkout of mala-lab/FedHPro "
                        "(never copied into this repository), on the same files, partition and device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    if args.official is not None:
        if not args.gpu or "paper" in args.skip:
            raise ValueError("--official is used by section paper, which runs with --gpu (and without --skip paper)")
        from fedhpro.parity import check_official

        check_official(Path(args.official))  # a wrong checkout is refused before the benchmark, not after
    if args.out is not None:  # `--out ''` is refused, not taken for "no --out"
        check_out_dir(args.out, create=False)  # before the benchmark runs, not after
    if args.times:
        if "rounds" in args.skip and ("paper" in args.skip or not args.gpu):
            raise ValueError("--times needs section rounds or paper (it records their round times)")
    times_before = []  # the table's rows before this benchmark; its own rows are added as each section ends
    if args.times and Path(args.times).exists():
        times_before = read_times(args.times)  # a malformed table is refused before the benchmark, not after
    torch.set_num_threads(args.threads)
    cfg = make_config(args.quick, args.gpu, args.device)
    if args.rounds is not None:
        cfg = replace(cfg, rounds=args.rounds)
    check_compile(args.compile, torch.device(cfg.device))  # reduce-overhead (CUDA graphs) needs CUDA
    cfg = replace(cfg, compile=args.compile)
    info = machine_info(cfg.device, torch.get_num_threads())
    report = Report(info, cfg)
    report.header()
    if args.gpu and not cfg.device.startswith("cuda"):
        print("note: --gpu without a CUDA device: running the GPU config on the CPU")
    t0 = time.perf_counter()
    data = load_data(cfg)
    official = Path(args.official) if args.official else None
    sections = {"paper": lambda cfg, data, report: bench_paper(cfg, report, official),
                "rounds": bench_rounds, "batched": bench_batched, "precision": bench_precision,
                "sharing": bench_sharing,
                "scale": lambda cfg, data, report: bench_scale(cfg, report)}
    chosen = [name for name in SECTIONS if name not in args.skip and (args.gpu or name not in GPU_ONLY)]
    measured = []
    for done, name in enumerate(chosen, 1):
        result = sections[name](cfg, data, report)
        if name == "rounds":
            measured = measured + result
        elif name == "paper":
            measured = measured + result["time_rows"]
        if args.out:  # after every section: a benchmark cut short keeps what it measured, marked incomplete
            report.write(Path(args.out), pending=chosen[done:])
        if args.times and measured and name in ("rounds", "paper"):  # likewise the round-times rows
            write_times(args.times, times_before + measured)
        if name == "paper" and result["interrupted"]:  # a time limit hit it: what it measured is written, stop here
            raise KeyboardInterrupt
    total = time.perf_counter() - t0
    print(f"\nbenchmark wall time {total:.1f} s; 1-min load average at end {os.getloadavg()[0]:.2f}")
    print("targets: " + ", ".join(f"{c['status']}" for c in report.checks))
    if args.out:
        for path in report.write(Path(args.out), pending=[]):
            print(f"wrote {path}")
    if args.times and measured:
        print(f"wrote {len(measured)} round-time row(s) to {args.times}")
    return 0
