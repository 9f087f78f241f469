"""Collect every run's `metrics.parquet` into one tidy table and write the paper's tables.

Pipeline
--------
``collect(runs)``
    Reads each ``<run_dir>/metrics.parquet`` into one long table, one row per
    (run, round), with the columns written by `fedhpro.train.result_row` plus
    ``run_dir`` and ``acc`` (the row's accuracy: ``test_acc`` in global mode,
    ``client_acc_mean`` in personalized mode). Files whose
    ``fedhpro.schema_version`` differs from `METRICS_SCHEMA_VERSION` are refused
    with one `SchemaVersionError` that lists every run directory to regenerate;
    a missing file is a `MetricsFileError` naming it.
``summarize_runs(df, rule, last_k)``
    One row per run. The reporting rule picks the rounds that make the run's
    number, among the rounds that were evaluated (``acc`` not NaN):
    ``final`` the last one, ``last_k`` the last ``k`` (mean), ``best`` the one
    with the highest accuracy (max). Every other per-run number (per-domain
    accuracy) is taken over the same rounds, so ``best`` never mixes rounds.
    A diverged run gets ``status='diverged'``, ``diverged_round`` (the last
    round recorded, the one in which training blew up) and no accuracy.
``summarize(df, rule, last_k)``
    One row per setting (`SETTING_KEYS`): mean and sample standard deviation
    (ddof=1) over the finished seeds (seed x partition seed), in percent, the
    number of finished seeds ``n`` and of diverged ones. Diverged seeds are never
    averaged in; the cell text says so: ``"61.20 ± 1.30 (n=2, 1 diverged)"``,
    and ``"diverged (round 7)"`` when every seed diverged.
``write_tables(df, out_dir, rule, last_k)``
    main / ablation / communication / (domains) tables as Markdown, LaTeX
    (booktabs) and CSV, each with a caption that states the reporting rule,
    plus ``runs.csv`` (per run) and ``settings.csv`` (per setting, numeric).

CLI::

    python -m fedhpro.aggregate --runs 'results/runs/**/metrics.parquet' --out results/tables \\
        --rule last_k --last-k 5 [--figures results/figures]
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from fedhpro.config import EXECUTION_KEYS, LOCATION_KEYS
from fedhpro.labels import (CONDITION_KEYS, MB, NOISE_SE, SETTING_KEYS, aggregation_name, combine_deltas, cond_id,
                            cond_of, declared, method_name, method_order, proposed_method, shows_aggregation,
                            condition_labels, condition_slug, delta_text, is_main_row, method_label, method_notes,
                            paired_delta, reference_variant, sort_key_condition, sort_key_method)
from fedhpro.runio import (METRICS, METRICS_SCHEMA_VERSION, atomic_write_text, is_pipeline_metrics,
                           metrics_identity, metrics_mismatch, read_metrics_meta,
                           read_run_info)

RULES = ("final", "last_k", "best")
RUN_KEYS = SETTING_KEYS + ("partition_seed", "seed", "run_id")
REQUIRED_COLUMNS = tuple(k for k in RUN_KEYS if k != "aggregation") + ("round", "status", "train_loss", "test_acc", "test_loss", "client_acc_mean",
                               "client_acc_std", "bytes_up", "bytes_down")
DOMAIN_PREFIX = "domain_acc_"
DOMAIN_AVG = "domains_avg"  # per run: the unweighted mean of its per-domain accuracies
TIME_COLUMNS = {"time_local": "sec_client_per_round", "time_server": "sec_server_per_round"}  # metrics -> per run
CLIENTS = "clients.parquet"  # per-client results of a run (one row per evaluated round and client), if written
CLIENT_COLUMNS = ("run_id", "round", "client", "client_acc", "client_test_size", "client_correct")
TARGET_FRACTION = 0.9  # the communication table's target: 90% of the median reported accuracy of the setting


class AggregateError(RuntimeError):
    """Base class of the aggregation errors (all carry a message that names the files)."""


class SchemaVersionError(AggregateError):
    """Some metrics files were written with another `METRICS_SCHEMA_VERSION`."""


class MetricsFileError(AggregateError, FileNotFoundError):
    """A metrics file is missing, unreadable or lacks required columns."""


class StaleRunError(AggregateError):
    """A run was computed by an earlier behaviour revision of its method (`REVISIONS` in its module)."""


class DuplicateRunError(AggregateError):
    """The same run (same config hash) was found in more than one directory."""


class MixedSeedsError(AggregateError):
    """Two runs of one table cell share a seed but differ in config: they are not seeds of one setting."""


# config keys that say where data lives, not what a run is (they may differ between copies of one run)
# not what a run is (`fedhpro.config`): where its data lives, and how it was executed (they change no number)
_NOT_THE_RUN = LOCATION_KEYS + EXECUTION_KEYS


def _config_differences(a: dict, b: dict, ignore: Sequence[str] = ()) -> list[str]:
    """'key: a vs b' for every config key (method_params.* and dataset_options.* flattened) that differs,
    but the keys in `ignore`, where the data lives and the execution keys."""
    def flat(cfg: dict) -> dict:
        out = {}
        for key, value in cfg.items():
            if key in _NOT_THE_RUN or key in ignore:
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if not (key == "dataset_options" and sub == "path"):
                        out[f"{key}.{sub}"] = v
            else:
                out[key] = value
        return out

    fa, fb = flat(a), flat(b)
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


# config keys that legitimately differ between the runs averaged in one table cell: the cell's seeds
# (`summarize` averages over seed x partition seed)
_SEED_KEYS = ("seed", "partition_seed")


def check_seeds_of_one_config(df: pd.DataFrame, configs: dict[str, dict]) -> None:
    """The runs of one table cell (`SETTING_KEYS`) must be seeds of one config; else MixedSeedsError naming two
    of their directories and the config keys on which they differ.

    Two directories with the same (seed, partition seed) are never seeds of one setting; runs with other seeds
    must agree on every config key but the seeds (and `_NOT_THE_RUN`: data location, execution keys)."""
    # a table row is (method, variant) under one condition: `aggregation` (a method parameter) is not part of
    # the row key, so runs that differ in it (or in any other parameter) must not share a row
    cell_keys = [k for k in SETTING_KEYS if k != "aggregation"]
    keys = cell_keys + ["partition_seed", "seed"]
    firsts = df.drop_duplicates("run_dir")
    for _, grp in firsts.groupby(keys, dropna=False, sort=False):
        dirs = sorted(grp["run_dir"].unique())
        if len(dirs) < 2:
            continue
        a, b = dirs[0], dirs[1]
        diff = _config_differences(configs.get(a, {}), configs.get(b, {}))
        first = grp.iloc[0]
        raise MixedSeedsError(
            f"runs {a} and {b} are both seed {int(first['seed'])} (partition seed {int(first['partition_seed'])}) "
            f"of {first['method']}/{first['variant']} on {first['dataset']} but differ in "
            f"{'; '.join(diff) if diff else 'their run id'}; a cell's seeds must come from one config: give the "
            "other config its own variant name, or leave one run out")
    for _, cell in firsts.groupby(cell_keys, dropna=False, sort=False):
        dirs = sorted(cell["run_dir"].unique())
        seeds = dict(zip(cell["run_dir"], zip(cell["seed"], cell["partition_seed"])))
        ref = dirs[0]
        for other in dirs[1:]:
            diff = _config_differences(configs.get(ref, {}), configs.get(other, {}), ignore=_SEED_KEYS)
            if not diff:
                continue
            first = cell.iloc[0]
            (sa, pa), (sb, pb) = seeds[ref], seeds[other]
            raise MixedSeedsError(
                f"runs {ref} (seed {int(sa)}, partition seed {int(pa)}) and {other} (seed {int(sb)}, partition "
                f"seed {int(pb)}) are averaged as seeds of {first['method']}/{first['variant']} on "
                f"{first['dataset']} but differ in {'; '.join(diff)}; a cell's seeds must come from one config: "
                "give the other config its own variant name, or leave its runs out")


# ====================================================================== collect
def _duplicate_text(run_id: str, a: Path, b: Path) -> str:
    """Why two directories of one run id are refused: copies, or the same config run again under another thread
    count or on other data (then the numbers differ, and the message says in what)."""
    try:
        ia, ib = metrics_identity(a / METRICS), metrics_identity(b / METRICS)
    except Exception:  # noqa: BLE001 - the files were read a moment ago; a copy is the likely case
        ia = ib = {}
    differs = [f"{key} {ia.get(key)} vs {ib.get(key)}" for key in ("threads", "data_fingerprint")
               if ia.get(key) is not None and ib.get(key) is not None and ia.get(key) != ib.get(key)]
    if differs:
        return (f"run {run_id} (one config) was run twice, in {a} and {b}, with different {'; '.join(differs)}; "
                "their numbers differ only by that: keep one of them so that no seed is counted twice")
    return f"run {run_id} appears in both {a} and {b}; keep only one copy so that no seed is counted twice"


def find_metrics_files(runs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Resolve run directories, metrics files and glob patterns (``**`` recursive) to metrics files.

    An explicit directory or file that does not exist (or a directory without
    ``metrics.parquet``) is an error naming it; so is a pattern that matches
    nothing. The result is sorted and free of duplicates.
    """
    items = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if not items:
        raise MetricsFileError("no run directories or patterns given")
    found: list[Path] = []
    missing: list[str] = []
    for item in items:
        text = str(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise MetricsFileError(f"no metrics files match the pattern {text!r}")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(text)]
        for path in candidates:
            file = path / METRICS if path.is_dir() else path
            if not path.exists():
                missing.append(f"{path} (no such run directory or file)")
            elif not file.is_file():
                missing.append(str(file))
            else:
                found.append(file)
    if missing:
        raise MetricsFileError("metrics file(s) not found: " + ", ".join(missing)
                               + " (has the run finished? re-run it or leave it out)")
    unique = {p.resolve(): p for p in found}
    return [unique[k] for k in sorted(unique)]


def stale_method_revision(config: dict) -> str | None:
    """Why a run's recorded config is stale under this code's behaviour revision of its method, or None.
    Metrics written before revisions existed carry none: revision 0."""
    from fedhpro.config import REVISION_KEY, check_revision
    from fedhpro.methods import METHOD_MODULES

    method = config.get("method")
    if not isinstance(method, str) or method not in METHOD_MODULES:
        return None
    try:
        check_revision(method, config.get(REVISION_KEY, 0), where="the run")
    except ValueError as err:
        return f"{err} (delete its run directory, or move it out of the runs given to aggregate)"
    return None


def collect(runs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One tidy table of every run's per-round metrics (one row per run and round), plus ``run_dir`` and ``acc``."""
    files = find_metrics_files(runs)
    stale: list[str] = []
    for file in files:
        try:
            version, config = read_metrics_meta(file)
            ours = is_pipeline_metrics(file)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported by name
            raise MetricsFileError(f"cannot read metrics file {file}: {err}") from None
        if not ours:  # a Parquet file of something else: no version of ours to regenerate
            raise MetricsFileError(f"{file} is not a metrics file of this pipeline (no fedhpro metadata); give "
                                   "run directories or the metrics.parquet files that `fedhpro train` writes")
        if version != METRICS_SCHEMA_VERSION:
            stale.append(f"{file.absolute().parent} (schema version {version})")
            continue
        reason = stale_method_revision(config)
        if reason:
            raise StaleRunError(f"metrics file {file}: {reason}")
    if stale:
        raise SchemaVersionError(
            f"{len(stale)} metrics file(s) were written with a schema version other than "
            f"{METRICS_SCHEMA_VERSION}; regenerate these run directories (delete them and re-run): "
            + "; ".join(stale))
    frames = []
    seen: dict[str, Path] = {}
    configs: dict[str, dict] = {}
    for file in files:
        try:
            part = pd.read_parquet(file)
            _, configs[str(file.parent)] = read_metrics_meta(file)
        except Exception as err:  # noqa: BLE001
            raise MetricsFileError(f"cannot read metrics file {file}: {err}") from None
        try:
            info = read_run_info(file.parent) if file.name == METRICS else None
        except ValueError as err:
            raise MetricsFileError(str(err)) from None
        try:
            reason = None if info is None else metrics_mismatch(file, info)
        except Exception as err:  # noqa: BLE001
            raise MetricsFileError(f"cannot read metrics file {file}: {err}") from None
        if reason:
            raise MetricsFileError(f"metrics file {file} belongs to another run ({reason}); delete it and "
                                   "re-run, or restore the right file")
        absent = [c for c in REQUIRED_COLUMNS if c not in part.columns]
        if absent:
            raise MetricsFileError(f"metrics file {file} lacks column(s) {', '.join(absent)}; regenerate {file.parent}")
        if part.empty:
            raise MetricsFileError(f"metrics file {file} holds no rounds; regenerate {file.parent}")
        for run_id in part["run_id"].unique():
            if run_id in seen and seen[run_id] != file.parent:
                raise DuplicateRunError(_duplicate_text(run_id, seen[run_id], file.parent))
            seen[run_id] = file.parent
        if part["round"].duplicated().any():
            raise MetricsFileError(f"metrics file {file} has repeated rounds; regenerate {file.parent}")
        if "aggregation" not in part.columns:  # metrics written before the column: no method had a choice then
            part["aggregation"] = np.where(part["eval_mode"] == "global", "fedavg", "none")
        part.insert(0, "run_dir", str(file.parent))
        # `diagnostics` changes no number, so it is not part of a run's identity: a finished run computed without
        # them is not rerun when it is switched on, and its diagnostics columns are missing, not zero
        part[DIAGNOSTICS_COMPUTED] = bool(configs[str(file.parent)].get("diagnostics", True))
        frames.append(part)
    df = pd.concat(frames, ignore_index=True, sort=False)
    check_seeds_of_one_config(df, configs)
    df["alpha"] = df["alpha"].astype(float)
    df["imbalance_ratio"] = df["imbalance_ratio"].astype(float)
    personalized = df["eval_mode"] == "personalized"
    df["acc"] = np.where(personalized, df["client_acc_mean"], df["test_acc"]).astype(float)
    return df.sort_values(["run_dir", "round"], kind="stable").reset_index(drop=True)


def collect_clients(df: pd.DataFrame) -> pd.DataFrame:
    """The per-client results of the runs in `df` (``<run_dir>/clients.parquet``: `CLIENT_COLUMNS`), joined with
    each run's setting keys and seeds. A run without the file has no per-client results (runs written before
    it existed, or without per-client test splits): it is left out, not an error; an unreadable file or one
    lacking columns is a `MetricsFileError` naming it."""
    keys = [k for k in RUN_KEYS if k in df.columns]
    firsts = df.drop_duplicates("run_dir").set_index("run_dir")[keys]
    frames = []
    for run_dir, info in firsts.iterrows():
        path = Path(run_dir) / CLIENTS
        if not path.is_file():
            continue
        try:
            part = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported by name
            raise MetricsFileError(f"cannot read per-client results {path}: {err}") from None
        absent = [c for c in CLIENT_COLUMNS if c not in part.columns]
        if absent:
            raise MetricsFileError(f"per-client results {path} lack column(s) {', '.join(absent)}; "
                                   f"regenerate {run_dir}")
        if part.empty:
            continue
        if set(part["run_id"].astype(str)) != {str(info["run_id"])}:
            raise MetricsFileError(f"per-client results {path} belong to another run (run_id "
                                   f"{sorted(set(part['run_id'].astype(str)))[0]}, metrics say {info['run_id']})")
        part = part[list(CLIENT_COLUMNS)].copy()
        for k in keys:
            if k != "run_id":
                part[k] = info[k]
        part.insert(0, "run_dir", run_dir)
        frames.append(part)
    if not frames:
        return pd.DataFrame(columns=["run_dir", *CLIENT_COLUMNS, *[k for k in keys if k != "run_id"]])
    return pd.concat(frames, ignore_index=True, sort=False)


def domain_columns(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith(DOMAIN_PREFIX) and df[c].notna().any())


# ====================================================================== reporting rules
def _check_rule(rule: str, last_k: int) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown reporting rule {rule!r}; accepted: {', '.join(RULES)}")
    if rule == "last_k" and (isinstance(last_k, bool) or not isinstance(last_k, (int, np.integer)) or last_k < 1):
        raise ValueError(f"last_k must be a positive integer, got {last_k!r}")


def rule_text(rule: str, last_k: int = 5) -> str:
    """How the rule reads in a caption: 'final round', 'mean of the last 5 rounds', 'best round'."""
    _check_rule(rule, last_k)
    if rule == "final":
        return "final round"
    if rule == "best":
        return "best round"
    return "mean of the last round" if last_k == 1 else f"mean of the last {last_k} rounds"


def accuracy_caption(rule: str, last_k: int = 5, n: int | None = None) -> str:
    """'Accuracy (%) of the final round, mean ± std over seeds' (or '... as the mean of the last 5 rounds ...')."""
    how = f"as the {rule_text(rule, last_k)}" if rule == "last_k" else f"of the {rule_text(rule, last_k)}"
    if n == 1:  # one seed has no spread: no ± (cells with more seeds state their n)
        return f"Accuracy (%) {how}, 1 seed (n stated where it differs)"
    seeds = "over seeds" if not n else f"over {n} seeds (n stated where it differs)"
    return f"Accuracy (%) {how}, mean ± std {seeds}"


def select_rounds(run: pd.DataFrame, rule: str, last_k: int = 5) -> pd.DataFrame:
    """The evaluated rounds of one run that its reported number is taken over."""
    _check_rule(rule, last_k)
    ev = run[run["acc"].notna()].sort_values("round")
    if ev.empty:
        return ev
    if rule == "final":
        return ev.tail(1)
    if rule == "last_k":
        return ev.tail(int(last_k))
    return ev.loc[[ev["acc"].idxmax()]]


def summarize_runs(df: pd.DataFrame, rule: str = "final", last_k: int = 5) -> pd.DataFrame:
    """One row per run: identifiers, status, the rule's accuracy (fraction, NaN unless finished), communication."""
    _check_rule(rule, last_k)
    domains = domain_columns(df)
    rows = []
    for run_dir, run in df.groupby("run_dir", sort=True):
        run = run.sort_values("round")
        first = run.iloc[0]
        row = {k: first[k] for k in RUN_KEYS}
        statuses = set(run["status"])
        status = "diverged" if "diverged" in statuses else ("finished" if statuses == {"finished"}
                                                            else ",".join(sorted(statuses)))
        row.update(run_dir=run_dir, status=status, rounds=int(run["round"].max()),
                   diverged_round=int(run["round"].max()) if status == "diverged" else pd.NA,
                   rule=rule, last_k=int(last_k) if rule == "last_k" else pd.NA)
        chosen = select_rounds(run, rule, last_k) if status == "finished" else run.iloc[0:0]
        if status == "finished" and chosen.empty:
            row["status"] = "not evaluated"
        if rule == "best":
            row["acc"] = float(chosen["acc"].max()) if len(chosen) else math.nan
        else:
            row["acc"] = float(chosen["acc"].mean()) if len(chosen) else math.nan
        row["acc_rounds"] = " ".join(str(int(r)) for r in chosen["round"])
        row["has_domains"] = bool(domains) and bool(run[domains].notna().any().any())
        for col in domains:
            row[col] = float(chosen[col].mean()) if len(chosen) and chosen[col].notna().any() else math.nan
        if domains:  # the feature-shift "Avg": unweighted mean over the domains this run recorded
            values = [row[c] for c in domains if math.isfinite(row[c])]
            row[DOMAIN_AVG] = float(np.mean(values)) if values else math.nan
        up, down = run["bytes_up"].astype(float), run["bytes_down"].astype(float)
        row["mb_up_per_round"] = up.mean() / MB
        row["mb_down_per_round"] = down.mean() / MB
        row["mb_total"] = (up.sum() + down.sum()) / MB
        for col, name in TIME_COLUMNS.items():  # measured seconds per round (all rounds the run recorded)
            row[name] = float(run[col].astype(float).mean()) if col in run and run[col].notna().any() else math.nan
        # the spread over clients (personalized): the std of the clients' accuracies at the rule's rounds
        std = chosen["client_acc_std"].astype(float) if len(chosen) else pd.Series(dtype=float)
        row["client_std"] = float(std.mean()) if std.notna().any() else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    out["diverged_round"] = out["diverged_round"].astype("Int64")
    out["last_k"] = out["last_k"].astype("Int64")
    return out


# ====================================================================== settings

def _aggregation_of(summary: pd.DataFrame, method: str, variant: str) -> str | None:
    if "aggregation" not in summary.columns:
        return None
    values = summary.loc[(summary["method"] == method) & (summary["variant"] == variant), "aggregation"].dropna()
    return str(values.iloc[0]) if len(values) else None


def _shows_aggregation(summary: pd.DataFrame) -> bool:
    """Whether the rows need an Aggregation column: a method among them declares a choice of it."""
    return shows_aggregation(sorted(set(summary["method"]))) if len(summary) else False



def format_cell(mean: float, std: float, n: int, n_diverged: int, diverged_rounds: Sequence[int],
                n_default: int | None = None) -> str:
    """'61.20 ± 1.30', '61.20 ± 1.30 (n=2, 1 diverged)', '61.20 (n=1)', 'diverged (round 7)' (percent in)."""
    if n == 0:
        if n_diverged:
            rounds = sorted(set(int(r) for r in diverged_rounds))
            return f"diverged (round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))})"
        return "–"
    text = f"{mean:.2f}" if n == 1 or not math.isfinite(std) else f"{mean:.2f} ± {std:.2f}"
    notes = []
    if n_diverged or n == 1 or (n_default is not None and n != n_default):
        notes.append(f"n={n}")
    if n_diverged:
        notes.append(f"{n_diverged} diverged")
    return text + (f" ({', '.join(notes)})" if notes else "")


def summarize(df: pd.DataFrame, rule: str = "final", last_k: int = 5, *, runs: pd.DataFrame | None = None
              ) -> pd.DataFrame:
    """One row per setting: mean/std (percent, ddof=1) over finished seeds, n, diverged seeds, a cell text.

    `df` is the tidy table from `collect` (or pass the per-run table as `runs`).
    """
    runs = summarize_runs(df, rule, last_k) if runs is None else runs
    domains = [c for c in runs.columns if c.startswith(DOMAIN_PREFIX) or c == DOMAIN_AVG]
    rows = []
    for _, grp in runs.groupby(list(SETTING_KEYS), dropna=False, sort=False):
        first = grp.iloc[0]
        ok = grp[grp["status"] == "finished"]
        div = grp[grp["status"] == "diverged"]
        acc = ok["acc"].to_numpy(float) * 100
        row = {k: first[k] for k in SETTING_KEYS}
        row.update(n=len(ok), n_diverged=len(div), n_runs=len(grp),
                   diverged_rounds=" ".join(str(int(r)) for r in sorted(div["diverged_round"])),
                   acc_mean_pct=float(acc.mean()) if len(acc) else math.nan,
                   acc_std_pct=float(acc.std(ddof=1)) if len(acc) > 1 else math.nan,
                   seeds=" ".join(f"{int(s)}/{int(p)}" for s, p in sorted(zip(ok["seed"], ok["partition_seed"]))),
                   # the fewest rounds a finished seed's number is taken over (last_k: fewer than k when a run
                   # has fewer evaluated rounds; the caption says so)
                   rounds_taken_min=min((len(str(x).split()) for x in ok["acc_rounds"]), default=0)
                   if "acc_rounds" in ok else 0)
        row["has_domains"] = bool(grp["has_domains"].any()) if "has_domains" in grp else False
        basis = ok if len(ok) else grp
        row["mb_up_per_round"] = float(basis["mb_up_per_round"].mean())
        row["mb_down_per_round"] = float(basis["mb_down_per_round"].mean())
        row["mb_total"] = float(ok["mb_total"].mean()) if len(ok) else math.nan
        for name in TIME_COLUMNS.values():
            row[name] = float(basis[name].mean()) if name in basis and basis[name].notna().any() else math.nan
        spread = ok["client_std"].dropna().to_numpy(float) * 100 if "client_std" in ok else np.array([])
        row["client_std_mean_pct"] = float(spread.mean()) if len(spread) else math.nan
        row["client_std_std_pct"] = float(spread.std(ddof=1)) if len(spread) > 1 else math.nan
        for col in domains:
            vals = ok[col].dropna().to_numpy(float) * 100
            row[col + "_mean_pct"] = float(vals.mean()) if len(vals) else math.nan
            row[col + "_std_pct"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    conds = [cond_of(r) for _, r in out.iterrows()]
    out["setting"] = condition_labels(conds)
    out["setting_slug"] = [condition_slug(c) for c in conds]
    out["cell"] = [format_cell(r.acc_mean_pct, r.acc_std_pct, r.n, r.n_diverged,
                               [int(x) for x in r.diverged_rounds.split()]) for r in out.itertuples()]
    order = sorted(range(len(out)), key=lambda i: (sort_key_condition(conds[i]),
                                                   sort_key_method(out["method"].iloc[i], out["variant"].iloc[i])))
    return out.iloc[order].reset_index(drop=True)


# ====================================================================== tables
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "ρ": r"$\rho$", "α": r"$\alpha$", "Δ": r"$\Delta$", "–": "--", "−": "-",
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _md_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


@dataclass
class Table:
    """A caption, a header row and text cells; `bold` holds (row, column) positions."""

    name: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    align: str = ""

    def _align(self) -> str:
        return self.align or ("l" + "c" * (len(self.header) - 1))

    def markdown(self) -> str:
        lines = [f"Table: {_md_escape(self.caption)}", ""]
        lines.append("| " + " | ".join(_md_escape(h) for h in self.header) + " |")
        spec = {"l": ":---", "c": ":---:", "r": "---:"}
        lines.append("|" + "|".join(spec[a] for a in self._align()) + "|")
        for i, row in enumerate(self.rows):
            cells = [f"**{_md_escape(c)}**" if (i, j) in self.bold else _md_escape(c) for j, c in enumerate(row)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(self.caption)}}}",
                 rf"\label{{tab:{re.sub(r'[^A-Za-z0-9]+', '-', self.name)}}}",
                 rf"\begin{{tabular}}{{{self._align()}}}", r"\toprule",
                 " & ".join(latex_escape(h) for h in self.header) + r" \\", r"\midrule"]
        for i, row in enumerate(self.rows):
            cells = [rf"\textbf{{{latex_escape(c)}}}" if (i, j) in self.bold else latex_escape(c)
                     for j, c in enumerate(row)]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        buf.write("# " + self.caption.replace("\n", " ") + "\n")
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buf.getvalue()

    def write(self, out_dir: Path) -> list[Path]:
        paths = []
        for ext, text in (("md", self.markdown()), ("tex", self.latex()), ("csv", self.csv())):
            path = Path(out_dir) / f"{self.name}.{ext}"
            atomic_write_text(path, text)
            paths.append(path)
        return paths


KINDS = ("comparison", "ablation")  # an experiment's tables: methods compared, or variants against their default
WEIGHTED_COLUMN = "client_acc_weighted"  # personalized accuracy, sample-weighted (written by newer runs)


def accuracy_text(eval_modes: Iterable[str], weighted: bool = False) -> str:
    """Which accuracy a table shows, per evaluation mode present (every caption states it)."""
    modes = set(eval_modes)
    parts = []
    if "global" in modes or not modes:
        parts.append("global mode: the test accuracy of the global model on the global test set")
    if "personalized" in modes:
        parts.append("personalized mode: " + (
            "sample-weighted accuracy, total correct over total local test samples of all clients (HtFLlib's "
            "convention)" if weighted else
            "the mean over clients of each client's accuracy on its own local test split"))
    return "Accuracy shown: " + "; ".join(parts) + "."


def _caption(what: str, rule: str, last_k: int, n_mode: int | None, extra: str = "", *,
             summary: pd.DataFrame | None = None, weighted: bool = False, protocol: str = "") -> str:
    text = f"{what} {accuracy_caption(rule, last_k, n_mode)}."
    text += _short_runs_note(summary, rule, last_k)
    if summary is not None:
        text += " " + accuracy_text(summary["eval_mode"] if len(summary) else (), weighted)
    if protocol:
        text += f" Protocol: {protocol.strip().rstrip('.')}."
    text += " Diverged seeds are excluded from the mean and stated."
    return text + (f" {extra}" if extra else "")


def _short_runs_note(summary: pd.DataFrame | None, rule: str, last_k: int) -> str:
    """Under last_k, what was averaged where a run had fewer evaluated rounds than k ('' when none had)."""
    if rule != "last_k" or summary is None or "rounds_taken_min" not in summary or not len(summary):
        return ""
    short = summary[(summary["n"] > 0) & (summary["rounds_taken_min"] < last_k)]
    if short.empty:
        return ""
    cells = [f"{method_label(r.method, r.variant, getattr(r, 'aggregation', None))}, {r.setting}: "
             f"{int(r.rounds_taken_min)}" for r in short.itertuples()]
    listed = "; ".join(cells[:4]) + (f"; and {len(cells) - 4} more" if len(cells) > 4 else "")
    return (f" Runs with fewer than {last_k} evaluated rounds are the mean of all their evaluated rounds "
            f"(fewest per cell: {listed}).")


def _n_mode(summary: pd.DataFrame) -> int | None:
    ns = summary.loc[summary["n"] > 0, "n"]
    return int(ns.mode().max()) if len(ns) else None


def _conditions(summary: pd.DataFrame) -> list[tuple[tuple, str]]:
    seen: dict[tuple, str] = {}
    for _, r in summary.iterrows():
        seen.setdefault(cond_id(cond_of(r)), r["setting"])
    return list(seen.items())


def _cell_texts(summary: pd.DataFrame, n_mode: int | None) -> dict[tuple, tuple[str, float]]:
    out = {}
    for _, r in summary.iterrows():
        text = format_cell(r.acc_mean_pct, r.acc_std_pct, int(r.n), int(r.n_diverged),
                           [int(x) for x in str(r.diverged_rounds).split()], n_mode)
        out[(r.method, r.variant, cond_id(cond_of(r)))] = (text, r.acc_mean_pct)
    return out


def _matrix(summary: pd.DataFrame, methods: list[tuple[str, str]], conds: list[tuple[tuple, str]],
            n_mode: int | None) -> tuple[list[list[str]], list[list[float]]]:
    cells = _cell_texts(summary, n_mode)
    texts, means = [], []
    for m, v in methods:
        row_t, row_m = [], []
        for cid, _ in conds:
            text, mean = cells.get((m, v, cid), ("–", math.nan))
            row_t.append(text)
            row_m.append(mean)
        texts.append(row_t)
        means.append(row_m)
    return texts, means


def _bold_best(means: list[list[float]], col_offset: int = 1) -> set[tuple[int, int]]:
    bold = set()
    if not means:
        return bold
    for j in range(len(means[0])):
        col = [round(row[j], 2) if math.isfinite(row[j]) else -math.inf for row in means]
        best = max(col)
        if best == -math.inf:
            continue
        bold |= {(i, j + col_offset) for i, v in enumerate(col) if v == best}
    return bold


def _methods(summary: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = {(r.method, r.variant) for r in summary.itertuples()}
    return sorted(pairs, key=lambda p: sort_key_method(*p))


def _methods_with_default(summary: pd.DataFrame) -> set[str]:
    return {r.method for r in summary.itertuples() if r.variant == "default"}


def _notes_of(summary: pd.DataFrame) -> str:
    """The method notes that the rows of `summary` need (`fedhpro.labels.method_notes`)."""
    if summary is None or not len(summary):
        return ""
    aggs = summary["aggregation"] if "aggregation" in summary else [None] * len(summary)
    return method_notes([(m, v, None if a is None or a != a else str(a))
                         for m, v, a in zip(summary["method"], summary["variant"], aggs)],
                        personalized=bool((summary["eval_mode"] == "personalized").any()))


def main_table(summary: pd.DataFrame, rule: str, last_k: int, *, name: str = "main", title: str = "",
               protocol: str = "", weighted: bool = False, notes: str = "") -> Table:
    """Rows = methods (+ variant), columns = settings, best mean per column in bold.

    FedHPro's ablation variants are left to the ablation table (as in the paper) when its default ran
    (`fedhpro.labels.is_main_row`); other methods' variants (e.g. a FedProx mu sweep) stay here.
    `weighted`: the summary holds the sample-weighted personalized accuracy (the caption says so).
    `notes`: the experiment's method notes (`build_tables` gives them to its first table only).
    """
    n_mode = _n_mode(summary)
    conds = _conditions(summary)
    with_default = _methods_with_default(summary)
    methods = [(m, v) for m, v in _methods(summary) if is_main_row(m, v, with_default)]
    texts, means = _matrix(summary, methods, conds, n_mode)
    rows = [[method_label(m, v, _aggregation_of(summary, m, v))] + t for (m, v), t in zip(methods, texts)]
    extra = "Best mean per column in bold." + (f" {notes}" if notes else "")
    what = f"{title.strip().rstrip('.')}." if title else "Main comparison."
    return Table(name, _caption(what, rule, last_k, n_mode, extra, summary=summary, weighted=weighted,
                                protocol=protocol),
                 ["Method"] + [label for _, label in conds], rows, _bold_best(means))


def ablation_rows(summary: pd.DataFrame, kind: str = "comparison") -> list[tuple[str, str]]:
    """The (method, variant) rows of the ablation table, defaults first per method.

    ``comparison``: every variant of the methods that have variants outside the main table (FedHPro's
    ablations, `fedhpro.labels.is_main_row`). ``ablation`` (an experiment of ablations): every variant of
    every method that has more than its default.
    """
    pairs = _methods(summary)
    with_default = _methods_with_default(summary)
    if kind == "ablation":
        methods = {m for m, v in pairs if v != "default"}
    else:
        methods = {m for m, v in pairs if not is_main_row(m, v, with_default)}
    return [(m, v) for m, v in pairs if m in methods]


def _with_cid(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(_cid=[cond_id(cond_of(r)) for r in frame[list(CONDITION_KEYS)].to_dict("records")])


def _ablation_delta(runs: pd.DataFrame | None, summary: pd.DataFrame, method: str, variant: str,
                    conds: list[tuple[tuple, str]]) -> tuple[str, dict | None]:
    """(reference variant, Δ over the settings) of one ablation row; ('', None) for a reference row itself.
    `summary` and `runs` carry a ``_cid`` column (`_with_cid`)."""
    parts, ref_name = [], ""
    for cid, _ in conds:
        here = summary[(summary["method"] == method) & (summary["_cid"] == cid)]
        aggs = {r.variant: getattr(r, "aggregation", None) for r in here.itertuples()}
        if variant not in aggs:
            continue
        ref = reference_variant(variant, aggs[variant], aggs)
        if ref is None:
            return "", None
        ref_name = ref
        if runs is None or runs.empty:
            continue
        mine = runs[(runs["method"] == method) & (runs["_cid"] == cid)]
        parts.append(paired_delta(mine[mine["variant"] == variant], mine[mine["variant"] == ref]))
    return ref_name, combine_deltas(parts)


def ablation_table(summary: pd.DataFrame, rule: str, last_k: int, *, kind: str = "comparison", title: str = "",
                   protocol: str = "", runs: pd.DataFrame | None = None, notes: str = "") -> Table:
    """Each ablated method's variants against its default of the same aggregation, per setting, with Δ.

    Δ: the mean over the settings of the mean paired difference (variant minus reference, seed by seed, in
    points), ± its standard error; "(noise)" when |Δ| < `NOISE_SE` x SE. `runs`: the per-run table
    (`summarize_runs`) the pairs are taken from.
    """
    rows_of = ablation_rows(summary, kind)
    methods = list(dict.fromkeys(m for m, _ in rows_of))
    names = ", ".join(method_name(m) for m in methods) or method_name(proposed_method() or "")
    what = f"{title.strip().rstrip('.')}." if title else f"Ablation of {names}."
    extra = (f"Δ: the variant minus its reference (the same method's default under the same aggregation), seed "
             f"by seed, in points, averaged over the settings where both finished, ± its standard error over "
             f"seeds; \"(noise)\": |Δ| < {NOISE_SE:g} SE, a difference the seeds do not resolve; \"no SE\": a "
             "single seed pair, so the noise is unknown. Best mean per column in bold.")
    keys = set(rows_of)
    ours = summary[[(r.method, r.variant) in keys for r in summary.itertuples()]] if len(summary) else summary
    variant_conds = {cond_id(cond_of(r)) for _, r in ours.iterrows() if r["variant"] != "default"}
    ours = ours[[cond_id(cond_of(r)) in variant_conds for _, r in ours.iterrows()]] if len(ours) else ours
    if ours.empty:
        extra = "No non-default variants were found. " + extra
        return Table("ablation", _caption(what, rule, last_k, None, extra, protocol=protocol),
                     ["Variant", "Δ vs default"], [])
    n_mode = _n_mode(ours)
    conds = _conditions(ours)
    rows_of = [(m, v) for m, v in rows_of if ((ours["method"] == m) & (ours["variant"] == v)).any()]
    texts, means = _matrix(ours, rows_of, conds, n_mode)
    several = len({m for m, _ in rows_of}) > 1
    show_aggregation = _shows_aggregation(ours)  # a method with a choice of it (FedHPro: last_client, fedavg)
    rows = []
    keyed_runs = _with_cid(runs) if runs is not None and len(runs) else None
    keyed = _with_cid(ours)
    for (m, v), t in zip(rows_of, texts):
        ref, delta = _ablation_delta(keyed_runs, keyed, m, v, conds)
        if delta is None:
            cell = "reference"
        elif not ref:
            cell = "–"
        else:
            cell = delta_text(delta) + ("" if ref == "default" else f" vs {ref}")
        aggregation = _aggregation_of(ours, m, v)
        agg_cell = [aggregation_name(aggregation) or aggregation or "–"] if show_aggregation else []
        rows.append(([method_name(m)] if several else []) + [v] + agg_cell + t + [cell])
    if show_aggregation:
        extra += " Aggregation: how each row's global model was formed."
    extra += f" {notes}" if notes else ""
    lead = (["Method"] if several else []) + ["Variant"] + (["Aggregation"] if show_aggregation else [])
    return Table("ablation", _caption(what, rule, last_k, n_mode, extra, summary=ours, protocol=protocol),
                 lead + [label for _, label in conds] + ["Δ vs default"], rows,
                 _bold_best(means, col_offset=len(lead)))


def _fmt_mb(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4f}"


def _fmt_sec(x: float) -> str:
    return "–" if not math.isfinite(x) else (f"{x:.2f}" if x >= 0.1 else f"{x:.3f}")


def mb_to_target(df: pd.DataFrame, summary: pd.DataFrame) -> dict[tuple, dict]:
    """Per setting: the target accuracy (`TARGET_FRACTION` x the median reported accuracy of its rows, %) and, per
    (method, variant), the cumulative MB (up + down) at the first evaluated round whose accuracy reached it,
    mean over the finished seeds that reached it: ``{cond_id: {"target": %, (method, variant): (mb, reached, n)}}``."""
    out: dict[tuple, dict] = {}
    if df.empty or summary.empty:
        return out
    df = df.sort_values(["run_dir", "round"], kind="stable")
    cum = (df["bytes_up"].astype(float) + df["bytes_down"].astype(float)).groupby(df["run_dir"]).cumsum() / MB
    df = df.assign(_mb=cum)
    finished = df.groupby("run_dir")["status"].agg(lambda s: set(s) == {"finished"})
    for _, grp in summary.groupby(list(CONDITION_KEYS), dropna=False, sort=False):
        cid = cond_id(cond_of(grp.iloc[0]))
        accs = grp["acc_mean_pct"].dropna()
        if accs.empty:
            continue
        target = TARGET_FRACTION * float(accs.median())
        entry: dict = {"target": target}
        rows = df[[cond_id(cond_of(r)) == cid for r in df[list(CONDITION_KEYS)].to_dict("records")]]
        for (m, v), runs in rows.groupby(["method", "variant"], sort=False):
            reached, n = [], 0
            for run_dir, run in runs.groupby("run_dir", sort=False):
                if not finished.get(run_dir, False):
                    continue
                n += 1
                hit = run[run["acc"].astype(float) * 100 >= target]
                if len(hit):
                    reached.append(float(hit["_mb"].iloc[0]))
            entry[(m, v)] = (float(np.mean(reached)) if reached else math.nan, len(reached), n)
        out[cid] = entry
    return out


def _upload_ratio_note(summary: pd.DataFrame) -> str:
    """FedHPro's upload per round against the prototype baselines' (measured bytes), per setting."""
    proposed = proposed_method()
    baselines = [m for m in method_order() if declared(m).compare_upload and (summary["method"] == m).any()]
    ours = summary[(summary["method"] == proposed) & (summary["variant"] == "default")]
    if proposed is None or ours.empty or not baselines or not declared(proposed).upload_note:
        return ""
    parts = []
    for _, r in ours.iterrows():
        cid = cond_id(cond_of(r))
        same = summary[[cond_id(cond_of(x)) == cid for _, x in summary.iterrows()]]
        base = same[same["method"].isin(baselines) & (same["variant"] == "default")]
        if base.empty or not base["mb_up_per_round"].gt(0).all():
            continue
        ratio = r["mb_up_per_round"] / base["mb_up_per_round"]
        parts.append(f"{r['setting']}: {ratio.min():.1f}-{ratio.max():.1f}x" if ratio.max() - ratio.min() >= 0.05
                     else f"{r['setting']}: {ratio.min():.1f}x")
    if not parts:
        return ""
    names = ", ".join(method_name(m) for m in baselines)
    return (f"{declared(proposed).upload_note} Its upload per round over the prototype baselines' ({names}), "
            "measured here: " + "; ".join(parts)
            + (" (in global mode both also upload the whole model, which dilutes the ratio)."
               if (ours["eval_mode"] == "global").any() else "."))


def communication_table(summary: pd.DataFrame, rule: str, last_k: int, *, df: pd.DataFrame | None = None,
                        notes: str = "") -> Table:
    """Per setting and method: MB up / down per round, MB in total, MB to reach a target accuracy, measured
    seconds per round (clients' local training, server step) and accuracy."""
    n_mode = _n_mode(summary)
    targets = mb_to_target(df, summary) if df is not None else {}
    rows = []
    for _, r in summary.iterrows():
        acc = format_cell(r.acc_mean_pct, r.acc_std_pct, int(r.n), int(r.n_diverged),
                          [int(x) for x in str(r.diverged_rounds).split()], n_mode)
        entry = targets.get(cond_id(cond_of(r)), {})
        mb, reached, n = entry.get((r.method, r.variant), (math.nan, 0, 0))
        if not n:
            to_target = "–"
        elif not reached:
            to_target = "not reached"
        else:
            to_target = _fmt_mb(mb) + ("" if reached == n else f" ({reached}/{n} seeds)")
        rows.append([r.setting, method_label(r.method, r.variant, getattr(r, "aggregation", None)),
                     _fmt_mb(r.mb_up_per_round), _fmt_mb(r.mb_down_per_round), _fmt_mb(r.mb_total),
                     f"{entry['target']:.1f}" if "target" in entry else "–", to_target,
                     _fmt_sec(getattr(r, "sec_client_per_round", math.nan)),
                     _fmt_sec(getattr(r, "sec_server_per_round", math.nan)), acc])
    extra = ("Up/Down: MB (10^6 bytes) sent by all participating clients to the server and back, per round "
             "(mean over rounds and seeds); Total: up + down over the whole run (mean over finished seeds). "
             f"To target: cumulative MB (up + down) at the first evaluated round whose accuracy reached the "
             f"setting's target ({TARGET_FRACTION:.0%} of the median accuracy of the setting's rows, Target column), "
             "mean over the seeds that reached it (their number stated when not all did). Client s / Server s: "
             "measured wall-clock seconds per round of all sampled clients' local training and of the server "
             "step, mean over rounds and seeds (one process; not comparable across machines).")
    ratio = _upload_ratio_note(summary)
    extra += (f" {ratio}" if ratio else "") + (f" {notes}" if notes else "")
    return Table("communication", _caption("Communication and compute.", rule, last_k, n_mode, extra,
                                           summary=summary),
                 ["Setting", "Method", "Up (MB/round)", "Down (MB/round)", "Total (MB)", "Target (%)",
                  "To target (MB)", "Client s/round", "Server s/round", "Accuracy (%)"], rows,
                 align="llrrrrrrrc")


def clients_table(summary: pd.DataFrame, rule: str, last_k: int, clients: pd.DataFrame | None = None, *,
                  runs: pd.DataFrame | None = None, notes: str = "") -> Table | None:
    """Personalized settings: per method, the mean client accuracy, the spread over clients (std) and the
    mean of the worst 10% of clients (from ``clients.parquet``; '–' for runs without it), each mean ± std over
    seeds, at the reporting rule's rounds. None without personalized rows."""
    from fedhpro.figures import WORST_FRACTION, worst_mean

    sub = summary[summary["eval_mode"] == "personalized"] if len(summary) else summary
    if sub.empty:
        return None
    n_mode = _n_mode(sub)
    worst: dict[tuple, list[float]] = {}
    if clients is not None and len(clients) and runs is not None and len(runs):
        chosen = {r.run_id: {int(x) for x in str(r.acc_rounds).split()} for r in runs.itertuples()
                  if r.status == "finished"}
        for run_id, grp in clients.groupby("run_id", sort=False):
            rounds = chosen.get(run_id)
            if not rounds:
                continue
            per_round = [worst_mean(g["client_acc"].to_numpy(float)) for rnd, g in grp.groupby("round")
                         if int(rnd) in rounds]
            if per_round:
                first = grp.iloc[0]
                key = (first["method"], first["variant"], cond_id(cond_of(first)))
                worst.setdefault(key, []).append(float(np.mean(per_round)) * 100)
    rows = []
    for _, r in sub.iterrows():
        diverged = [int(x) for x in str(r.diverged_rounds).split()]
        acc = format_cell(r.acc_mean_pct, r.acc_std_pct, int(r.n), int(r.n_diverged), diverged, n_mode)
        spread = (format_cell(r.client_std_mean_pct, r.client_std_std_pct, int(r.n), 0, [], n_mode)
                  if r.n and math.isfinite(getattr(r, "client_std_mean_pct", math.nan)) else "–")
        w = np.array(worst.get((r.method, r.variant, cond_id(cond_of(r))), []))
        low = (format_cell(float(w.mean()), float(w.std(ddof=1)) if len(w) > 1 else math.nan, len(w), 0, [],
                           n_mode) if len(w) else "–")
        rows.append([r.setting, method_label(r.method, r.variant, getattr(r, "aggregation", None)), acc, spread, low])
    extra = (f"Per personalized setting and method: Mean: the mean over clients of each client's accuracy on its "
             f"local test split; Client std: the standard deviation of the clients' accuracies (points); Worst "
             f"{WORST_FRACTION:.0%}: the mean accuracy of the worst {WORST_FRACTION:.0%} of clients (at least one), "
             "from the per-client results ('–' where the runs wrote none); each at the reporting rule's rounds, "
             "mean ± std over seeds.") + (f" {notes}" if notes else "")
    return Table("clients", _caption("Spread over clients.", rule, last_k, n_mode, extra, summary=sub),
                 ["Setting", "Method", "Mean (%)", "Client std (points)", f"Worst {WORST_FRACTION:.0%} (%)"], rows,
                 align="llccc")


def domains_table(summary: pd.DataFrame, rule: str, last_k: int, *, notes: str = "") -> Table | None:
    """Per setting and method: accuracy per domain (global test set split by domain), when recorded."""
    cols = sorted(c[:-len("_mean_pct")] for c in summary.columns
                  if c.startswith(DOMAIN_PREFIX) and c.endswith("_mean_pct"))
    if not cols or not summary["has_domains"].any():
        return None
    with_domains = {cond_id(cond_of(r)) for _, r in summary[summary["has_domains"]].iterrows()}
    sub = summary[[cond_id(cond_of(r)) in with_domains for _, r in summary.iterrows()]]
    if sub.empty:
        return None
    n_mode = _n_mode(sub)
    rows = []
    for _, r in sub.iterrows():
        cells = []
        for c in cols:
            cells.append(format_cell(r[c + "_mean_pct"], r[c + "_std_pct"], int(r.n),
                                     int(r.n_diverged), [int(x) for x in str(r.diverged_rounds).split()], n_mode)
                         if r.n == 0 or math.isfinite(r[c + "_mean_pct"]) else "–")
        overall = format_cell(r.acc_mean_pct, r.acc_std_pct, int(r.n), int(r.n_diverged),
                              [int(x) for x in str(r.diverged_rounds).split()], n_mode)
        avg = (format_cell(r[DOMAIN_AVG + "_mean_pct"], r[DOMAIN_AVG + "_std_pct"], int(r.n), int(r.n_diverged),
                           [int(x) for x in str(r.diverged_rounds).split()], n_mode)
               if r.n == 0 or math.isfinite(r[DOMAIN_AVG + "_mean_pct"]) else "–")
        rows.append([r.setting, method_label(r.method, r.variant, getattr(r, "aggregation", None))] + cells
                    + [avg, overall])
    extra = ("Each domain's accuracy is taken over the same rounds as the overall one. Avg: the unweighted mean "
             "of the per-domain accuracies (per seed, then over seeds); All: the accuracy on all domains' test "
             "samples together. Domains used: " + ", ".join(c[len(DOMAIN_PREFIX):] for c in cols)
             + " (a run without a domain's column was configured without it).") + (f" {notes}" if notes else "")
    return Table("domains", _caption("Per-domain accuracy.", rule, last_k, n_mode, extra, summary=sub),
                 ["Setting", "Method"] + [c[len(DOMAIN_PREFIX):] for c in cols] + ["Avg", "All"], rows,
                 align="ll" + "c" * (len(cols) + 2))


DIAGNOSTIC_HEADERS = {  # table headers of fedhpro.diagnostics.DIAGNOSTIC_COLUMNS (definitions: docs/diagnostics.md)
    "proto_sep_mean_deg": "Sep. mean (°)", "proto_sep_min_deg": "Sep. min (°)", "proto_consistency": "Cons. raw",
    "proto_cons_centred": "Cons. centred", "proto_margin": "Margin", "proto_nearest": "Nearest own",
    "proto_agree": "Agree", "proto_agree_nearest": "Agree nearest"}


DIAGNOSTICS_COMPUTED = "diagnostics_computed"  # `collect`'s column: the run's recorded config's `diagnostics`
NOT_COMPUTED = "not computed"


def diagnostics_table(df: pd.DataFrame, summary: pd.DataFrame) -> Table | None:
    """Per setting and method: each prototype diagnostic (`fedhpro.diagnostics.DIAGNOSTIC_COLUMNS`) at the
    final evaluated round, mean ± sd over finished seeds; None when no run recorded any."""
    from fedhpro.diagnostics import DIAGNOSTIC_COLUMNS

    cols = [c for c in DIAGNOSTIC_COLUMNS if c in df.columns and df[c].notna().any()]
    if not cols or summary.empty:
        return None
    finals: dict[tuple, list[pd.Series]] = {}
    for _, run in df[df["status"] == "finished"].groupby("run_dir", sort=True):
        evaluated = run[run["acc"].notna()] if "acc" in run else run
        if evaluated.empty:
            continue
        last = evaluated.loc[evaluated["round"].idxmax()]
        finals.setdefault(tuple(str(last[k]) for k in SETTING_KEYS), []).append(last)
    rows = []
    for _, r in summary.iterrows():
        every = finals.get(tuple(str(r[k]) for k in SETTING_KEYS), [])
        runs = [x for x in every if bool(x.get(DIAGNOSTICS_COMPUTED, True))]
        missing = f"; {len(every) - len(runs)} not computed" if len(runs) < len(every) else ""
        cells = []
        for c in cols:
            vals = np.array([float(x[c]) for x in runs], dtype=float)
            vals = vals[np.isfinite(vals)]
            digits = 1 if c.endswith("_deg") else 2
            if every and not runs:
                cells.append(NOT_COMPUTED)
            elif not len(vals):
                cells.append("–")
            elif len(vals) == 1 or missing:
                cells.append(f"{vals.mean():.{digits}f}" + (f" ± {vals.std(ddof=1):.{digits}f}" if len(vals) > 1
                                                            else "") + f" (n={len(vals)}{missing})")
            else:
                cells.append(f"{vals.mean():.{digits}f} ± {vals.std(ddof=1):.{digits}f}")
        rows.append([r.setting, method_label(r.method, r.variant, getattr(r, "aggregation", None))] + cells)
    caption = ("Prototype diagnostics at the final evaluated round, mean ± sd over finished seeds (docs/"
               "diagnostics.md). Sep.: angles between the method's global class signals; Cons. raw: cosine of "
               "clients' class prototypes to them (fooled by offset and collapse); Cons. centred, Margin (own class "
               "minus best other), Nearest own (share of client prototypes nearest their own class; chance 1/C): "
               "the same after centring; Agree, Agree nearest: across-client agreement of same-class prototypes "
               "(no global signal needed; in global mode one shared model). – : not defined for the method.")
    if any(NOT_COMPUTED in cell for row in rows for cell in row[2:]):
        caption += f" {NOT_COMPUTED}: the run(s) had `diagnostics: false` (docs/run-identity.md)."
    return Table("diagnostics", caption, ["Setting", "Method"] + [DIAGNOSTIC_HEADERS.get(c, c) for c in cols],
                 rows, align="ll" + "c" * len(cols))


def with_weighted_accuracy(df: pd.DataFrame) -> pd.DataFrame | None:
    """The tidy table with ``acc`` = the sample-weighted accuracy of personalized runs, or None when no
    personalized run recorded it (metrics written before the column existed)."""
    if WEIGHTED_COLUMN not in df.columns:
        return None
    personalized = df["eval_mode"] == "personalized"
    if not (personalized & df[WEIGHTED_COLUMN].notna()).any():
        return None
    out = df[personalized].copy()
    out["acc"] = out[WEIGHTED_COLUMN].astype(float)
    return out


def build_tables(df: pd.DataFrame, rule: str = "final", last_k: int = 5, *,
                 summary: pd.DataFrame | None = None, kind: str = "comparison", title: str = "",
                 protocol: str = "", runs: pd.DataFrame | None = None,
                 clients: pd.DataFrame | None = None) -> list[Table]:
    """An experiment's tables.

    ``comparison``: main (+ ``main_weighted``: personalized runs by sample-weighted accuracy, when recorded),
    clients (personalized rows: spread over clients), ablation (FedHPro's non-main variants; always written
    for a config without experiments, else only when there are some), communication and (when recorded)
    per-domain accuracy. ``ablation``: the ablation table (every method's variants against its default) and
    communication. The method notes that explain the row names (`fedhpro.labels.method_notes`) are in the
    first table's caption only; the others point there. `runs`: the per-run table (`summarize_runs`);
    `clients`: the per-client results (`collect_clients`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown experiment kind {kind!r}; accepted: {', '.join(KINDS)}")
    runs = summarize_runs(df, rule, last_k) if runs is None else runs
    summary = summarize(df, rule, last_k, runs=runs) if summary is None else summary
    notes = _notes_of(summary)
    first = "ablation" if kind == "ablation" else "main"
    see = f"Row names as explained in the {first} table's caption." if notes else ""
    diag = diagnostics_table(df, summary)
    if kind == "ablation":
        return [ablation_table(summary, rule, last_k, kind=kind, title=title, protocol=protocol, runs=runs,
                               notes=notes),
                communication_table(summary, rule, last_k, df=df, notes=see)] + ([diag] if diag is not None else [])
    tables = [main_table(summary, rule, last_k, title=title, protocol=protocol, notes=notes)]
    weighted = with_weighted_accuracy(df)
    if weighted is not None:
        wsum = summarize(weighted, rule, last_k)
        what = (f"{title.strip().rstrip('.')}, " if title else "") + "personalized accuracy, sample-weighted."
        tables.append(main_table(wsum, rule, last_k, name="main_weighted", title=what[0].upper() + what[1:],
                                 protocol=protocol, weighted=True, notes=see))
    spread = clients_table(summary, rule, last_k, clients, runs=runs, notes=see)
    if spread is not None:
        tables.append(spread)
    if not title or ablation_rows(summary):
        tables.append(ablation_table(summary, rule, last_k, protocol=protocol, runs=runs, notes=see))
    tables.append(communication_table(summary, rule, last_k, df=df, notes=see))
    dom = domains_table(summary, rule, last_k, notes=see)
    return tables + ([dom] if dom is not None else []) + ([diag] if diag is not None else [])


def _frame_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n", float_format="%.10g")


def write_tables(df: pd.DataFrame, out_dir: str | Path, rule: str = "final", last_k: int = 5, *,
                 kind: str = "comparison", title: str = "", protocol: str = "",
                 clients: pd.DataFrame | None = None) -> list[Path]:
    """Write an experiment's tables (`build_tables`) as .md/.tex/.csv, runs.csv and settings.csv; return the paths."""
    _check_rule(rule, last_k)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = summarize_runs(df, rule, last_k)
    summary = summarize(df, rule, last_k, runs=runs)
    clients = collect_clients(df) if clients is None else clients
    paths: list[Path] = []
    for table in build_tables(df, rule, last_k, summary=summary, kind=kind, title=title, protocol=protocol,
                              runs=runs, clients=clients):
        paths += table.write(out_dir)
    atomic_write_text(out_dir / "runs.csv", _frame_csv(runs))
    atomic_write_text(out_dir / "settings.csv", _frame_csv(summary))
    return paths + [out_dir / "runs.csv", out_dir / "settings.csv"]


# ====================================================================== CLI
def build_parser() -> argparse.ArgumentParser:
    from fedhpro.cliutil import ArgumentParser

    p = ArgumentParser(prog="fedhpro aggregate",
                                description="Collect run metrics into tables (and figures).")
    p.add_argument("--runs", action="append", required=True,
                   help="run directory, metrics file or glob pattern (quote it; ** recurses); repeatable")
    p.add_argument("--out", required=True, help="directory for the tables")
    p.add_argument("--rule", choices=RULES, default="final", help="reporting rule (default: final)")
    p.add_argument("--last-k", type=int, default=5, help="k for --rule last_k (default: 5)")
    p.add_argument("--figures", default=None, help="also write figures into this directory")
    p.add_argument("--kind", choices=KINDS, default="comparison",
                   help="comparison: main table of methods; ablation: variants against their default")
    p.add_argument("--title", default="", help="the experiment's title (first words of the captions)")
    p.add_argument("--protocol", default="", help="the experiment's protocol, stated in the captions")
    return p


def last_k_warnings(df: pd.DataFrame, rule: str, last_k: int) -> list[str]:
    """A warning when `last_k` exceeds the evaluated rounds of some run (the caption would promise too much)."""
    if rule != "last_k" or df.empty:
        return []
    runs = summarize_runs(df, rule, last_k)  # what each finished run's number is taken over
    runs = runs[runs["status"] == "finished"]
    taken = pd.Series([len(str(x).split()) for x in runs["acc_rounds"]], index=runs["run_dir"], dtype=int)
    short = taken[taken < last_k].sort_values(kind="stable")
    if short.empty:
        return []
    listed = ", ".join(f"{d} ({n})" for d, n in short.head(3).items()) + (", ..." if len(short) > 3 else "")
    return [f"reporting rule last_k={last_k}, but {len(short)} finished run(s) have fewer evaluated rounds, "
            f"{int(short.min())} to {int(short.max())}: {listed}; their numbers are the mean of those rounds "
            "(the captions say so)"]


def main(argv: Sequence[str] | None = None) -> int:
    """`fedhpro aggregate`: one-line `error: ...` (exit 2) for bad input, like `fedhpro train`."""
    from fedhpro.cliutil import run_guarded

    return run_guarded(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    from fedhpro.cliutil import check_out_dir

    args = build_parser().parse_args(argv)
    try:
        _check_rule(args.rule, args.last_k)
        check_out_dir(args.out, create=False)  # nothing is written before the runs are checked
        if args.figures is not None:
            check_out_dir(args.figures, "--figures", create=False)
        df = collect(args.runs)
        for warning in last_k_warnings(df, args.rule, args.last_k):
            print(f"warning: {warning}", file=sys.stderr)
        paths = write_tables(df, args.out, args.rule, args.last_k, kind=args.kind, title=args.title,
                             protocol=args.protocol)
        if args.figures:
            from fedhpro.figures import write_figures

            paths += write_figures(df, args.figures, kind=args.kind, title=args.title,
                                   runs=summarize_runs(df, args.rule, args.last_k), clients=collect_clients(df))
    except (AggregateError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    n_runs = df["run_dir"].nunique()
    print(f"{n_runs} runs, {len(df)} rounds -> {len(paths)} files")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
