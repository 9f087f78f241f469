"""Parity harness: the official FedHPro code (mala-lab/FedHPro) beside ours, on the same files.

    scripts/parity-official.sh OFFICIAL_CHECKOUT [--rounds 8] [--local-epochs 1] [--seeds 3]
                               [--device cpu|cuda] [--cifar PATH] [--out DIR]

The user brings a checkout of the official code; nothing of it is copied into this repository.
Steps, all in one process tree and measured in the same run:

1. **Data.** The official `main_run.py` reads torchvision's CIFAR-10 python archive from
   `./data/CIFAR10/` (relative to its working directory). From the user's copy (default: the JPEG
   folders `cifar10-jpeg.tar` of the shared data, or any source our `cifar10` loader reads) we write
   `cifar-10-batches-py/` as Python-3 pickles (str keys), which both codes read: torchvision with
   `encoding="latin1"`, ours with its restricted unpickler. Their checksums differ from upstream, so
   the wrapper process that runs the official code gives torchvision the md5 of the files we wrote in
   place of upstream's (its class attributes; the official files are not edited). A *parity pack* (`pack_cifar`) keeps only the
   training images the given seeds' long-tail selection uses (the rest are zeros, which no code reads
   beyond their labels; `--pack FILE.parity.tar`), small enough to travel to a GPU machine.
2. **Runs.** For every seed s in 25, 26, ...: the official code with `--seed s` (which seeds its
   partition, its client order `RandomState(s).choice` and torch; its DSA augmentation reseeds from the
   clock, so repeated official runs differ: compare spreads, not single runs), and ours with
   `partition_seed = seed = s`, `aggregation: last_client` (the default, what the official code
   computes) and `aggregation: fedavg`. Same protocol: CIFAR-10, NID1 (creff) alpha 0.5, rho 100,
   10 clients, full participation, ResNet-10, SGD lr 0.1, batch 64, one crop+flip per batch, FedHPro's
   official defaults. Seed 25 gives the split of the official log `c10_n0.5_if100.log`.
3. **Identity check.** The official code prints each client's class counts; the harness compares them
   with our partition's and stops on any difference (so the codes are never compared on two splits).
4. **Table.** Per round: test accuracy (%) mean ± sd over seeds of the official code, ours with
   `last_client` and ours with `fedavg`; and seconds per round of each (official: time between its
   per-round accuracy lines; ours: the run's time_local + time_server + time_eval + time_io).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhpro.config import ConfigError
from fedhpro.layout import shared_data

SHARED_CIFAR = shared_data() / "cifar10-jpeg.tar"  # the shared real data, as the tests find it
FIRST_SEED = 25  # the shipped log's seed
PROTOCOL = {"alpha": 0.5, "imbalance_ratio": 100.0, "num_clients": 10}
AGGREGATIONS = ("last_client", "fedavg")
PACK_FORMAT = "fedhpro-parity-pack-1"

# The official code's training entry, run as __main__ in a child process whose working directory holds
# ./data/CIFAR10/cifar-10-batches-py. torchvision checks upstream's md5 of each file; the wrapper puts the
# md5 of the files we wrote in its place (torchvision's class attributes, not the official files), so the
# files are still verified.
OFFICIAL_WRAPPER = """
import json, runpy, sys
from torchvision.datasets import CIFAR10
md5 = json.loads(sys.argv[2])
CIFAR10.train_list = [[name, md5[name]] for name, _ in CIFAR10.train_list]
CIFAR10.test_list = [[name, md5[name]] for name, _ in CIFAR10.test_list]
CIFAR10.meta = {**CIFAR10.meta, "md5": md5[CIFAR10.meta["filename"]]}
official = sys.argv[1]
sys.path.insert(0, official)
sys.argv = [official + "/main_run.py"] + sys.argv[3:]
runpy.run_path(official + "/main_run.py", run_name="__main__")
"""


class ParityError(RuntimeError):
    """The harness cannot go on (bad checkout, failed run, different partitions)."""


# ---------------------------------------------------------------------------------------------- data
@dataclass
class CifarArrays:
    train_x: np.ndarray  # uint8 N x 3 x 32 x 32
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    names: tuple[str, ...]


def read_cifar(source: Path) -> CifarArrays:
    """CIFAR-10 arrays from a parity pack (`*.parity.tar`) or anything our `cifar10` loader reads."""
    if source.name.endswith(".parity.tar"):
        return read_pack(source)
    from fedhpro.data.cifar import load_cifar

    data = load_cifar(source.parent, "cifar10", path=str(source), cache=False)
    return CifarArrays(data.train_x.numpy(), data.train_y.numpy(), data.test_x.numpy(), data.test_y.numpy(),
                       tuple(data.class_names))


def used_training_indices(train_y: np.ndarray, seeds: list[int]) -> np.ndarray:
    """Training samples that any of `seeds`' NID1 partitions gives to a client (sorted)."""
    from fedhpro.partition import partition_labels

    used = set()
    for seed in seeds:
        for part in partition_labels(train_y, scheme="creff", seed=seed, **PROTOCOL):
            used.update(int(i) for i in part)
    return np.array(sorted(used), dtype=np.int64)


def _folder_items(names: list[str]) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """The image-folder layout as our reader sees it: prefix and, per split, (class, file) in reading order."""
    from fedhpro.data.imagefolder import find_layout

    prefix, test_split = find_layout(dict.fromkeys(names))
    if test_split != "test":
        raise ParityError(f"parity packs need train/ and test/ folders, found {test_split}/")
    samples: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for rel in names:
        parts = rel[len(prefix):].split("/") if rel.startswith(prefix) else []
        if len(parts) == 3 and parts[0] in samples:
            samples[parts[0]].append((parts[1], parts[2]))
    index = {c: i for i, c in enumerate(sorted({c for c, _ in samples["train"]}))}
    return prefix, {k: sorted(v, key=lambda s: (index[s[0]], s[1])) for k, v in samples.items()}


def pack_cifar(source: Path, seeds: list[int], out: Path) -> Path:
    """A parity pack: a tar of the original JPEG files of the test set and of the training images that
    `seeds`' partitions use, with an index of every training image (the rest are read as zeros, which no
    code reads beyond their labels). Small enough to travel to a GPU machine; checked on the way: the
    pack reads back to our loader's arrays wherever an image is kept."""
    import io
    import tarfile

    if not tarfile.is_tarfile(source):
        raise ParityError(f"--pack needs the image-folder tar (e.g. cifar10-jpeg.tar), not {source}")
    with tarfile.open(source) as tf:
        blobs = {(m.name[2:] if m.name.startswith("./") else m.name): tf.extractfile(m).read()
                 for m in tf if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))}
    prefix, items = _folder_items(list(blobs))
    arrays = read_cifar(source)
    labels = {c: i for i, c in enumerate(arrays.names)}
    if [labels[c] for c, _ in items["train"]] != arrays.train_y.tolist():
        raise ParityError(f"{source}: the pack's reading order differs from our loader's")
    used = set(used_training_indices(arrays.train_y, seeds).tolist())
    index = {"format": PACK_FORMAT, "seeds": seeds, "classes": list(arrays.names),
             "train": [[c, f, i in used] for i, (c, f) in enumerate(items["train"])],
             "test": [[c, f] for c, f in items["test"]]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("index.json", json.dumps(index).encode())
        for split in ("train", "test"):
            for n, (c, f) in enumerate(items[split]):
                if split == "test" or n in used:
                    add(f"{split}/{c}/{f}", blobs[f"{prefix}{split}/{c}/{f}"])
    back = read_pack(out)
    keep = np.array(sorted(used))
    if not (np.array_equal(back.train_x[keep], arrays.train_x[keep]) and np.array_equal(back.test_x, arrays.test_x)
            and np.array_equal(back.train_y, arrays.train_y)):
        raise ParityError(f"{out} does not read back to the arrays of {source}")
    return out


def read_pack(pack: Path) -> CifarArrays:
    import tarfile

    from fedhpro.data.imagefolder import decode_image

    with tarfile.open(pack) as tf:
        blobs = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    index = json.loads(blobs.get("index.json", b"{}"))
    if index.get("format") != PACK_FORMAT:
        raise ParityError(f"{pack} is not a parity pack ({PACK_FORMAT})")
    labels = {c: i for i, c in enumerate(index["classes"])}
    train_x = np.zeros((len(index["train"]), 3, 32, 32), dtype=np.uint8)
    for n, (c, f, kept) in enumerate(index["train"]):
        if kept:
            train_x[n] = decode_image(blobs[f"train/{c}/{f}"], 32, 3, f"{pack}:train/{c}/{f}")
    test_x = np.stack([decode_image(blobs[f"test/{c}/{f}"], 32, 3, f"{pack}:test/{c}/{f}") for c, f in index["test"]])
    return CifarArrays(train_x, np.array([labels[c] for c, _, _ in index["train"]], dtype=np.int64), test_x,
                       np.array([labels[c] for c, _ in index["test"]], dtype=np.int64), tuple(index["classes"]))


def write_cifar_python(arrays: CifarArrays, out_dir: Path) -> Path:
    """`cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) as Python-3 pickles (str keys)."""
    folder = out_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(arrays.train_y)
    bounds = np.linspace(0, n, 6).astype(int)
    for i in range(5):
        lo, hi = bounds[i], bounds[i + 1]
        batch = {"batch_label": f"training batch {i + 1} of 5", "labels": [int(v) for v in arrays.train_y[lo:hi]],
                 "data": arrays.train_x[lo:hi].reshape(hi - lo, 3072), "filenames": [f"{j}.png" for j in range(lo, hi)]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in arrays.test_y],
            "data": arrays.test_x.reshape(len(arrays.test_y), 3072),
            "filenames": [f"t{j}.png" for j in range(len(arrays.test_y))]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {"label_names": list(arrays.names), "num_cases_per_batch": int(bounds[1]), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunTrace:
    accuracy: list[float]  # percent, per round
    seconds: list[float]  # per round
    client_counts: list[list[int]] = field(default_factory=list)


# '\t ACC: [...]' after each round; tqdm's progress bar (carriage returns, no newline) may precede it on a line
ACC_LINE = re.compile(r"(?<![A-Z_])ACC:\s*\[([^\]]*)\]")
COUNT_LINE = re.compile(r"^(\d+): \[([\d, ]+)\]\s*$")


def check_official(checkout: Path) -> None:
    for name in ("main_run.py", "options.py", "utils/sample_dirichlet.py", "backbone/ResNet10.py"):
        if not (checkout / name).is_file():
            raise ParityError(f"{checkout} is not a checkout of the official FedHPro code (no {name})")


def run_official(checkout: Path, work: Path, seed: int, rounds: int, local_epochs: int, device: str,
                 log=print, trace: RunTrace | None = None, on_round=None,
                 expected_counts: list[list[int]] | None = None, threads: int | None = None) -> RunTrace:
    """The official `main_run.py` (its README command, at the reduced budget) with `--seed seed`.

    `threads` limits its torch CPU threads (OMP_NUM_THREADS / MKL_NUM_THREADS of its process; its own DataLoader
    worker processes, up to 6 on CUDA, are its design and stay); default: what the environment gives it.

    With `expected_counts` (our partition's client x class counts), the run is stopped as soon as its
    round loop starts if the counts it printed differ (so no time is spent on a different split).

    Rounds are appended to `trace` (a new one by default) as they are printed, and `on_round()` is called
    after each, so a caller can save the rounds of a run that is later cut off."""
    args = ["--dataset", "cifar10", "--num_classes", "10", "--num_clients", "10", "--num_online_clients", "10",
            "--num_rounds", str(rounds), "--num_epochs_local_training", str(local_epochs),
            "--batch_size_local_training", "64", "--repeat_num", "1", "--batch_real", "100",
            "--non_iid_alpha", "0.5", "--imb_factor", "0.01", "--length_of_hp", "5", "--rounds_of_hp", "30",
            "--hp_info_t", "0.05", "--seed", str(seed), "--device", device]
    import hashlib

    folder = work / "data" / "CIFAR10" / "cifar-10-batches-py"
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    cmd = [sys.executable, "-u", "-c", OFFICIAL_WRAPPER, str(checkout.resolve()), json.dumps(md5), *args]
    trace = trace if trace is not None else RunTrace([], [])
    checked = False
    tail: list[str] = []
    start = time.perf_counter()
    last = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            tail = (tail + [line.rstrip()])[-20:]
            count = COUNT_LINE.match(line)
            if count and not trace.accuracy:
                trace.client_counts.append([int(v) for v in count.group(2).split(",")])
            if "FedHPro-training" in line and last is None:
                last = now  # the round loop started (data and partition are ready)
            acc = ACC_LINE.search(line)
            if expected_counts is not None and not checked and (last is not None or acc):
                checked = True  # the partition was printed before the round loop
                if trace.client_counts != expected_counts:
                    proc.kill()
                    raise ParityError(f"seed {seed}: the official partition differs from ours:\nofficial "
                                      f"{trace.client_counts}\nours     {expected_counts}")
                log(f"  partition identical (client x class counts, seed {seed})")
            if acc:
                values = [float(v) for v in acc.group(1).split(",") if v.strip()]
                if len(values) == len(trace.accuracy) + 1:
                    trace.accuracy.append(100 * values[-1] if values[-1] <= 1 else values[-1])
                    trace.seconds.append(now - (last if last is not None else start))
                    last = now
                    log(f"  official seed {seed} round {len(trace.accuracy)}: {trace.accuracy[-1]:.2f}% "
                        f"({trace.seconds[-1]:.1f} s)")
                    if on_round is not None:
                        on_round()
        rc = proc.wait()
    if rc != 0 or len(trace.accuracy) != rounds:
        raise ParityError(f"the official code (seed {seed}) exited {rc} after {len(trace.accuracy)} of {rounds} "
                          "rounds; its last lines:\n" + "\n".join(tail))
    return trace


def ours_config(data_dir: Path, seed: int, rounds: int, local_epochs: int, device: str, aggregation: str):
    from fedhpro.config import from_dict

    return from_dict({"method": "fedhpro", "method_params": {"aggregation": aggregation},
                      "dataset": "cifar10", "dataset_options": {"path": str(data_dir), "source": "python"},
                      "partition": "creff", "alpha": PROTOCOL["alpha"], "imbalance_ratio": PROTOCOL["imbalance_ratio"],
                      "num_clients": PROTOCOL["num_clients"], "partition_seed": seed, "seed": seed,
                      "model": "resnet10", "rounds": rounds, "local_epochs": local_epochs, "batch_size": 64,
                      "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "augment": "crop_flip",
                      "augment_per": "batch", "device": device, "checkpoint_every": rounds, "test_batch_size": 500})


def partition_counts(labels: np.ndarray, seed: int) -> list[list[int]]:
    """Client x class counts of our NID1 partition of `labels` under the harness's protocol, as the official
    code prints its own."""
    from fedhpro.partition import client_class_counts, partition_labels

    parts = partition_labels(labels, scheme="creff", seed=seed, **PROTOCOL)
    return client_class_counts(labels, parts, 10).astype(int).tolist()


def our_client_counts(data_dir: Path, seed: int) -> list[list[int]]:
    """`partition_counts` of the training labels our `cifar10` loader reads from `data_dir`."""
    from fedhpro.data.cifar import load_cifar

    data = load_cifar(data_dir, "cifar10", path=str(data_dir), source="python", cache=False)
    return partition_counts(data.train_y.numpy(), seed)


# Ours in a child process, so that runs can go side by side (--jobs): the child prints its trace as JSON.
OURS_CHILD = """
import json, sys
from pathlib import Path
from fedhpro.parity import run_ours
a = json.loads(sys.argv[1])
t = run_ours(Path(a["data_dir"]), Path(a["work"]), a["seed"], a["rounds"], a["local_epochs"], a["device"],
             a["aggregation"], log=lambda m: print(m, flush=True))
print("TRACE " + json.dumps(t.__dict__), flush=True)
"""


def run_ours_child(data_dir: Path, work: Path, seed: int, rounds: int, local_epochs: int, device: str,
                   aggregation: str, log=print) -> RunTrace:
    """`run_ours` in a child Python (its lines are passed to `log`); same result, runs can overlap."""
    args = {"data_dir": str(data_dir), "work": str(work), "seed": seed, "rounds": rounds,
            "local_epochs": local_epochs, "device": device, "aggregation": aggregation}
    cmd = [sys.executable, "-u", "-c", OURS_CHILD, json.dumps(args)]
    tail: list[str] = []
    trace = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            if line.startswith("TRACE "):
                trace = RunTrace(**json.loads(line[len("TRACE "):]))
            elif line.lstrip().startswith("ours ("):
                log(line.rstrip())
        rc = proc.wait()
    if rc != 0 or trace is None:
        raise ParityError(f"our run ({aggregation}, seed {seed}) exited {rc}; its last lines:\n" + "\n".join(tail))
    return trace


def run_ours(data_dir: Path, work: Path, seed: int, rounds: int, local_epochs: int, device: str, aggregation: str,
             log=print) -> RunTrace:
    from fedhpro.train import train

    cfg = ours_config(data_dir, seed, rounds, local_epochs, device, aggregation)
    df = train(cfg, work / f"ours-{aggregation}-s{seed}")
    seconds = (df["time_local"] + df["time_server"] + df["time_eval"] + df["time_io"]).tolist()
    trace = RunTrace([100 * a for a in df["test_acc"]], seconds)
    for r, (a, s) in enumerate(zip(trace.accuracy, trace.seconds), 1):
        log(f"  ours ({aggregation}) seed {seed} round {r}: {a:.2f}% ({s:.1f} s)")
    return trace


# ---------------------------------------------------------------------------------------------- table
def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def format_table(traces: dict[str, list[RunTrace]], rounds: int) -> str:
    cols = [("official", "official code"), ("last_client", "ours, last_client"), ("fedavg", "ours, fedavg")]
    lines = ["| round | " + " | ".join(f"{title} acc (%)" for _, title in cols) + " | "
             + " | ".join(f"{title} s/round" for _, title in cols) + " |",
             "|---:|" + "---:|" * (2 * len(cols))]
    for r in range(rounds):
        accs = [mean_sd([t.accuracy[r] for t in traces[k]]) for k, _ in cols]
        secs = [mean_sd([t.seconds[r] for t in traces[k]]) for k, _ in cols]
        lines.append(f"| {r + 1} | " + " | ".join(accs) + " | " + " | ".join(secs) + " |")
    overall = []
    for k, _ in cols:  # rounds 2.. (round 1 of the official code includes cudnn/autotuning warm-up)
        per = [s for t in traces[k] for s in t.seconds[1:]] or [s for t in traces[k] for s in t.seconds]
        overall.append(f"{statistics.mean(per):.2f}" if per else "–")
    lines.append("| s/round (mean, rounds 2+) | " + " | ".join([""] * len(cols)) + " | " + " | ".join(overall) + " |")
    return "\n".join(lines)


def within_spread(official: list[RunTrace], ours: list[RunTrace], rounds: int) -> list[bool]:
    """Per round: ours' mean inside the official runs' [min - sd, max + sd] band."""
    out = []
    for r in range(rounds):
        o = [t.accuracy[r] for t in official]
        sd = statistics.stdev(o) if len(o) > 1 else 0.0
        m = statistics.mean(t.accuracy[r] for t in ours)
        out.append(min(o) - sd <= m <= max(o) + sd)
    return out


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/parity-official.sh",
                                description="Run the official FedHPro code beside ours on the same data.")
    p.add_argument("official", help="a local checkout of mala-lab/FedHPro (never copied into this repository)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3, help=f"seeds {FIRST_SEED}, {FIRST_SEED + 1}, ...")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both codes)")
    p.add_argument("--cifar", default=str(SHARED_CIFAR),
                   help="CIFAR-10 copy: image-folder tar/folder, python archive, or a parity pack (*.parity.tar)")
    p.add_argument("--out", default="results/parity", help="where the table, JSON and runs go")
    p.add_argument("--pack", default=None, metavar="FILE.parity.tar",
                   help="only write a parity pack of --cifar (the image-folder tar) for these seeds, then stop")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs side by side (each its own process; on a GPU they share it); default 1")
    p.add_argument("--skip-official", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key in ("rounds", "local_epochs", "seeds", "jobs"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    source = Path(args.cifar)
    if not source.exists():
        raise ConfigError(f"--cifar {source} does not exist")
    if args.pack:
        out = pack_cifar(source, seeds, Path(args.pack))
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) for seeds {seeds}")
        return 0
    checkout = Path(args.official)
    if not args.skip_official:
        check_official(checkout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="parity-", dir=out))
    data_root = work / "data" / "CIFAR10"  # where main_run.py looks, relative to its working directory
    t0 = time.perf_counter()
    write_cifar_python(read_cifar(source), data_root)
    print(f"prepared {data_root}/cifar-10-batches-py from {source} in {time.perf_counter() - t0:.1f} s", flush=True)
    kinds = ([] if args.skip_official else ["official"]) + list(AGGREGATIONS)
    results: dict[tuple[str, int], RunTrace] = {}
    running: dict[tuple[str, int], RunTrace] = {}  # official runs' rounds so far
    save_lock = threading.Lock()
    say = lambda m: print(m, flush=True)  # noqa: E731

    def run_one(kind: str, seed: int) -> RunTrace:
        if kind == "official":
            running[(kind, seed)] = RunTrace([], [])
            official = run_official(checkout, work, seed, args.rounds, args.local_epochs, args.device, log=say,
                                    trace=running[(kind, seed)], on_round=save_partial,
                                    expected_counts=our_client_counts(data_root, seed))
            return official
        runner = run_ours if args.jobs == 1 else run_ours_child
        return runner(data_root, work, seed, args.rounds, args.local_epochs, args.device, kind, log=say)

    def save_partial() -> None:  # after every run and official round: a harness cut short leaves what finished
        with save_lock:
            done = {k: {str(s): results[(k, s)].__dict__ for s in seeds if (k, s) in results} for k in kinds}
            cut = {f"{k} {s}": t.__dict__ for (k, s), t in list(running.items()) if (k, s) not in results}
            tmp = out / "parity.json.tmp"
            tmp.write_text(json.dumps({"complete": False, "runs": done, "unfinished": cut}, indent=1))
            tmp.replace(out / "parity.json")

    tasks = [(kind, seed) for seed in seeds for kind in kinds]
    if args.jobs == 1:
        for kind, seed in tasks:
            results[(kind, seed)] = run_one(kind, seed)
            save_partial()
    else:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, kind, seed): (kind, seed) for kind, seed in tasks}
            for fut in as_completed(futures):  # each result saved as it lands; one failure stops no other run
                try:
                    results[futures[fut]] = fut.result()
                    save_partial()
                except ParityError as err:
                    errors.append(str(err))
        if errors:
            raise ParityError("\n".join(errors))
    traces: dict[str, list[RunTrace]] = {"official": [], "last_client": [], "fedavg": []}
    for kind, seed in tasks:
        traces[kind].append(results[(kind, seed)])
    if args.skip_official:
        traces["official"] = [RunTrace([float("nan")] * args.rounds, [float("nan")] * args.rounds)]
    table = format_table(traces, args.rounds)
    header = (f"CIFAR-10 NID1 alpha 0.5, rho 100, 10 clients, ResNet-10, {args.local_epochs} local epoch(s), "
              f"{args.rounds} rounds, seeds {seeds[0]}..{seeds[-1]} (mean ± sd), device {args.device}")
    print("\n" + header + "\n\n" + table)
    if not args.skip_official:
        for aggregation in AGGREGATIONS:
            inside = within_spread(traces["official"], traces[aggregation], args.rounds)
            print(f"ours ({aggregation}) inside the official spread (min - sd .. max + sd) in "
                  f"{sum(inside)} of {args.rounds} rounds")
    (out / "parity.md").write_text(header + "\n\n" + table + "\n")
    (out / "parity.json").write_text(json.dumps({"complete": True, "header": header,
                                                 "runs": {k: [t.__dict__ for t in v] for k, v in traces.items()}},
                                                indent=1))
    print(f"wrote {out / 'parity.md'} and {out / 'parity.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ParityError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
