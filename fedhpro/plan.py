"""`fedhpro plan`: what a sweep will cost before it is submitted, from measured seconds per round.

    fedhpro plan --configfile config/paper.yaml --gpus 8 --device-kind "NVIDIA H100 80GB HBM3"
    fedhpro plan --record results/runs/cifar10/... --times config/round-times.csv   # add measured rows

The estimate is computed only from `config/round-times.csv`, a table of seconds per round measured on
real hardware (by `fedhpro plan --record` from finished runs' `metrics.parquet`, or by `fedhpro bench`).
A row holds one measured setting: the device kind, the keys that decide how much work a round is
(dataset, long-tail ratio, model, method, variant parameters, evaluation mode, batch size, clients and
clients per round, and the execution keys that change its speed: engine, precision, channels_last and compile,
where not their defaults), the local epochs it was measured at, and the median seconds per round of local
training, server step, evaluation and checkpoint I/O over the measured rounds (the first round, which
pays for warm-up, is left out when there are more), with how many runs shared the device while it was
measured.

A run is estimated as

    rounds x (s_local x local_epochs / measured_local_epochs + s_server + s_eval / eval_every
              + s_io / checkpoint_every)

which scales only along the keys that scale a round linearly (local epochs; evaluation and checkpoint
frequency). Every other key must match a row exactly; a run whose setting has no row is counted as
"no measurement" and listed, never guessed. One relaxation is offered and reported separately: a
variant of a method (other `method_params`) may be timed by the row of that method's default
parameters (`variants as default` column), because ablation variants rarely change a round's cost;
`--exact` turns this off.

GPU-hours are each run's seconds divided by the number of runs that shared the device in its
measurement. The wall-clock for N devices (`--gpus`) schedules the runs longest-first onto
N x runs-per-device slots (the measurement's sharing) and reports the makespan, which is at least the
longest single run.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from fedhpro.cliutil import ArgumentParser, positive_int

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMES = REPO_ROOT / "config" / "round-times.csv"
SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

# the keys of a measured setting (every one must match a run's, but `method_params`, see module doc)
KEY_COLUMNS = ("device_kind", "dataset", "imbalance_ratio", "model", "method", "method_params", "eval_mode",
               "batch_size", "num_clients", "clients_per_round", "execution")
# The run config keys that change how fast the same training runs: a row measured with other values of them
# (a compiled, bf16 or batched run) never stands for a run without them. `execution` holds those that differ
# from their defaults, as JSON ("{}" for the default execution).
SPEED_KEYS = ("engine", "precision", "channels_last", "compile")
VALUE_COLUMNS = ("local_epochs", "s_local", "s_server", "s_eval", "s_io", "runs_sharing", "rounds_measured")
INFO_COLUMNS = ("source", "measured")
COLUMNS = KEY_COLUMNS + VALUE_COLUMNS + INFO_COLUMNS


class PlanError(ValueError):
    """A bad round-times table, run directory or option (the message names it)."""


@dataclass(frozen=True)
class Measurement:
    key: tuple
    local_epochs: int
    s_local: float
    s_server: float
    s_eval: float
    s_io: float
    runs_sharing: int
    rounds_measured: int
    source: str
    measured: str


def _key_of(device_kind: str, dataset: str, imbalance_ratio: float, model: str, method: str,
            method_params: Mapping, eval_mode: str, batch_size: int, num_clients: int,
            clients_per_round: int | None, execution: Mapping) -> tuple:
    return (device_kind, dataset, f"{float(imbalance_ratio):g}", model, method,
            json.dumps(dict(method_params), sort_keys=True, default=str), eval_mode, str(int(batch_size)),
            str(int(num_clients)), "" if clients_per_round is None else str(int(clients_per_round)),
            json.dumps(dict(execution), sort_keys=True))


def read_times(path: str | Path) -> list[Measurement]:
    """The measured rows of a round-times table (a missing or malformed file is a PlanError naming it)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"round-times table {path} does not exist (fedhpro plan --record or fedhpro bench write it)")
    out = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PlanError(f"round-times table {path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                out.append(Measurement(
                    key=tuple(row[c] for c in KEY_COLUMNS), local_epochs=int(row["local_epochs"]),
                    s_local=float(row["s_local"]), s_server=float(row["s_server"]), s_eval=float(row["s_eval"]),
                    s_io=float(row["s_io"]), runs_sharing=int(row["runs_sharing"]),
                    rounds_measured=int(row["rounds_measured"]), source=row["source"], measured=row["measured"]))
            except (TypeError, ValueError) as err:
                raise PlanError(f"round-times table {path}, line {line}: {err}") from None
            m = out[-1]
            if m.local_epochs < 1 or m.runs_sharing < 1 or min(m.s_local, m.s_server, m.s_eval, m.s_io) < 0:
                raise PlanError(f"round-times table {path}, line {line}: local_epochs and runs_sharing must be "
                                ">= 1 and the seconds >= 0")
    return out


def write_times(path: str | Path, rows: Iterable[Measurement]) -> None:
    """Write the table atomically; a later row with the key of an earlier one replaces it (a re-measurement)."""
    by_key: dict[tuple, Measurement] = {}
    for m in rows:
        by_key[(m.key, m.runs_sharing)] = m
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for m in sorted(by_key.values(), key=lambda m: (m.key, m.runs_sharing)):
            w.writerow(list(m.key) + [m.local_epochs, f"{m.s_local:.4g}", f"{m.s_server:.4g}", f"{m.s_eval:.4g}",
                                      f"{m.s_io:.4g}", m.runs_sharing, m.rounds_measured, m.source, m.measured])
    tmp.replace(path)


def _resolved_model(cfg) -> str:
    if cfg.client_models:
        return "+".join(cfg.client_models)
    if cfg.model != "auto":
        return cfg.model
    from fedhpro.data import DATASETS

    return DATASETS[cfg.dataset].default_model


def changed_params(cfg) -> dict:
    """The run's method parameters that differ from the method's defaults (as in the config hash)."""
    from fedhpro.methods import resolve_params

    defaults = resolve_params(cfg.method, {})
    return {k: v for k, v in cfg.method_params.items() if defaults.get(k, object()) != v}


def execution_of(cfg) -> dict:
    """The run's `SPEED_KEYS` that differ from their defaults."""
    from fedhpro.config import RunConfig

    default = RunConfig()
    return {k: getattr(cfg, k) for k in SPEED_KEYS if getattr(cfg, k) != getattr(default, k)}


def run_key(cfg, device_kind: str, *, as_default: bool = False) -> tuple:
    """The measured-setting key of a run config (`as_default`: with its method's default parameters; the
    execution keys always count)."""
    return _key_of(device_kind, cfg.dataset, cfg.imbalance_ratio, _resolved_model(cfg), cfg.method,
                   {} if as_default else changed_params(cfg), cfg.eval_mode, cfg.batch_size, cfg.num_clients,
                   cfg.clients_per_round, execution_of(cfg))


def run_seconds(cfg, m: Measurement) -> float:
    """Estimated wall seconds of one run (with `m.runs_sharing` runs on its device), see the module doc."""
    per_round = (m.s_local * cfg.local_epochs / m.local_epochs + m.s_server + m.s_eval / cfg.eval_every
                 + m.s_io / cfg.checkpoint_every)
    return cfg.rounds * per_round


def makespan(durations: Sequence[float], slots: int) -> float:
    """Longest-processing-time-first schedule of `durations` on `slots` parallel slots: its length."""
    if not durations:
        return 0.0
    loads = [0.0] * max(1, slots)
    for d in sorted(durations, reverse=True):
        i = min(range(len(loads)), key=loads.__getitem__)
        loads[i] += d
    return max(loads)


@dataclass
class Estimate:
    """The cost of one experiment (or of all of them) on one device kind."""

    runs: int = 0
    measured: int = 0
    as_default: int = 0
    gpu_seconds: float = 0.0
    durations: dict[int, list[float]] = field(default_factory=dict)  # runs_sharing -> run seconds
    unmeasured: dict[str, int] = field(default_factory=dict)  # setting text -> runs

    def add(self, other: "Estimate") -> None:
        self.runs += other.runs
        self.measured += other.measured
        self.as_default += other.as_default
        self.gpu_seconds += other.gpu_seconds
        for k, v in other.durations.items():
            self.durations.setdefault(k, []).extend(v)
        for k, v in other.unmeasured.items():
            self.unmeasured[k] = self.unmeasured.get(k, 0) + v

    def wall_seconds(self, devices: int) -> float:
        # runs measured under different sharing levels are scheduled one level after the other
        return sum(makespan(d, devices * sharing) for sharing, d in self.durations.items())


def _setting_text(cfg) -> str:
    changed = changed_params(cfg)
    params = json.dumps(changed, sort_keys=True) if changed else "defaults"
    execution = execution_of(cfg)
    return (f"{cfg.dataset} rho={cfg.imbalance_ratio:g} {_resolved_model(cfg)} {cfg.method}({params}) "
            f"{cfg.eval_mode} batch {cfg.batch_size}, {cfg.num_clients} clients"
            + (f", {cfg.clients_per_round} per round" if cfg.clients_per_round else "")
            + (f", {json.dumps(execution, sort_keys=True)}" if execution else ""))


def estimate(runs, table: Sequence[Measurement], device_kind: str, *, exact: bool = False,
             runs_per_device: int | None = None) -> dict[str, Estimate]:
    """Per experiment, the estimate of its runs (a run in two experiments counts in both, once in the total)."""
    index: dict[tuple, list[Measurement]] = {}
    for m in table:
        if runs_per_device is None or m.runs_sharing == runs_per_device:
            index.setdefault(m.key, []).append(m)
    out: dict[str, Estimate] = {}
    for run in runs:
        cfg = run.config
        one = Estimate(runs=1)
        found = index.get(run_key(cfg, device_kind))
        if not found and not exact and changed_params(cfg):
            found = index.get(run_key(cfg, device_kind, as_default=True))
            one.as_default = 1 if found else 0
        if found:
            m = min(found, key=lambda m: m.runs_sharing)  # the least shared measurement
            seconds = run_seconds(cfg, m)
            one.measured = 1
            one.gpu_seconds = seconds / m.runs_sharing
            one.durations = {m.runs_sharing: [seconds]}
        else:
            one.unmeasured = {_setting_text(cfg): 1}
        for exp in run.experiments or ("sweep",):
            out.setdefault(exp, Estimate()).add(one)
    return out


def _hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.1f}" if hours >= 10 else f"{hours:.2f}"


def format_plan(per_exp: dict[str, Estimate], total: Estimate, device_kind: str, devices: int) -> str:
    lines = [f"Cost on {device_kind!r}, {devices} device(s), from measured seconds per round "
             "(see `fedhpro plan --help`):",
             f"{'experiment':<28} {'runs':>6} {'measured':>9} {'as default':>10} {'GPU-hours':>10} "
             f"{'wall-clock h':>12}"]
    for name, e in list(per_exp.items()) + [("total (each run once)", total)]:
        if e.measured == 0:
            gpu, wall = "n/a", "n/a"
        else:
            gpu, wall = _hours(e.gpu_seconds), _hours(e.wall_seconds(devices))
            if e.measured < e.runs:
                gpu, wall = ">=" + gpu, ">=" + wall
        lines.append(f"{name:<28} {e.runs:>6} {e.measured:>9} {e.as_default:>10} {gpu:>10} {wall:>12}")
    if total.unmeasured:
        lines.append(f"no measurement on {device_kind!r} for {sum(total.unmeasured.values())} of {total.runs} runs "
                     f"({len(total.unmeasured)} settings); not estimated. Measure one run of each with "
                     "`fedhpro plan --record RUN_DIR` (or `fedhpro bench --gpu`):")
        for text, n in sorted(total.unmeasured.items(), key=lambda kv: -kv[1])[:20]:
            lines.append(f"  {n:>5} x {text}")
        if len(total.unmeasured) > 20:
            lines.append(f"  ... and {len(total.unmeasured) - 20} more settings")
    if total.as_default:
        lines.append(f"{total.as_default} run(s) of non-default variants are timed by their method's default "
                     "parameters (--exact to leave them out)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ inputs
def load_workflow_config(path: str | Path) -> dict:
    """A workflow config file as the workflow sees it: strict YAML 1.2, the schema's defaults filled in."""
    from fedhpro.config import load_yaml_text
    from fedhpro.sweep import check_config_files

    check_config_files([str(path)])
    config = load_yaml_text(Path(path).read_text(), f"config file {str(path)!r}")
    if not isinstance(config, dict):
        raise PlanError(f"config file {path} is not a mapping of workflow keys")
    # the workflow's own two steps (workflow/rules/common.smk): the one-line schema reason, then Snakemake's
    # validate, which fills in the schema's defaults
    from snakemake.utils import validate

    from fedhpro.runtable import schema_error

    reason = schema_error(config, str(SCHEMA))
    if reason is not None:
        raise PlanError(f"config file {path}: {reason}")
    validate(config, str(SCHEMA))
    return config


def current_device_kind(device: str = "auto") -> str:
    """The kind of device this machine trains on: the GPU's name, else 'cpu: <CPU model>'."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device("cuda" if device == "auto" else device))
    return f"cpu: {cpu_model()}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says (the benchmarks record it too)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measurement_of_run(run_dir: str | Path, device_kind: str, runs_sharing: int, source: str) -> Measurement:
    """Median seconds per round of a finished run (`metrics.parquet` checked against its `config.json`)."""
    import pandas as pd

    from fedhpro.config import from_dict
    from fedhpro.runio import METRICS, check_metrics_belong

    run_dir = Path(run_dir)
    info_path = run_dir / "config.json"
    if not info_path.is_file():
        raise PlanError(f"{run_dir} is not a run directory (no config.json)")
    info = json.loads(info_path.read_text())
    if not (run_dir / METRICS).is_file():
        raise PlanError(f"{run_dir} has no {METRICS} (an unfinished run is not timed)")
    check_metrics_belong(run_dir, info)
    df = pd.read_parquet(run_dir / METRICS)
    cfg = from_dict(info["config"])
    rows = df[df["status"] == "finished"] if "status" in df else df
    if len(rows) > 1:
        rows = rows[rows["round"] != rows["round"].min()]  # round 1 pays for warm-up (allocator, caches)
    if rows.empty:
        raise PlanError(f"{run_dir}/metrics.parquet has no finished round to time")
    evaluated = rows[rows["time_eval"] > 0]
    checkpointed = rows[rows["time_io"] > 0]

    def med(frame, col):
        return float(statistics.median(frame[col])) if len(frame) else 0.0

    return Measurement(key=run_key(cfg, device_kind), local_epochs=cfg.local_epochs,
                       s_local=med(rows, "time_local"), s_server=med(rows, "time_server"),
                       s_eval=med(evaluated, "time_eval"), s_io=med(checkpointed, "time_io"),
                       runs_sharing=runs_sharing, rounds_measured=len(rows), source=source,
                       measured=datetime.now(timezone.utc).strftime("%Y-%m-%d"))


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fedhpro plan", description=__doc__.split("\n\n")[0],
                       epilog="The estimate uses only measured rows; see the module docstring of fedhpro.plan.")
    p.add_argument("--configfile", help="workflow config to estimate (e.g. config/paper.yaml)")
    p.add_argument("--gpus", type=positive_int, default=1, help="devices the sweep runs on at once (default 1)")
    p.add_argument("--device-kind", default=None,
                   help="device kind to estimate for, as in the table's device_kind column (default: this "
                        "machine's GPU, else its CPU)")
    p.add_argument("--runs-per-gpu", type=positive_int, default=None,
                   help="use only measurements made with this many runs sharing a device")
    p.add_argument("--exact", action="store_true",
                   help="do not time a variant by its method's default parameters")
    p.add_argument("--times", default=str(DEFAULT_TIMES), help="round-times table (CSV)")
    p.add_argument("--record", nargs="+", metavar="RUN_DIR", default=None,
                   help="add the measured seconds per round of these finished runs to the table")
    p.add_argument("--runs-sharing", type=positive_int, default=1,
                   help="with --record: how many runs shared the device while these ran (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device_kind = args.device_kind or current_device_kind()
    if args.record:
        table = read_times(args.times) if Path(args.times).exists() else []
        new = [measurement_of_run(d, device_kind, args.runs_sharing, source=f"fedhpro plan --record {d}")
               for d in args.record]
        write_times(args.times, table + new)
        print(f"recorded {len(new)} measurement(s) on {device_kind!r} in {args.times}")
        return 0
    if not args.configfile:
        raise PlanError("give --configfile CONFIG (to estimate) or --record RUN_DIR... (to measure)")
    from fedhpro.sweep import validate_workflow_config

    table = read_times(args.times)
    runs = validate_workflow_config(load_workflow_config(args.configfile), warn=lambda m: None)
    per_exp = estimate(runs, table, device_kind, exact=args.exact, runs_per_device=args.runs_per_gpu)
    total = estimate([replace(r, experiments=()) for r in runs], table, device_kind, exact=args.exact,
                     runs_per_device=args.runs_per_gpu)["sweep"] if runs else Estimate()
    print(format_plan(per_exp, total, device_kind, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
