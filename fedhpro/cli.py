"""`fedhpro` command line: train, partition, aggregate, bench, plan, methods, config, datasets.

Every subcommand runs under one error handler (`run_guarded`): bad input (config values, flags,
files) ends with a one-line `error: ...` naming the key or file and exit status 2, never a
traceback; a full disk (ENOSPC/EDQUOT, naming the file) is such a one-line error too (exit status 2);
Ctrl-C prints "interrupted; rerun the same command to resume" (train; the other subcommands say
"interrupted") and exits with 130. Set
FEDHPRO_TRACEBACK=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fedhpro.cliutil import (INTERRUPTED, ArgumentParser, check_out_dir, positive_int,  # noqa: F401
                             run_guarded)


def _parse_set(pairs: list[str]) -> dict:
    from fedhpro.config import ConfigError, load_yaml_text

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        parsed = load_yaml_text(value, f"--set {key}") if value else ""
        if key.startswith("method_params."):
            out.setdefault("method_params", {})[key.split(".", 1)[1]] = parsed
        else:
            out[key] = parsed
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from fedhpro.config import load_config
    from fedhpro.runio import METRICS
    from fedhpro.train import train

    cfg = load_config(args.config, _parse_set(args.set))
    # a finished run is only read (train returns its metrics), so its directory need not be writable
    finished = Path(args.out, METRICS).is_file() if args.out else False
    out = Path(args.out) if finished else check_out_dir(args.out)
    df = train(cfg, out, partition_dir=args.partition_dir, progress=not args.quiet, threads=args.threads)
    last = df.iloc[-1]
    acc = last["test_acc"] if last["test_acc"] == last["test_acc"] else last["client_acc_mean"]
    print(f"{cfg.method} on {cfg.dataset}: {len(df)} rounds, status {last['status']}, final accuracy {acc:.4f}; "
          f"metrics in {out / 'metrics.parquet'}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from fedhpro.methods import describe_methods

    print(describe_methods())
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from fedhpro.docs import ROOT, update

    stale = update(ROOT if args.root is None else Path(args.root), write=args.write)
    for path in stale:
        if args.write:
            print(f"rewrote {path}")
        else:
            print(f"error: {path} is out of date: run fedhpro docs --write", file=sys.stderr)
    return 1 if args.check and stale else 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedhpro.config import RunConfig
    from fedhpro.methods import METHODS
    from fedhpro.params import describe_declared

    if args.method is not None and args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is not a method; accepted: {', '.join(sorted(METHODS))}")
    print("RunConfig keys (name (type; accepted values) = default: help):")
    print("\n".join(describe_declared(RunConfig, indent="  ")))
    if args.method is not None:
        print(f"method_params of {args.method}:")
        print("\n".join(describe_declared(METHODS[args.method].Params, indent="  ")) or "  (none)")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from fedhpro.data import DATASETS

    for name, spec in sorted(DATASETS.items()):
        domains = f", domains: {', '.join(spec.domains)}" if spec.domains else ""
        print(f"{name}: {spec.description or name} (classes: {spec.num_classes or 'from data'}, default model: "
              f"{spec.default_model}{domains})")
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from fedhpro.data import cli_options, fingerprint, load_dataset

    print(fingerprint(load_dataset(args.dataset, args.data_root, **cli_options(args.dataset, args.path))))
    return 0


PASS_THROUGH = {"partition": "fedhpro.partition", "aggregate": "fedhpro.aggregate", "bench": "fedhpro.bench",
                "plan": "fedhpro.plan", "schema": "fedhpro.sections"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fedhpro", description="FedHPro and prototype-based FL baselines")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one federated run", description="Train (or resume) one run.")
    p.add_argument("--config", required=True, help="run config (YAML or JSON)")
    p.add_argument("--out", required=True, help="run directory (config.json, checkpoint.pt, metrics.parquet)")
    p.add_argument("--partition-dir", default=None, help="use a saved partition instead of computing it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (method_params.NAME=VALUE for method hyperparameters)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; recorded, a resume must use the same)")
    p.set_defaults(func=cmd_train)
    # main() hands every argument, --help included, to these modules' own parsers
    sub.add_parser("partition", help="partition a dataset and print the client x class table", add_help=False)
    sub.add_parser("aggregate", help="collect run Parquets into tables and figures", add_help=False)
    sub.add_parser("bench", help="speed and memory benchmarks (engine vs bare PyTorch loop)", add_help=False)
    sub.add_parser("plan", help="a sweep's runs, GPU-hours and wall-clock from measured seconds per round",
                   add_help=False)
    sub.add_parser("schema", help="print (or --write) the workflow config's JSON schema, generated from the "
                   "declarations", add_help=False)
    p = sub.add_parser("methods", help="list methods with their hyperparameters and defaults",
                       description="List every method, its paper, modes and hyperparameters.")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("docs", help="rewrite (or check) the docs' blocks generated from the declarations",
                       description="Rewrite, or check, every generated block of README.md and docs/ (config "
                                   "keys, method parameters, datasets, the methods table and declaration) from "
                                   "the declarations in code (fedhpro.docs).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite every generated block that is out of date")
    mode.add_argument("--check", action="store_true",
                      help="exit 1, naming the pages, if a committed block differs from its output")
    p.add_argument("--root", default=None,
                   help="the checkout whose README.md and docs/ to rewrite or check (default: this package's)")
    p.set_defaults(func=cmd_docs)
    p = sub.add_parser("config", help="list every run config key with its type, default and help",
                       description="List every RunConfig key: its type, accepted values, default and help "
                                   "(with --method NAME, also that method's parameters).")
    p.add_argument("--method", default=None, help="also list this method's parameters (method_params)")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("datasets", help="list datasets", description="List the registered datasets.")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("fingerprint", help="print a dataset's content fingerprint (as recorded in runs)",
                       description="Load a dataset and print its content fingerprint ('sha256:...'), the "
                                   "identity recorded in partitions and run provenance.")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", default="data")
    p.add_argument("--path", default=None, help="your own copy of the data (the loader's path= option)")
    p.set_defaults(func=cmd_fingerprint)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASS_THROUGH:  # subcommands with their own argparse (and --help)
        import importlib

        name = PASS_THROUGH[argv[0]]  # imported under the handler: Ctrl-C while torch loads is one line too
        return run_guarded(lambda rest: importlib.import_module(name).main(rest), argv[1:])
    return run_guarded(_main, argv, resumable=bool(argv[:1]) and argv[0] == "train")


if __name__ == "__main__":
    sys.exit(main())
