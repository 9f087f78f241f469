"""Side-by-side cost of the prototype diagnostics (docs/diagnostics.md): the same run with `diagnostics` on and
off, on this machine; prints per-round seconds (local, server, eval) and the diagnostics' share of a round.

    .venv/bin/python scripts/diagnostics_cost.py [--rounds 10] [--threads 1] [--dataset digits] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedhpro.config import from_dict
from fedhpro.train import train

CASES = {  # name -> config overrides
    "fedproto/global": {"method": "fedproto"},
    "fedproto/personalized": {"method": "fedproto", "eval_mode": "personalized"},
    "fedavg/global": {"method": "fedavg"},
    "fedhpro/global": {"method": "fedhpro", "method_params": {"aggregation": "fedavg"}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--num-clients", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="diag-cost-"))
    base = {"dataset": args.dataset, "num_clients": args.num_clients, "partition": "dirichlet", "alpha": 0.5,
            "rounds": args.rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 0, "device": "cpu"}
    print(f"{'case':24s} {'round s (off)':>13s} {'round s (on)':>12s} {'eval off':>9s} {'eval on':>8s} "
          f"{'diag share of round':>20s}")
    for name, extra in CASES.items():
        times = {}
        for on in (False, True):
            cfg = from_dict({**base, **extra, "diagnostics": on})
            df = train(cfg, out / name.replace("/", "-") / str(on), threads=args.threads)
            # the mean over rounds 2.. (round 1 pays one-off warm-up costs): with `diagnostics_every` the
            # diagnostics run on some rounds only, so their cost per round is an average, not a median
            df = df[df["round"] > 1]
            per_round = df["time_local"] + df["time_server"] + df["time_eval"]
            times[on] = (float(per_round.mean()), float(df["time_eval"].mean()))
        extra_s = times[True][1] - times[False][1]
        print(f"{name:24s} {times[False][0]:13.3f} {times[True][0]:12.3f} {times[False][1]:9.3f} "
              f"{times[True][1]:8.3f} {100 * extra_s / times[False][0]:19.1f}%")


if __name__ == "__main__":
    main()
