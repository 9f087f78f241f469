"""Published numbers beside ours: the registry (config/published.yaml), Δ and verdict, the reproduction report.

* `load_registry(path)` reads and checks the registry: every entry names its source, method, setting (our
  RunConfig keys), metric, rule, value, ± (and over what) and budget; a malformed entry is a one-line
  `PublishedError` naming the file, the entry id and the key.
* `run_value(metrics, metric, rule, k)` computes OUR number the way the published one was computed: the
  metric (`global_test_acc` = the global model on the global test set; `client_mean` = the mean over clients of
  their local test accuracy, FedProto's number; `client_weighted` = all local test samples pooled, HtFLlib's;
  `domain_mean` / `domain:<name>`) under the rule (`last` round, `best` round, `mean_last_k` rounds), in percent.
* `verdict(delta, pm)`: "inside ±" when |Δ| <= the published ±, "inside 2×±", "outside"; "no ± published"
  when the source gives none.
* `compare(registry, runs)` pairs each entry with the finished runs whose config matches it (method, variant
  and every setting key) and gives ours as mean ± sd over seeds; `report_markdown` writes
  docs/reproduction.md (the Snakemake rule `reproduction_report`, workflow/rules/report.smk).
* `draw_reference(ax, registry, ...)`: the official log's accuracy curve as a reference line (used by
  fedhpro.figures for the CIFAR-10 alpha 0.5 rho 100 accuracy figure).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fedhpro.errors import ConfigError

__all__ = ["experiment_table", "write_experiment_table", "figure_reference", "write_report", "PublishedError", "Entry", "Registry", "load_registry", "run_value", "verdict", "find_runs", "compare",
           "report_markdown", "draw_reference", "reference_curve", "planned_cell", "METRICS", "RULES", "PLACEMENTS"]

METRICS = ("global_test_acc", "client_mean", "client_weighted", "domain_mean")  # and "domain:<name>"
METRIC_COLUMNS = {"global_test_acc": "test_acc", "client_mean": "client_acc_mean",
                  "client_weighted": "client_acc_weighted"}
RULES = ("last", "best", "mean_last_k")
PLACEMENTS = ("exact", "approximate", "unplaceable", "not_run")
PM_OVER = ("seeds", "clients")
CPU_DATASETS = ("mnist", "femnist", "digits", "usps")  # small nets: affordable on a CPU at the published budget
ENTRY_KEYS = {"id", "source", "row", "method", "variant", "experiment", "setting", "metric", "rule", "k", "value",
              "pm", "pm_over", "budget", "placement", "reason", "rule_stated", "curve"}
REQUIRED = ("id", "source", "row", "method", "experiment", "setting", "metric", "rule", "value", "pm", "pm_over",
            "budget", "placement")
# setting keys an entry may give: the RunConfig keys that say what a cell is (not how it is executed)
SETTING_KEYS = ("dataset", "partition", "alpha", "classes_per_client", "imbalance_ratio", "num_clients",
                "clients_per_domain", "ways", "shots", "stdev", "train_shots_max", "test_shots", "eval_mode", "model",
                "rounds", "local_epochs")


class PublishedError(ConfigError):
    """The published-results registry is malformed (one line naming the file, entry and key)."""


@dataclass(frozen=True)
class Entry:
    id: str
    source: str
    row: str
    method: str | None
    variant: str
    experiment: str
    setting: Mapping[str, Any]
    metric: str
    rule: str
    k: int
    value: float
    pm: float | None
    pm_over: str | None
    budget: Mapping[str, Any]
    placement: str
    reason: str = ""
    rule_stated: bool = True
    curve: str | None = None

    @property
    def rule_text(self) -> str:
        return f"mean of last {self.k}" if self.rule == "mean_last_k" else self.rule


@dataclass(frozen=True)
class Registry:
    path: str
    sources: Mapping[str, Mapping[str, Any]]
    curves: Mapping[str, Mapping[str, Any]]
    entries: tuple[Entry, ...] = field(default_factory=tuple)
    notes: tuple[Mapping[str, Any], ...] = ()  # investigations of disagreements: {entries: [ids], text}

    def entry(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise KeyError(entry_id)


# ------------------------------------------------------------------------------------------------ loading
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_registry(path: str | Path) -> Registry:
    """Read and check config/published.yaml; PublishedError (one line) naming the entry and key on any fault."""
    from fedhpro.config import load_yaml_text

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise PublishedError(f"published-results registry {where} does not exist")
    raw = load_yaml_text(path.read_text(), f"published-results registry {where!r}")
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise PublishedError(f"{where}: expected a mapping with 'sources', 'curves' and a list 'entries'")
    unknown_top = sorted(set(raw) - {"sources", "curves", "entries", "notes"})
    if unknown_top:
        raise PublishedError(f"{where}: unknown top-level key {unknown_top[0]!r}; accepted: sources, curves, entries, "
                             "notes")
    sources = raw.get("sources") or {}
    curves = raw.get("curves") or {}
    if not isinstance(sources, dict) or not isinstance(curves, dict):
        raise PublishedError(f"{where}: 'sources' and 'curves' must be mappings")
    for name, curve in curves.items():
        values = curve.get("values") if isinstance(curve, dict) else None
        if not isinstance(values, list) or not values or not all(_number(v) for v in values):
            raise PublishedError(f"{where}: curves.{name}.values must be a non-empty list of numbers")
        if curve.get("source") not in sources:
            raise PublishedError(f"{where}: curves.{name}.source {curve.get('source')!r} is not a key of 'sources'")
    entries, seen = [], set()
    for i, item in enumerate(raw["entries"]):
        entries.append(_entry(item, f"{where}: entries[{i}]", sources, curves))
        if entries[-1].id in seen:
            raise PublishedError(f"{where}: entries[{i}]: duplicate id {entries[-1].id!r}")
        seen.add(entries[-1].id)
    notes = raw.get("notes") or []
    if not isinstance(notes, list):
        raise PublishedError(f"{where}: 'notes' must be a list of {{entries: [ids], text: ...}}")
    for i, note in enumerate(notes):
        ids = note.get("entries") if isinstance(note, dict) else None
        if not isinstance(ids, list) or not ids or not isinstance(note.get("text"), str):
            raise PublishedError(f"{where}: notes[{i}] must hold 'entries' (a list of entry ids) and 'text'")
        missing = [x for x in ids if x not in seen]
        if missing:
            raise PublishedError(f"{where}: notes[{i}]: entry id {missing[0]!r} is not in 'entries'")
    return Registry(path=where, sources=sources, curves=curves, entries=tuple(entries), notes=tuple(notes))


def _entry(item: Any, where: str, sources: Mapping, curves: Mapping) -> Entry:
    if not isinstance(item, dict):
        raise PublishedError(f"{where}: must be a mapping, got {item!r}")
    if isinstance(item.get("id"), str):
        where = f"{where} ({item['id']})"
    unknown = sorted(set(item) - ENTRY_KEYS)
    if unknown:
        raise PublishedError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(ENTRY_KEYS))}")
    for key in REQUIRED:
        if key not in item:
            raise PublishedError(f"{where}: key {key!r} is missing")

    def bad(key: str, what: str) -> PublishedError:
        return PublishedError(f"{where}: key {key!r} {what}, got {item.get(key)!r}")

    if not isinstance(item["id"], str) or not item["id"]:
        raise bad("id", "must be a non-empty string")
    if item["source"] not in sources:
        raise bad("source", f"must be a key of 'sources' ({', '.join(sources)})")
    from fedhpro.methods import METHOD_MODULES

    method = item["method"]
    if method is not None and method not in METHOD_MODULES:
        raise bad("method", "must be a method of this project or null")
    metric = item["metric"]
    if metric not in METRICS and not (isinstance(metric, str) and metric.startswith("domain:") and len(metric) > 7):
        raise bad("metric", f"must be one of {', '.join(METRICS)} or domain:<name>")
    if item["rule"] not in RULES:
        raise bad("rule", f"must be one of {', '.join(RULES)}")
    k = item.get("k", 1)
    if item["rule"] == "mean_last_k" and (isinstance(k, bool) or not isinstance(k, int) or k < 1 or "k" not in item):
        raise bad("k", "must be an integer >= 1 for rule mean_last_k")
    if not _number(item["value"]) or not 0 <= item["value"] <= 100:
        raise bad("value", "must be a percentage between 0 and 100")
    if item["pm"] is not None and (not _number(item["pm"]) or item["pm"] < 0):
        raise bad("pm", "must be a number >= 0 or null")
    if (item["pm"] is None) != (item["pm_over"] is None) or (item["pm_over"] is not None
                                                             and item["pm_over"] not in PM_OVER):
        raise bad("pm_over", f"must be one of {', '.join(PM_OVER)} when pm is given, null otherwise")
    setting = item["setting"]
    if not isinstance(setting, dict) or "dataset" not in setting:
        raise bad("setting", "must be a mapping of our config keys with at least 'dataset'")
    for key in setting:
        if key not in SETTING_KEYS:
            raise PublishedError(f"{where}: key 'setting.{key}' is not a setting key; accepted: "
                                 f"{', '.join(SETTING_KEYS)}")
    if not isinstance(item["budget"], dict):
        raise bad("budget", "must be a mapping (rounds, local_epochs, ... as the source states them)")
    placement = item["placement"]
    if placement not in PLACEMENTS:
        raise bad("placement", f"must be one of {', '.join(PLACEMENTS)}")
    reason = item.get("reason") or ""
    if placement != "exact" and not reason:
        raise PublishedError(f"{where}: key 'reason' is required for placement {placement!r} (say why)")
    if placement in ("exact", "approximate") and method is None:
        raise bad("method", f"is required for placement {placement!r} (null only for unplaceable / not_run)")
    curve = item.get("curve")
    if curve is not None and curve not in curves:
        raise bad("curve", "must be a key of 'curves'")
    if not isinstance(item["experiment"], str):
        raise bad("experiment", "must name a block of config/paper.yaml")
    return Entry(id=item["id"], source=item["source"], row=str(item["row"]), method=method,
                 variant=str(item.get("variant") or "default"), experiment=item["experiment"],
                 setting=dict(setting), metric=metric, rule=item["rule"], k=int(k), value=float(item["value"]),
                 pm=None if item["pm"] is None else float(item["pm"]), pm_over=item["pm_over"],
                 budget=dict(item["budget"]), placement=placement, reason=str(reason),
                 rule_stated=bool(item.get("rule_stated", True)), curve=curve)


# ------------------------------------------------------------------------------------------------ numbers
def metric_series(metrics, metric: str):
    """The per-round values (fractions, evaluated rounds only, in round order) of `metric` in a run's metrics."""
    import pandas as pd

    df = metrics.sort_values("round")
    if metric in METRIC_COLUMNS:
        col = df[METRIC_COLUMNS[metric]]
    elif metric == "domain_mean":
        cols = [c for c in df.columns if c.startswith("domain_acc_")]
        if not cols:
            raise ValueError("the run has no per-domain accuracies (domain_acc_* columns)")
        col = df[cols].mean(axis=1, skipna=False)
    else:
        name = f"domain_acc_{metric.split(':', 1)[1]}"
        if name not in df.columns:
            raise ValueError(f"the run has no column {name}")
        col = df[name]
    series = pd.Series(col.to_numpy(dtype=float), index=df["round"].to_numpy())
    return series[series.notna()]


def run_value(metrics, metric: str, rule: str, k: int = 1) -> float:
    """Our number for one run, in percent, by the published number's metric and rule."""
    s = metric_series(metrics, metric)
    if s.empty:
        raise ValueError(f"the run has no evaluated round with {metric}")
    if rule == "last":
        return 100.0 * float(s.iloc[-1])
    if rule == "best":
        return 100.0 * float(s.max())
    if rule == "mean_last_k":
        return 100.0 * float(s.iloc[-k:].mean())
    raise ValueError(f"unknown rule {rule!r}")


def verdict(delta: float, pm: float | None) -> str:
    """Where ours lies relative to the published value: within its ±, within twice it, or outside."""
    if delta != delta:
        return "not run"
    if pm is None or pm == 0:
        return "no ± published"
    if abs(delta) <= pm:
        return "inside ±"
    if abs(delta) <= 2 * pm:
        return "inside 2×±"
    return "outside"


# ------------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Run:
    path: Path
    config: Mapping[str, Any]
    finished: bool
    git_sha: str


def find_runs(results: str | Path) -> list[Run]:
    """Every run directory under <results>/runs with a config.json; finished = its metrics.parquet exists
    (written last, atomically, by `fedhpro.train`)."""
    out = []
    for cfg_path in sorted(Path(results).glob("runs/**/config.json")):
        info = json.loads(cfg_path.read_text())
        config = info.get("config") or {}
        attempts = info.get("attempts") or []
        sha = str(info.get("git_sha") or (attempts[-1].get("git_sha") if attempts else "") or "unknown")
        out.append(Run(path=cfg_path.parent, config=config, finished=(cfg_path.parent / "metrics.parquet").is_file(),
                       git_sha=sha))
    return out


def matches(entry: Entry, config: Mapping[str, Any]) -> bool:
    if entry.method is None or config.get("method") != entry.method:
        return False
    if config.get("variant", "default") != entry.variant:
        return False
    for key, want in entry.setting.items():
        have = config.get(key)
        if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(have, (int, float)):
            if float(have) != float(want):
                return False
        elif have != want:
            return False
    return True


def _sd(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def compare(registry: Registry, runs: Iterable[Run]) -> list[dict]:
    """One row per registry entry: published, ours (mean ± sd over the finished matching runs' seeds, n), Δ,
    verdict, budgets, the runs' commit, and why a cell has no number of ours."""
    import pandas as pd

    runs = list(runs)
    rows = []
    for e in registry.entries:
        row = {"id": e.id, "source": e.source, "row": e.row, "method": e.method, "variant": e.variant,
               "setting": ", ".join(f"{k}={v}" for k, v in e.setting.items()), "metric": e.metric,
               "rule": e.rule_text + ("" if e.rule_stated else " (not stated; assumed)"), "published": e.value,
               "pm": e.pm, "pm_over": e.pm_over, "budget": _budget_text(e.budget), "placement": e.placement,
               "ours_mean": float("nan"), "ours_sd": float("nan"), "n": 0, "delta": float("nan"), "verdict": "not run",
               "our_budget": "", "commit": "", "why": "", "minutes": float("nan"),
               "client_sd": float("nan")}
        mine = [r for r in runs if matches(e, r.config)]
        done = [r for r in mine if r.finished]
        if e.placement in ("unplaceable", "not_run"):
            row["why"] = e.reason
        elif not mine:
            size = ("GPU-sized, not run: no GPU was available to the session that made these results"
                    if e.setting.get("dataset") not in CPU_DATASETS else "not run yet on this machine")
            row["why"] = f"{size}; planned in config/paper.yaml, experiment {e.experiment}" + (
                f" ({e.reason})" if e.reason else "")
        elif not done:
            row["why"] = f"{len(mine)} run(s) started, none finished yet"
        else:
            values, minutes, spread = [], [], []
            for r in done:
                metrics = pd.read_parquet(r.path / "metrics.parquet")
                values.append(run_value(metrics, e.metric, e.rule, e.k))
                timed = [c for c in ("time_local", "time_server", "time_eval", "time_io") if c in metrics.columns]
                minutes.append(float(metrics[timed].sum().sum()) / 60 if timed else float("nan"))
                if e.metric == "client_mean" and e.rule == "last" and "client_acc_std" in metrics.columns:
                    spread.append(100.0 * float(metric_series(metrics.assign(client_acc_mean=metrics["client_acc_std"]),
                                                              "client_mean").iloc[-1]))
            row["minutes"] = sum(minutes) / len(minutes)
            row["client_sd"] = sum(spread) / len(spread) if spread else float("nan")
            row["ours_mean"] = sum(values) / len(values)
            row["ours_sd"] = _sd(values)
            row["n"] = len(values)
            row["delta"] = row["ours_mean"] - e.value
            row["verdict"] = verdict(row["delta"], e.pm)
            cfg = done[0].config
            row["our_budget"] = f"{cfg.get('rounds')} rounds x {cfg.get('local_epochs')} epochs"
            row["commit"] = ", ".join(sorted({r.git_sha[:12] for r in done}))
            if len(done) < len(mine):
                row["why"] = f"{len(mine) - len(done)} more run(s) not finished"
            if e.reason:
                row["why"] = (row["why"] + "; " if row["why"] else "") + e.reason
        rows.append(row)
    return rows


def _budget_text(budget: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None) or "not stated"


def _fmt(v: float, digits: int = 2) -> str:
    return "–" if v != v else f"{v:.{digits}f}"


def report_markdown(rows: Sequence[dict], registry: Registry, *, configs: Sequence[str], commit: str,
                    note: str = "") -> str:
    """docs/reproduction.md: the cells we have numbers for first, then every other published cell and why not."""
    have = [r for r in rows if r["n"] > 0]
    lines = ["# Reproduction report (generated)", "",
             f"Generated by the Snakemake rule `reproduction_report` (workflow/rules/report.smk) from "
             f"`{registry.path}` and the runs of {', '.join(f'`{c}`' for c in configs)}, at commit `{commit}`. "
             "Do not edit by hand: rerun the rule, e.g. `.venv/bin/snakemake --cores 1 --configfile "
             f"{configs[0] if configs else 'CONFIG'}` (add `--config report_partial=True` for a report of the runs "
             "finished so far).", "",
             "Ours is computed with the published number's own metric and rule (see `fedhpro/published.py`): mean ± "
             "sample sd over seeds (n runs); Δ = ours − published; verdict: |Δ| within the published ±, within "
             "twice it, or outside (the published ± is over clients or seeds, as the column says; for client means "
             "ours also gives the sd over clients of the last round, averaged over seeds). Minutes per run: "
             "the run's own training, server and evaluation time (one CPU thread for the CPU cells). Protocol "
             "differences behind the numbers: docs/assumptions.md (A9-A13).", ""]
    if note:
        lines += [note, ""]
    header = ("| cell | method | setting | metric, rule | published | ours (n) | Δ | verdict | budget (published / "
              "ours) | minutes per run | commit |")
    lines += ["## Cells with runs", "", header, "|" + "---|" * 11]
    for r in have:
        pub = f"{r['published']:.2f}" + (f" ± {r['pm']:.2f} ({r['pm_over']})" if r["pm"] is not None else "")
        ours = f"{_fmt(r['ours_mean'])} ± {_fmt(r['ours_sd'])} ({r['n']})" + (
            f"; sd over clients {_fmt(r['client_sd'])}" if r["client_sd"] == r["client_sd"] else "")
        lines.append(f"| {r['id']} | {r['method']} | {r['setting']} | {r['metric']}, {r['rule']} | {pub} | {ours} | "
                     f"{_fmt(r['delta'])} | {r['verdict']} | {r['budget']} / {r['our_budget']} | "
                     f"{_fmt(r['minutes'], 0)} | {r['commit']} |")
    if not have:
        lines.append("| (none finished yet) |" + " |" * 10)
    shown = {r["id"] for r in have}
    relevant = [n for n in registry.notes if shown & set(n["entries"])]
    if relevant:
        lines += ["", "## Where ours and published disagree: what we found", ""]
        lines += [f"- {', '.join(i for i in n['entries'] if i in shown)}: {n['text']}" for n in relevant]
    lines += ["", "## Published cells without a number of ours", "",
              "| cell | method | setting | metric, rule | published | budget | placement | why not |", "|" + "---|" * 8]
    for r in rows:
        if r["n"] > 0:
            continue
        pub = f"{r['published']:.2f}" + (f" ± {r['pm']:.2f}" if r["pm"] is not None else "")
        lines.append(f"| {r['id']} | {r['method'] or '–'} | {r['setting']} | {r['metric']}, {r['rule']} | {pub} | "
                     f"{r['budget']} | {r['placement']} | {r['why'] or '–'} |")
    lines += ["", "## Sources", ""]
    for name, src in registry.sources.items():
        lines.append(f"- `{name}`: {src.get('title', '')} ({src.get('where', '')})"
                     + (f" {src['pm_note']}" if src.get("pm_note") else ""))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ planning
def planned_cell(entry: Entry, runs_by_experiment: Mapping[str, Sequence[Any]]) -> list[Any]:
    """The planned runs (fedhpro.sweep RunSpecs) of `entry`'s experiment that are its cell (every seed)."""
    return [r for r in runs_by_experiment.get(entry.experiment, ())
            if matches(entry, {**r.config.to_dict(), "variant": r.variant})]


# ------------------------------------------------------------------------------------------------ figures
def reference_curve(registry: Registry, *, method: str, setting: Mapping[str, Any], metric: str = "global_test_acc"
                    ) -> tuple[str, list[float]] | None:
    """(label, values in percent for rounds 1..R) of a published curve of `method` in `setting`, or None."""
    for name, curve in registry.curves.items():
        if curve.get("method") != method or curve.get("metric", "global_test_acc") != metric:
            continue
        want = curve.get("setting") or {}
        if all(_same(setting.get(k), v) for k, v in want.items()):
            source = registry.sources.get(curve["source"], {})
            return f"{source.get('title', name).split(' (')[0]}", [float(v) for v in curve["values"]]
    return None


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(have, (int, float)):
        return float(have) == float(want)
    return have == want


def draw_reference(ax, registry: Registry, *, method: str, setting: Mapping[str, Any], scale: float = 1.0,
                   metric: str = "global_test_acc") -> bool:
    """Draw the published curve (if the registry has one for this method and setting) on `ax` as a dashed grey
    reference line, values times `scale` (0.01 for an axis in fractions). Returns whether one was drawn."""
    found = reference_curve(registry, method=method, setting=setting, metric=metric)
    if found is None:
        return False
    label, values = found
    ax.plot(range(1, len(values) + 1), [v * scale for v in values], color="0.35", linestyle="--", linewidth=1.2,
            label=f"published: {label}", zorder=1)
    return True


def figure_reference(registry: Registry, method: str = "fedhpro"):
    """The `reference(ax, cond)` hook of `fedhpro.figures.write_figures`: draws `method`'s published curve into a
    global-mode accuracy panel whose setting (a figure's condition: dataset, partition, alpha, rho, clients)
    matches the curve's."""

    def reference(ax, cond: Mapping[str, Any]) -> bool:
        if cond.get("eval_mode", "global") != "global":
            return False
        return draw_reference(ax, registry, method=method, setting=dict(cond))

    return reference


def _commit_without(out: Path, sha: str) -> str:
    """`sha` without '-dirty' when the only change is the report itself (Snakemake deletes an output before its
    job runs, so a checkout with the report committed looks dirty while the report is rebuilt)."""
    import subprocess

    if not sha.endswith("-dirty"):
        return sha
    try:
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return sha
    mine = str(out.resolve().relative_to(Path.cwd().resolve())) if out.resolve().is_relative_to(Path.cwd().resolve()) \
        else None
    others = [line for line in changed if line[3:].strip() != mine]
    return sha[: -len("-dirty")] if mine and not others else sha


def write_report(registry_path: str | Path, results: str | Path, out: str | Path, *, configs: Sequence[str],
                 metrics: Sequence[str] | None = None, planned: int | None = None) -> str:
    """Compare the registry with the runs under `results` and write the Markdown report to `out` (atomically).
    `metrics`: the metrics files the rule was given (the finished runs it waited for); `planned`: how many runs
    the config plans. A run's metrics are checked to belong to its config.json (`check_metrics_belong`).
    Returns a one-line summary."""
    from fedhpro.runio import atomic_write_text, check_metrics_belong, git_sha, read_run_info

    registry = load_registry(registry_path)
    runs = find_runs(results)
    for run in runs:
        if run.finished:
            info = read_run_info(run.path)
            try:
                check_metrics_belong(run.path, info)
            except ValueError as err:
                raise ValueError(f"run {run.path}: {err}") from None
    rows = compare(registry, runs)
    finished = sum(r.finished for r in runs)
    note = ""
    if planned is not None and metrics is not None and len(metrics) < planned:
        note = (f"**Partial report**: {len(metrics)} of the {planned} planned runs had finished when it was built "
                "(`report_partial`); cells list how many runs they have (n).")
    text = report_markdown(rows, registry, configs=configs, commit=_commit_without(Path(out), git_sha()), note=note)
    atomic_write_text(Path(out), text)
    with_runs = sum(r["n"] > 0 for r in rows)
    return f"{out}: {len(rows)} published cells, {with_runs} with runs ({finished} finished runs in {results})"


def experiment_table(registry: Registry, run_dirs: Sequence[str | Path]):
    """The published entries whose cell is among `run_dirs` (an experiment's finished runs): published value
    and ours by its own metric and rule, Δ and verdict, and ours by the other rules side by side (last, best,
    mean of the last 5 evaluated rounds) so a reader sees how much the rule alone moves the number."""
    import pandas as pd

    runs = [r for r in (Run(path=Path(d), config=json.loads((Path(d) / "config.json").read_text())["config"],
                            finished=True, git_sha="") for d in run_dirs)]
    rows = []
    for e, row in zip(registry.entries, compare(registry, runs)):
        if row["n"] == 0:
            continue
        mine = [r for r in runs if matches(e, r.config)]
        other = {}
        for label, rule, k in (("last", "last", 1), ("best", "best", 1), ("mean of last 5", "mean_last_k", 5)):
            vals = [run_value(pd.read_parquet(r.path / "metrics.parquet"), e.metric, rule, k) for r in mine]
            other[f"ours, {label}"] = f"{sum(vals) / len(vals):.2f}"
        rows.append({"Cell": e.id, "Method": e.method, "Metric": e.metric, "Rule": row["rule"],
                     "Published": f"{e.value:.2f}" + (f" ± {e.pm:.2f} ({e.pm_over})" if e.pm is not None else ""),
                     "Ours": f"{_fmt(row['ours_mean'])} ± {_fmt(row['ours_sd'])} (n={row['n']})",
                     "Δ": _fmt(row["delta"]), "Verdict": row["verdict"], **other})
    return pd.DataFrame(rows)


def write_experiment_table(registry_path: str | Path, run_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """published.csv and published.md (next to an experiment's tables) from `experiment_table`; nothing when
    no registry entry is a cell of these runs. Returns a one-line summary."""
    from fedhpro.runio import atomic_write_text

    table = experiment_table(load_registry(registry_path), run_dirs)
    if table.empty:
        return "published: no registry entry is a cell of this experiment"
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "published.csv", table.to_csv(index=False))
    head = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in table.itertuples(index=False))
    atomic_write_text(out_dir / "published.md", "Published numbers beside ours (fedhpro.published; Δ and verdict "
                      "by the published number's own metric and rule)\n\n" + head + body)
    return f"published: {len(table)} cell(s) with published numbers -> {out_dir / 'published.md'}"
