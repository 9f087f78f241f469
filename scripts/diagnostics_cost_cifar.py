"""Cost of the prototype diagnostics against the global test evaluation at CIFAR-10 scale (docs/diagnostics.md):
times `LocalPrototypes.add_all` (the diagnostics' forward passes) and the test-set evaluation with the same
(untrained) global model, 10 clients, Dirichlet 0.5, the dataset's default model.

    .venv/bin/python scripts/diagnostics_cost_cifar.py PATH_TO_cifar10-jpeg.tar DATA_ROOT [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedhpro.config import from_dict
from fedhpro.diagnostics import LocalPrototypes
from fedhpro.engine import evaluate
from fedhpro.train import build_context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tar")
    ap.add_argument("root")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = from_dict({"dataset": "cifar10", "data_root": args.root, "dataset_options": {"path": args.tar},
                     "num_clients": 10, "partition": "dirichlet", "alpha": 0.5, "method": "fedavg", "device": "cpu"})
    ctx = build_context(cfg)
    model = ctx.make_model()
    model.eval()
    for rep in range(2):
        t0 = time.perf_counter()
        local = LocalPrototypes(None, ctx, cfg.test_batch_size)
        local.add_all(model, ctx.clients)
        local.columns()
        t1 = time.perf_counter()
        evaluate(lambda x: model(x)[1], ctx, ctx.test_x, ctx.test_y, cfg.test_batch_size)
        t2 = time.perf_counter()
        n = sum(int(p.sum()) for p in local.present)
        print(f"rep {rep}: diagnostics {t1 - t0:.2f} s ({n} client-class prototypes), test evaluation "
              f"{t2 - t1:.2f} s ({len(ctx.test_y)} images), ratio {(t1 - t0) / (t2 - t1):.3f}")


if __name__ == "__main__":
    main()
