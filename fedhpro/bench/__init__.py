"""`fedhpro bench`: how fast the engine trains, side by side with a bare PyTorch loop, in one process.

    fedhpro bench [--quick] [--gpu [--official CHECKOUT]] [--out results/bench] [--threads 1] [--rounds 3]

Everything is measured in one process on the same data, model, batch size and optimiser, with
the measurements interleaved (each engine round next to its bare loop, ABBA order, repeated), so
that load from other processes hits both alike; ratios are medians of the per-repeat ratios.

Figures (every one printed with the machine, torch version, device and thread count), in the order they run:

paper (`--gpu` only): config/paper.yaml's CIFAR-10 FedHPro cell (NID1 alpha 0.5, rho 100, ResNet-10, 10 clients,
    batch 64, 10 local epochs) on random images with CIFAR-10's class counts, trained as `fedhpro train` trains
    it for a warm-up and 2 measured rounds, extrapolated to the paper's 100 rounds (target <= 10 min), and with
    `--official CHECKOUT` the official code on the same files, partition and device (target: ours >= 5x its
    speed per round); see `fedhpro.bench.paper`;

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
channels-last and fp16: local-training throughput against fp32 and final test accuracy against fp32);
sharing: 1, 2 and 4 runs training at once on the device, each in its own process (throughput against one run
alone, target 4 runs >= 2.5x; run 0's numbers identical to the run alone); and scale: memory at 1,000 clients
with 10% participation, personalized client state, partitioning 1,000,000 labels over 1,000 clients, `snakemake -n` planning a 5,000-run sweep, and `fedhpro plan` printing the cost of
config/paper.yaml (target < 60 s).

Targets are printed as PASS/FAIL lines (never asserted): local training >= 90% of the bare loop,
FedHPro round <= 1.25x FedAvg round, evaluation + checkpointing < 10% of a round (and the paper, sharing and
scale targets); N/A where the setting cannot tell (e.g. the paper targets at the `--quick` size). With
`--out`, every section's files are written as soon as it ends; until the last one the summary JSON says
`"complete": false` and the Markdown opens with the sections still missing.

Default config: digits (scikit-learn, 8x8), the small CNN, 10 clients (Dirichlet 0.5), FedHPro's
official local training (10 epochs, batch 64, SGD lr 0.1) and official method defaults (feature
matching 100 steps, re-training 100 epochs, 30 hyper-prototype steps). `--gpu`: ResNet-10 on random
uint8 tensors of CIFAR-10's shape (50,000 x 3 x 32 x 32), 10 clients, on CUDA when available.
`--quick`: a tiny config that runs every section in seconds (for tests; its figures mean little).
Timings are medians over repeats (default 4, ABBA-interleaved); with other processes on the machine
single repeats move by 10-20%, so read the ratios, not the absolute throughputs.

Layout: `common` (configs, data, timers, memory meters), `report` (printing and the bench*.json/md files),
one module per section (`paper`; `rounds`: (a)-(e) and the quick setting; `batched`; `precision`; `sharing`;
`scale`) and `cli`
(`python -m fedhpro.bench`, `fedhpro bench`). Every engine is started and stepped as `fedhpro.train` does
(`start_engine`, `record_round`: round, metrics row, checkpoint), so what is timed is what a run does.
"""

from fedhpro.bench.cli import build_parser, main
from fedhpro.bench.common import BenchConfig, make_config, trained_samples

__all__ = ["BenchConfig", "build_parser", "main", "make_config", "trained_samples"]
