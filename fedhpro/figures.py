"""Figures of one experiment from the tidy metrics table of `fedhpro.aggregate.collect` (matplotlib, Agg canvas).

Sized for print: a figure is drawn at the width it is printed at (`COL_W`, one column of a two-column
paper, for one panel or a Δ plot; `TEXT_W`, the full text width, for a grid of panels), with fonts of
`FONT` pt, so a PDF placed at that width keeps its text legible. Each figure is written as PNG and PDF:

``accuracy`` (``accuracy_<dataset>[_<k>]`` when an experiment needs more than one figure)
    accuracy (%) versus round, one panel per setting (dataset, heterogeneity, clients, evaluation mode,
    model; `fedhpro.labels.CONDITION_KEYS`), one line per main-table row: the mean over the finished
    seeds. At most `MAX_PANELS` panels per figure, one dataset per figure, so a paper-size experiment
    (16 settings x 14 methods) becomes several readable figures. One y-range for all panels of a figure.
    A ±std band (sample std over seeds) only where it informs: on FedHPro's published row and the best
    other row of the panel (final mean), or on every line of a panel with at most `BAND_ALL` lines;
``communication``
    the same against cumulative communication (bytes up + down, MB = 10^6 bytes, mean over seeds),
    log-scaled when the x values span more than two decades;
``ablation``
    each ablation variant as Δ against its method's default of the same aggregation
    (`fedhpro.labels.reference_variant`): the mean paired difference over seeds in points, with error
    bars of ±1 standard error; a hollow marker when |Δ| < 2 SE (inside the seed noise). One panel per
    ablated method, a marker per setting, one x-range for the figure;
``clients``
    personalized settings only, from the per-client results (``<run_dir>/clients.parquet``): the
    distribution of the clients' accuracies in the last evaluated round (pooled over seeds) as one box
    per method, with the mean of the worst 10% of clients marked;
``diagnostics_<setting>``
    prototype diagnostics per setting, comparing methods (`DIAGNOSTIC_COLUMNS`); written only for
    settings where some method recorded them. Every panel has its y-label.

Every method has one colour, marker and line style in every figure (`fedhpro.labels.style_of`), chosen so
that they stay apart in greyscale; the legend sits below the panels, so it never covers data. Diverged
seeds are left out of the mean and counted in a note inside the panel ("FedAvg: 1 seed diverged"); a
row whose every seed diverged is drawn from its seeds' rounds before divergence as a dashed line. File
names are built from the setting's fields only (`condition_slug`), so they are deterministic; the PDF
carries no creation date, so repeated runs give identical files.

No pyplot state is touched: figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas,
so importing this module changes no global backend. This module imports `fedhpro.labels` only (not
`fedhpro.aggregate`), so the two have no import cycle: the per-run table and the per-client results
are passed in by the caller.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedhpro.labels import (CONDITION_KEYS, DATASET_NAMES, MB, NOISE_SE, cond_id, cond_of, condition_labels,
                            condition_slug, is_main_row, method_label, method_name, paired_delta, proposed_method,
                            reference_variant, sort_key_condition, sort_key_method, style_of)
from fedhpro.runio import atomic_write

FORMATS = ("png", "pdf")
DPI = 200  # PNG pixels per inch at print size (a 7-inch figure is 1400 px wide)
LOG_SPAN = 100.0  # log x axis when max/min of the positive x values exceeds two decades
COL_W, TEXT_W = 3.3, 7.0  # inches: one column of a two-column paper, the full text width
PANEL_H = 1.85  # inches per row of panels
FONT = 7.5  # pt: titles, labels and legend (ticks one point less); legible at print size
MAX_COLS = 3
MAX_PANELS = 6  # panels per figure; more settings of a dataset continue in another figure
BAND_ALL = 4  # a panel with at most this many lines shows every line's band
MARKERS_PER_LINE = 6  # markers drawn along a line (every k-th point), enough to tell the methods apart
WORST_FRACTION = 0.1  # the clients figure and table mark the mean of the worst 10% of clients
# the diagnostics drawn (fedhpro.diagnostics defines them all; the tables list every one): the measures that
# neither the positive-orthant offset nor a collapsed solution fool, plus the raw angle between global signals
DIAGNOSTIC_COLUMNS = {"proto_sep_mean_deg": "Separation: mean angle (°)",
                      "proto_cons_centred": "Consistency, centred: cosine to global",
                      "proto_margin": "Margin: own minus best other",
                      "proto_nearest": "Nearest own class: share",
                      "proto_agree_nearest": "Agreement: share, across clients"}
KINDS = ("comparison", "ablation")


def _run_status(run: pd.DataFrame) -> str:
    statuses = set(run["status"])
    return "diverged" if "diverged" in statuses else ("finished" if statuses == {"finished"} else "other")


def _settings(df: pd.DataFrame) -> tuple[list[dict], dict[tuple, dict]]:
    settings: dict[tuple, dict] = {}
    for _, row in df.drop_duplicates("run_dir").iterrows():
        cond = cond_of(row)
        settings.setdefault(cond_id(cond), {"cond": cond, "lines": []})
    ordered = sorted(settings.values(), key=lambda s: sort_key_condition(s["cond"]))
    labels = condition_labels([s["cond"] for s in ordered])
    slugs = [condition_slug(s["cond"]) for s in ordered]
    for i, (s, label, slug) in enumerate(zip(ordered, labels, slugs)):
        s["label"], s["slug"] = label, slug if slugs.count(slug) == 1 else f"{slug}_{i}"
    return ordered, settings


def _with_status(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["run_dir", "round"], kind="stable").copy()
    df["mb_cum"] = (df["bytes_up"].astype(float) + df["bytes_down"].astype(float)).groupby(df["run_dir"]).cumsum() / MB
    status = df.groupby("run_dir")[["status"]].apply(_run_status)
    df["run_status"] = df["run_dir"].map(status)
    return df


def _aggregation(grp: pd.DataFrame) -> str | None:
    if "aggregation" not in grp.columns:
        return None
    values = grp["aggregation"].dropna()
    return str(values.iloc[0]) if len(values) else None


def curve_data(df: pd.DataFrame, columns: tuple[str, ...] = ("acc",)) -> list[dict]:
    """Per setting and method/variant: per round mean/std of `columns` (accuracy in %) and mean cumulative MB.

    Returns a list of settings (sorted), each ``{"cond", "label", "slug", "lines": [...]}``; a line is
    ``{"method", "variant", "name", "label", "round", "acc_mean", "acc_std", "mb_cum", "n", "n_diverged",
    "dashed"}`` (``name``: the row's display name; ``label``: with the diverged seeds counted); other
    columns give ``<column>_mean`` / ``<column>_std`` (as recorded, not scaled). A line exists where its
    first column was recorded.
    """
    df = _with_status(df)
    ordered, settings = _settings(df)
    for key, grp in df.groupby(["method", "variant", *CONDITION_KEYS], dropna=False, sort=False):
        method, variant = key[0], key[1]
        cond = cond_of(grp.iloc[0])
        n_div = grp.loc[grp["run_status"] == "diverged", "run_dir"].nunique()
        ok = grp[grp["run_status"] == "finished"]
        dashed = ok.empty
        use = (grp[grp["run_status"] == "diverged"] if dashed else ok)
        if columns[0] not in use.columns:
            continue
        use = use[use[columns[0]].notna()]
        n = ok["run_dir"].nunique()
        if use.empty:
            continue
        aggs = {"mb_cum": ("mb_cum", "mean")}
        for col in columns:
            if col in use.columns:
                aggs[f"{col}_mean"] = (col, "mean")
                aggs[f"{col}_std"] = (col, "std")
        per_round = use.groupby("round").agg(**aggs).sort_index()
        name = method_label(method, variant, _aggregation(grp))
        line = {"method": method, "variant": variant, "name": name,
                "label": name + (f" ({n_div} diverged)" if n_div else ""),
                "round": per_round.index.to_numpy(int), "mb_cum": per_round["mb_cum"].to_numpy(float),
                "n": n, "n_diverged": n_div, "dashed": dashed}
        for col in columns:
            if f"{col}_mean" in per_round:
                scale = 100.0 if col == "acc" else 1.0
                line[f"{col}_mean"] = per_round[f"{col}_mean"].to_numpy(float) * scale
                line[f"{col}_std"] = per_round[f"{col}_std"].to_numpy(float) * scale
        settings[cond_id(cond)]["lines"].append(line)
    for s in ordered:
        s["lines"].sort(key=lambda ln: sort_key_method(ln["method"], ln["variant"]))
    return [s for s in ordered if s["lines"]]


# ====================================================================== drawing
def _save(fig: Figure, stem: Path) -> list[Path]:
    FigureCanvasAgg(fig)
    paths = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        meta = {"CreationDate": None} if fmt == "pdf" else {}
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.02, metadata=meta)
        path = stem.parent / f"{stem.name}.{fmt}"
        atomic_write(path, buf.getvalue())
        paths.append(path)
    return paths


def _grid(n: int, title: str, *, cols: int = MAX_COLS, width: float | None = None,
          row_h: float = PANEL_H) -> tuple[Figure, list]:
    """`n` panels in rows of at most `cols`; a single panel is one column wide, more fill the text width."""
    ncols = max(1, min(n, 2 if n in (2, 4) else cols))
    nrows = math.ceil(n / ncols)
    width = width or (COL_W if ncols == 1 else TEXT_W)
    fig = Figure(figsize=(width, row_h * nrows + (0.25 if title else 0)))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    _suptitle(fig, title)
    return fig, axes


def _suptitle(fig: Figure, title: str) -> None:
    """The figure's title, wrapped to the figure's width (a one-column figure would otherwise overhang)."""
    if title:
        fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 14)), fontsize=FONT + 0.5)


def _style_axes(ax, title: str, xlabel: str, ylabel: str | None) -> None:
    ax.set_title(title, fontsize=FONT)
    ax.set_xlabel(xlabel, fontsize=FONT, labelpad=1)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=FONT, labelpad=1)
    ax.tick_params(labelsize=FONT - 1, pad=1.5, length=2.5)
    ax.grid(True, alpha=0.3, linewidth=0.5)


def _draw_line(ax, x: np.ndarray, mean: np.ndarray, std: np.ndarray | None, style: dict, dashed: bool) -> None:
    every = max(1, math.ceil(len(x) / MARKERS_PER_LINE))
    ax.plot(x, mean, color=style["color"], marker=style["marker"], markevery=every,
            markersize=style.get("markersize", 4.5), alpha=style.get("alpha", 1.0), markeredgewidth=0.6,
            linestyle="--" if dashed else style.get("linestyle", "-"), linewidth=style.get("linewidth", 1.2))
    if std is not None:
        band = np.isfinite(std)
        if band.any():
            ax.fill_between(x[band], (mean - std)[band], (mean + std)[band], color=style["color"], alpha=0.15,
                            linewidth=0)


def _handle(style: dict) -> Line2D:
    return Line2D([], [], color=style["color"], marker=style["marker"], linestyle=style.get("linestyle", "-"),
                  markersize=style.get("markersize", 4.5) + 0.5, linewidth=style.get("linewidth", 1.2),
                  markerfacecolor=style.get("markerfacecolor", style["color"]), markeredgewidth=0.6)


def _legend_below(fig: Figure, entries: dict[str, dict], *, note: str = "") -> None:
    """One legend for the whole figure, below the panels (never over data), as many columns as fit."""
    handles = [_handle(s) if isinstance(s, dict) else s for s in entries.values()]
    fig.tight_layout(pad=0.3, h_pad=0.6, w_pad=0.6)
    width = fig.get_figwidth()
    longest = max((len(k) for k in entries), default=10)
    ncol = max(1, min(len(entries), int(width / (0.4 + 0.048 * longest))))
    legend = fig.legend(handles, list(entries), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
                        fontsize=FONT - 0.5, frameon=False, handlelength=2.6, columnspacing=1.0,
                        handletextpad=0.4, borderaxespad=0.0)
    if note:
        legend.set_title(note, prop={"size": FONT - 1})


def _diverged_note(ax, lines: list[dict]) -> None:
    notes = [f"{ln['name']}: {ln['n_diverged']} seed{'s' if ln['n_diverged'] > 1 else ''} diverged"
             for ln in lines if ln["n_diverged"]]
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=FONT - 1.5, va="bottom",
                ha="left", color="#333333")


def _y_label(cond: dict) -> str:
    return "Client acc., mean (%)" if cond["eval_mode"] == "personalized" else "Test accuracy (%)"


def _banded(lines: list[dict]) -> set[int]:
    """Indices of the lines that get a ±std band: all of a sparse panel, else the proposed method's default row
    (FedHPro's published one) and the best other row (highest final mean), so the bands that matter are not lost
    under a dozen others."""
    if len(lines) <= BAND_ALL:
        return set(range(len(lines)))
    proposed = proposed_method()
    keep = {i for i, ln in enumerate(lines) if ln["method"] == proposed and ln["variant"] == "default"}
    finals = [(ln["acc_mean"][-1], i) for i, ln in enumerate(lines)
              if ln["method"] != proposed and len(ln["acc_mean"]) and np.isfinite(ln["acc_mean"][-1])]
    if finals:
        keep.add(max(finals)[1])
    return keep


def _shared_ylim(axes: list, values: list[np.ndarray], pad: float = 0.04) -> tuple[float, float] | None:
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if not len(finite):
        return None
    lo, hi = float(finite.min()), float(finite.max())
    span = (hi - lo) or 1.0
    lim = (lo - pad * span, hi + pad * span)
    for ax in axes:
        ax.set_ylim(*lim)
    return lim


def _accuracy_figure(settings: list[dict], x_key: str, xlabel: str, title: str, reference=None) -> Figure:
    fig, axes = _grid(len(settings), title)
    entries: dict[str, dict] = {}
    ys: list[np.ndarray] = []
    ncols = max(1, min(len(settings), 2 if len(settings) in (2, 4) else MAX_COLS))
    for i, (ax, setting) in enumerate(zip(axes, settings)):
        # a published curve for this setting (fedhpro.published.figure_reference), drawn under our lines
        if reference is not None and x_key == "round" and reference(ax, setting["cond"]):
            entries.setdefault("published curve (reference)", {"color": "0.35", "linestyle": "--", "marker": ""})
            ys += [np.asarray(ln.get_ydata(), dtype=float) for ln in ax.get_lines()]  # inside the shared y-range
        xs = []
        banded = _banded(setting["lines"])
        for j, line in enumerate(setting["lines"]):
            style = style_of(line["method"], line["variant"])
            entries.setdefault(line["name"], style)
            x = line[x_key].astype(float)
            xs.append(x)
            std = line["acc_std"] if j in banded else None
            _draw_line(ax, x, line["acc_mean"], std, style, line["dashed"])
            ys += [line["acc_mean"]] + ([line["acc_mean"] - std, line["acc_mean"] + std] if std is not None else [])
        _diverged_note(ax, setting["lines"])
        # one y-range for the figure: the y-label on the left column names it for its row
        _style_axes(ax, setting["label"], xlabel, _y_label(setting["cond"]) if i % ncols == 0 else None)
        positive = np.concatenate(xs)[np.concatenate(xs) > 0] if xs else np.array([])
        if x_key == "mb_cum" and len(positive) and positive.max() / positive.min() > LOG_SPAN:
            ax.set_xscale("log")
        if x_key == "round":
            ax.xaxis.get_major_locator().set_params(integer=True)
    _shared_ylim(axes, ys)
    for i, ax in enumerate(axes):
        if i % ncols:
            ax.tick_params(labelleft=False)
    _legend_below(fig, _in_paper_order(entries, settings))
    return fig


def _in_paper_order(entries: dict[str, dict], settings: list[dict]) -> dict[str, dict]:
    """Legend entries in the tables' row order (paper order), whichever panel drew them first."""
    keys = {ln["name"]: sort_key_method(ln["method"], ln["variant"]) for s in settings for ln in s["lines"]}
    return dict(sorted(entries.items(), key=lambda kv: keys.get(kv[0], (99,))))


def _main_rows(settings: list[dict]) -> list[dict]:
    out = []
    for s in settings:
        with_default = {ln["method"] for ln in s["lines"] if ln["variant"] == "default"}
        lines = [ln for ln in s["lines"] if is_main_row(ln["method"], ln["variant"], with_default)]
        if lines:
            out.append({**s, "lines": lines})
    return out


def figure_groups(settings: list[dict], stem: str) -> list[tuple[str, list[dict]]]:
    """(file stem, settings) per figure: all in `stem` when they fit one figure, else one dataset per figure
    (`stem_<dataset>`), in chunks of at most `MAX_PANELS` (`stem_<dataset>_2`, ...)."""
    if len(settings) <= MAX_PANELS and len({s["cond"]["dataset"] for s in settings}) <= 1:
        return [(stem, settings)] if settings else []
    groups: dict[str, list[dict]] = {}
    for s in settings:
        groups.setdefault(str(s["cond"]["dataset"]), []).append(s)
    out = []
    for dataset, group in groups.items():
        base = f"{stem}_{re.sub(r'[^A-Za-z0-9.]+', '-', dataset)}"
        for k in range(0, len(group), MAX_PANELS):
            out.append((base if k == 0 else f"{base}_{k // MAX_PANELS + 1}", group[k:k + MAX_PANELS]))
    return out


def _dataset_title(head: str, group: list[dict], several: bool) -> str:
    if not several:
        return head
    dataset = group[0]["cond"]["dataset"]
    return f"{head}, {DATASET_NAMES.get(dataset, dataset)}"


# ---------------------------------------------------------------------------------------------------- ablation
def final_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run with its last evaluated accuracy (``acc``, fraction) and status: the per-run table
    when the caller has no `fedhpro.aggregate.summarize_runs` at hand (figures use the reporting rule's one)."""
    df = df.sort_values(["run_dir", "round"], kind="stable")
    rows = []
    for run_dir, run in df.groupby("run_dir", sort=True):
        first = run.iloc[0]
        statuses = set(run["status"])
        status = "diverged" if "diverged" in statuses else ("finished" if statuses == {"finished"} else "other")
        ev = run[run["acc"].notna()]
        rows.append({**{k: first[k] for k in (*CONDITION_KEYS, "method", "variant", "seed", "partition_seed")},
                     "aggregation": first["aggregation"] if "aggregation" in run else None, "run_dir": run_dir,
                     "status": status, "acc": float(ev["acc"].iloc[-1]) if len(ev) else math.nan})
    return pd.DataFrame(rows)


def ablation_deltas(runs: pd.DataFrame, kind: str = "comparison") -> list[dict]:
    """Per ablated method: its variants' Δ against the default of the same aggregation, per setting.

    Returns ``[{"method", "rows": [{"variant", "aggregation", "reference", "label", "per_setting": {cond_id:
    paired_delta}}], "settings": [(cond_id, label)]}]`` in paper order; the ablated rows are FedHPro's non-main
    variants (``comparison``) or every non-default variant (``ablation``)."""
    if runs.empty:
        return []
    runs = runs.copy()
    if "aggregation" not in runs:
        runs["aggregation"] = None
    runs["_cid"] = [cond_id(cond_of(r)) for _, r in runs.iterrows()]
    conds = {r["_cid"]: cond_of(r) for _, r in runs.iterrows()}
    order = sorted(conds, key=lambda c: sort_key_condition(conds[c]))
    labels = dict(zip(order, condition_labels([conds[c] for c in order])))
    with_default = set(runs.loc[runs["variant"] == "default", "method"])
    out = []
    methods = sorted(set(runs["method"]), key=lambda m: sort_key_method(m, "default"))
    for method in methods:
        mine = runs[runs["method"] == method]
        variants = sorted(set(mine["variant"]), key=lambda v: sort_key_method(method, v))
        ablated = [v for v in variants if (v != "default" if kind == "ablation"
                                           else not is_main_row(method, v, with_default))]
        rows = []
        for v in ablated:
            per = {}
            agg = None
            ref_name = None
            for cid in order:
                here = mine[mine["_cid"] == cid]
                var = here[here["variant"] == v]
                if var.empty:
                    continue
                agg = var["aggregation"].iloc[0]
                aggs = {name: grp["aggregation"].iloc[0] for name, grp in here.groupby("variant")}
                ref_name = reference_variant(v, agg, aggs)
                if ref_name is None:
                    continue
                per[cid] = paired_delta(var, here[here["variant"] == ref_name])
            if per:
                rows.append({"variant": v, "aggregation": agg, "reference": ref_name, "per_setting": per,
                             "label": v if ref_name == "default" else f"{v.removesuffix('_' + ref_name)} (vs {ref_name})"})
        if rows:
            used = [c for c in order if any(c in r["per_setting"] for r in rows)]
            out.append({"method": method, "rows": rows, "settings": [(c, labels[c]) for c in used]})
    return out


SETTING_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _ablation_figure(groups: list[dict], title: str) -> Figure:
    """Δ (points) of each variant, one panel per ablated method, error bars ±1 SE over seeds."""
    heights = [0.55 + 0.24 * len(g["rows"]) * max(1, min(2, len(g["settings"]))) ** 0.5 for g in groups]
    fig = Figure(figsize=(COL_W, sum(heights) + (0.25 if title else 0)))
    gs = fig.add_gridspec(len(groups), 1, height_ratios=heights)
    axes = [fig.add_subplot(gs[i, 0]) for i in range(len(groups))]
    _suptitle(fig, title)
    settings = list(dict.fromkeys(label for g in groups for _, label in g["settings"]))
    entries: dict = {}
    xs: list[float] = []
    for ax, group in zip(axes, groups):
        k = len(group["settings"])
        offsets = np.linspace(-0.25, 0.25, k) if k > 1 else np.zeros(1)
        for row_i, row in enumerate(group["rows"]):
            for (cid, label), off in zip(group["settings"], offsets):
                d = row["per_setting"].get(cid)
                if d is None or not d["n"]:
                    continue
                marker = SETTING_MARKERS[settings.index(label) % len(SETTING_MARKERS)]
                y = row_i + off
                se = d["se"] if d["se"] == d["se"] else 0.0
                hollow = bool(d["noise"]) or d["se"] != d["se"]
                ax.errorbar([d["delta"]], [y], xerr=[[se], [se]] if se else None, fmt=marker, color="#222222",
                            markerfacecolor="white" if hollow else "#222222", markersize=4.5, elinewidth=0.9,
                            capsize=2, markeredgewidth=0.8)
                xs += [d["delta"] - se, d["delta"] + se]
                entries.setdefault(label, {"color": "#222222", "marker": marker, "linestyle": "none"})
        ax.axvline(0.0, color="#888888", linewidth=0.8)
        ax.set_yticks(range(len(group["rows"])))
        ax.set_yticklabels([r["label"] for r in group["rows"]])
        ax.set_ylim(len(group["rows"]) - 0.5, -0.5)
        n = max((d["n"] for r in group["rows"] for d in r["per_setting"].values()), default=0)
        _style_axes(ax, f"{method_name(group['method'])} (n = {n} seed{'s' if n != 1 else ''})",
                    "Δ accuracy vs default (points)", "Variant")
        ax.grid(True, axis="x", alpha=0.3, linewidth=0.5)
        ax.grid(False, axis="y")
    finite = [x for x in xs if math.isfinite(x)] + [0.0]
    span = (max(finite) - min(finite)) or 1.0
    for ax in axes:  # one x-range for the figure
        ax.set_xlim(min(finite) - 0.08 * span, max(finite) + 0.08 * span)
    entries[f"hollow: |Δ| < {NOISE_SE:g} SE or one seed (not resolved)"] = {
        "color": "#222222", "marker": "o", "linestyle": "none", "markerfacecolor": "white"}
    _legend_below(fig, entries)
    return fig


# ---------------------------------------------------------------------------------------------------- clients
def worst_mean(values: np.ndarray, fraction: float = WORST_FRACTION) -> float:
    """Mean accuracy of the worst `fraction` of clients (at least one client)."""
    values = np.sort(np.asarray(values, float))
    if not len(values):
        return math.nan
    return float(values[:max(1, math.ceil(fraction * len(values)))].mean())


def client_distributions(clients: pd.DataFrame) -> list[dict]:
    """Per personalized setting: per method/variant, the clients' accuracies (%) in each run's last evaluated
    round, pooled over seeds. `clients`: rows of ``clients.parquet`` joined with the run's setting keys,
    ``method``, ``variant`` and ``aggregation`` (`fedhpro.aggregate.collect_clients`)."""
    if clients is None or clients.empty:
        return []
    clients = clients[clients["eval_mode"] == "personalized"]
    if clients.empty:
        return []
    last = clients.groupby("run_id")["round"].transform("max")
    clients = clients[clients["round"] == last]
    settings: dict[tuple, dict] = {}
    for key, grp in clients.groupby(["method", "variant", *CONDITION_KEYS], dropna=False, sort=False):
        cond = cond_of(grp.iloc[0])
        agg = grp["aggregation"].iloc[0] if "aggregation" in grp else None
        s = settings.setdefault(cond_id(cond), {"cond": cond, "boxes": []})
        s["boxes"].append({"method": key[0], "variant": key[1], "name": method_label(key[0], key[1], agg),
                           "acc": grp["client_acc"].to_numpy(float) * 100, "n_runs": grp["run_id"].nunique()})
    ordered = sorted(settings.values(), key=lambda s: sort_key_condition(s["cond"]))
    for s, label in zip(ordered, condition_labels([s["cond"] for s in ordered])):
        s["label"] = label
        s["boxes"].sort(key=lambda b: sort_key_method(b["method"], b["variant"]))
    return ordered


def _clients_figure(settings: list[dict], title: str) -> Figure:
    n_boxes = max(len(s["boxes"]) for s in settings)
    cols = 1 if n_boxes > 6 else min(len(settings), 2)
    fig, axes = _grid(len(settings), title, cols=cols, width=COL_W if cols == 1 else TEXT_W, row_h=PANEL_H + 0.5)
    values = []
    for ax, setting in zip(axes, settings):
        data = [b["acc"] for b in setting["boxes"]]
        bp = ax.boxplot(data, widths=0.55, patch_artist=True, showfliers=True,
                        medianprops={"color": "#000000", "linewidth": 1.0},
                        flierprops={"marker": ".", "markersize": 3, "markeredgecolor": "#444444"},
                        whiskerprops={"linewidth": 0.8}, capprops={"linewidth": 0.8}, boxprops={"linewidth": 0.8})
        for patch, box in zip(bp["boxes"], setting["boxes"]):
            patch.set_facecolor(style_of(box["method"], box["variant"])["color"])
            patch.set_alpha(0.55)
        pos = np.arange(1, len(data) + 1)
        ax.scatter(pos, [worst_mean(d) for d in data], marker="v", s=22, color="#000000", zorder=3)
        ax.scatter(pos, [float(np.mean(d)) for d in data], marker="D", s=14, facecolor="white",
                   edgecolor="#000000", linewidth=0.8, zorder=3)
        ax.set_xticks(pos)
        ax.set_xticklabels([b["name"] for b in setting["boxes"]], rotation=30, ha="right")
        values += data
        runs = max(b["n_runs"] for b in setting["boxes"])
        _style_axes(ax, f"{setting['label']} ({runs} seed{'s' if runs != 1 else ''})", "",
                    "Client accuracy (%)")
        ax.grid(False, axis="x")
    _shared_ylim(axes, values)
    entries = {"worst 10% of clients (mean)": {"color": "#000000", "marker": "v", "linestyle": "none"},
               "mean over clients": {"color": "#000000", "marker": "D", "linestyle": "none",
                                     "markerfacecolor": "white"},
               "box: quartiles, line: median": {"color": "#888888", "marker": "s", "linestyle": "none"}}
    _legend_below(fig, entries)
    return fig


def _diagnostic_title_and_unit(text: str) -> tuple[str, str]:
    """Panel title and y-label of a diagnostic: 'Separation: mean pairwise angle (°)' -> ('Separation',
    'mean pairwise angle (°)'); short distinct titles (five panels share a row's width), and a y-label that
    names the quantity."""
    head, _, tail = text.partition(": ")
    return (head if tail else re.sub(r"\s*\([^)]*\)$", "", text)), (tail or text)


def _diagnostics_figure(setting: dict, columns: list[str], title: str) -> Figure:
    fig, axes = _grid(len(columns), title, cols=3, width=TEXT_W if len(columns) > 1 else COL_W)
    entries: dict[str, dict] = {}
    for ax, col in zip(axes, columns):
        lines = [ln for ln in setting["lines"] if f"{col}_mean" in ln and np.isfinite(ln[f"{col}_mean"]).any()]
        banded = _banded([{**ln, "acc_mean": ln[f"{col}_mean"]} for ln in lines])
        for j, line in enumerate(lines):
            style = style_of(line["method"], line["variant"])
            entries.setdefault(line["name"], style)
            ok = np.isfinite(line[f"{col}_mean"])
            std = line[f"{col}_std"][ok] if j in banded else None
            _draw_line(ax, line["round"][ok].astype(float), line[f"{col}_mean"][ok], std, style, line["dashed"])
        name, unit = _diagnostic_title_and_unit(DIAGNOSTIC_COLUMNS.get(col, col))
        _style_axes(ax, name, "Round", unit)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_below(fig, _in_paper_order(entries, [setting]))
    return fig


# ====================================================================== public
def plot_accuracy(df: pd.DataFrame, out_dir: str | Path, data: list[dict] | None = None, *, title: str = "",
                  stem: str = "accuracy", reference=None) -> list[Path]:
    """Accuracy versus round of the main-table rows, a panel per setting (split per dataset when large);
    `reference(ax, cond)` may draw a published curve into a panel (returns whether it did)."""
    settings = _main_rows(curve_data(df) if data is None else data)
    head = f"{title}: accuracy vs round" if title else "Accuracy vs round"
    groups = figure_groups(settings, stem)
    return [p for name, group in groups for p in _save(
        _accuracy_figure(group, "round", "Round", _dataset_title(head, group, len(groups) > 1), reference),
        Path(out_dir) / name)]


def plot_accuracy_vs_communication(df: pd.DataFrame, out_dir: str | Path, data: list[dict] | None = None, *,
                                   title: str = "", stem: str = "communication") -> list[Path]:
    """Accuracy versus cumulative bytes up + down (MB) of the main-table rows, a panel per setting."""
    settings = _main_rows(curve_data(df) if data is None else data)
    head = f"{title}: accuracy vs communication" if title else "Accuracy vs communication"
    groups = figure_groups(settings, stem)
    return [p for name, group in groups for p in _save(
        _accuracy_figure(group, "mb_cum", "Cumulative up + down (MB)", _dataset_title(head, group, len(groups) > 1)),
        Path(out_dir) / name)]


def plot_ablation(df: pd.DataFrame, out_dir: str | Path, runs: pd.DataFrame | None = None, *,
                  kind: str = "comparison", title: str = "", stem: str = "ablation") -> list[Path]:
    """Δ of each ablation variant against its default (points, ±1 SE over seeds); none if no variants.
    `runs`: the per-run table of the reporting rule (`fedhpro.aggregate.summarize_runs`); else each run's
    last evaluated round."""
    groups = ablation_deltas(final_runs(df) if runs is None else runs, kind)
    if not groups:
        return []
    head = f"{title}: Δ vs default" if title else "Ablations: Δ vs default"
    return _save(_ablation_figure(groups, head), Path(out_dir) / stem)


def plot_clients(clients: pd.DataFrame | None, out_dir: str | Path, *, title: str = "",
                 stem: str = "clients") -> list[Path]:
    """The distribution of client accuracies per method, personalized settings only; none without per-client
    results (runs written before ``clients.parquet`` existed, or without per-client test splits)."""
    settings = client_distributions(clients)
    if not settings:
        return []
    head = f"{title}: accuracy per client" if title else "Accuracy per client"
    return _save(_clients_figure(settings, head), Path(out_dir) / stem)


def diagnostic_columns(df: pd.DataFrame) -> list[str]:
    """The prototype diagnostics columns recorded by some run (none in metrics written before they existed)."""
    return [c for c in DIAGNOSTIC_COLUMNS if c in df.columns and df[c].notna().any()]


def plot_diagnostics(df: pd.DataFrame, out_dir: str | Path, *, title: str = "") -> list[Path]:
    """One figure per setting where some method recorded the prototype diagnostics, comparing the methods."""
    columns = diagnostic_columns(df)
    if not columns:
        return []
    paths = []
    for setting in _main_rows(curve_data(df, ("acc", *columns))):
        present = [c for c in columns if any(f"{c}_mean" in ln and np.isfinite(ln[f"{c}_mean"]).any()
                                             for ln in setting["lines"])]
        if not present:
            continue
        head = f"{title + ': ' if title else ''}prototype diagnostics, {setting['label']}"
        paths += _save(_diagnostics_figure(setting, present, head),
                       Path(out_dir) / f"diagnostics_{setting['slug']}")
    return paths


def write_figures(df: pd.DataFrame, out_dir: str | Path, *, kind: str = "comparison", title: str = "",
                  runs: pd.DataFrame | None = None, clients: pd.DataFrame | None = None,
                  reference=None) -> list[Path]:
    """An experiment's figures as PNG and PDF; returns the paths written.

    ``comparison``: accuracy, communication, clients (personalized settings with per-client results),
    ablation (when some rows are ablation variants) and the diagnostics per setting (when recorded);
    ``ablation``: the ablation figure. `runs`: the per-run table of the reporting rule (for the ablation
    Δs); `clients`: the per-client results (`fedhpro.aggregate.collect_clients`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown experiment kind {kind!r}; accepted: {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = curve_data(df)
    paths: list[Path] = []
    if kind == "comparison":
        paths += plot_accuracy(df, out_dir, data, title=title, reference=reference)
        paths += plot_accuracy_vs_communication(df, out_dir, data, title=title)
        paths += plot_clients(clients, out_dir, title=title)
        paths += plot_diagnostics(df, out_dir, title=title)
    paths += plot_ablation(df, out_dir, runs, kind=kind, title=title)
    return paths


__all__ = ["curve_data", "plot_accuracy", "plot_accuracy_vs_communication", "plot_ablation", "plot_clients",
           "plot_diagnostics", "diagnostic_columns", "write_figures", "final_runs", "ablation_deltas",
           "client_distributions", "figure_groups", "worst_mean", "FORMATS", "DIAGNOSTIC_COLUMNS", "NOISE_SE"]
