"""Figures of one experiment from the tidy metrics table of `fedhpro.aggregate.collect` (matplotlib, Agg canvas).

Each figure is written as PNG and PDF:

``accuracy``
    accuracy (%) versus round, one panel per setting (dataset, heterogeneity, clients, evaluation mode,
    model; `fedhpro.labels.CONDITION_KEYS`), one line per main-table row: the mean over the finished
    seeds with a shaded ±std band (sample std, where two or more seeds were evaluated in that round);
``communication``
    accuracy (%) versus cumulative communication (bytes up + down, MB = 10^6 bytes, mean over seeds),
    one panel per setting, log-scaled when the x values span more than two decades;
``ablation``
    the ablation variants on their own: one panel per setting and ablated method, the default in the
    method's style, each variant in its own colour, marker and line style (an experiment of kind
    ``ablation``, or FedHPro's non-main variants in a comparison experiment);
``diagnostics_<setting>``
    prototype diagnostics per setting, comparing methods: separation of the global class signal (mean
    and minimum pairwise angle, degrees) and consistency (mean cosine between each client's class
    prototype and the global one), from the metrics columns `DIAGNOSTIC_COLUMNS`; written only for
    settings where some method recorded them.

Every method has one colour and marker in every figure (`fedhpro.labels.style_of`); the legend sits
outside the axes (right of the panels), so it never covers data. Diverged seeds are left out of the
mean and counted in a note inside the panel ("FedAvg: 1 seed diverged"); a row whose every seed
diverged is drawn from its seeds' rounds before divergence as a dashed line. File names are built
from the setting's fields only (`condition_slug`), so they are deterministic; the PDF carries no
creation date, so repeated runs give identical files.

No pyplot state is touched: figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas,
so importing this module changes no global backend. This module imports `fedhpro.labels` only (not
`fedhpro.aggregate`), so the two have no import cycle.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedhpro.labels import (CONDITION_KEYS, METHOD_NAMES, MB, ablation_style, cond_id, cond_of, condition_labels,
                            condition_slug, is_main_row, method_label, sort_key_condition, sort_key_method,
                            style_of)
from fedhpro.runio import atomic_write

FORMATS = ("png", "pdf")
DPI = 110
LOG_SPAN = 100.0  # log x axis when max/min of the positive x values exceeds two decades
PANEL_W, PANEL_H = 3.9, 2.9  # inches per panel
MAX_COLS = 3
MARKERS_PER_LINE = 8  # markers drawn along a line (every k-th point), enough to tell the methods apart
DIAGNOSTIC_COLUMNS = {"proto_sep_mean_deg": "Separation: mean pairwise angle (°)",
                      "proto_sep_min_deg": "Separation: min pairwise angle (°)",
                      "proto_consistency": "Consistency: mean cosine, client vs global"}
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
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", metadata=meta)
        path = stem.parent / f"{stem.name}.{fmt}"
        atomic_write(path, buf.getvalue())
        paths.append(path)
    return paths


def _grid(n: int, title: str, *, cols: int = MAX_COLS) -> tuple[Figure, list]:
    ncols = max(1, min(n, cols))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(PANEL_W * ncols, PANEL_H * nrows + (0.4 if title else 0)))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    if title:
        fig.suptitle(title, fontsize=11)
    return fig, axes


def _draw_line(ax, x: np.ndarray, mean: np.ndarray, std: np.ndarray | None, style: dict, dashed: bool) -> None:
    every = max(1, len(x) // MARKERS_PER_LINE)
    ax.plot(x, mean, color=style["color"], marker=style["marker"], markevery=every,
            markersize=style.get("markersize", 5), alpha=style.get("alpha", 1.0),
            linestyle="--" if dashed else style.get("linestyle", "-"), linewidth=style.get("linewidth", 1.4))
    if std is not None:
        band = np.isfinite(std)
        if band.any():
            ax.fill_between(x[band], (mean - std)[band], (mean + std)[band], color=style["color"], alpha=0.12,
                            linewidth=0)


def _legend_outside(fig: Figure, entries: dict[str, dict]) -> None:
    """One legend for the whole figure, right of the panels (never over data)."""
    handles = [Line2D([], [], color=s["color"], marker=s["marker"], linestyle=s.get("linestyle", "-"),
                      markersize=s.get("markersize", 5) + 1, linewidth=s.get("linewidth", 1.4), alpha=s.get("alpha", 1.0))
               for s in entries.values()]
    fig.tight_layout()
    fig.legend(handles, list(entries), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def _diverged_note(ax, lines: list[dict]) -> None:
    notes = [f"{ln['name']}: {ln['n_diverged']} seed{'s' if ln['n_diverged'] > 1 else ''} diverged"
             for ln in lines if ln["n_diverged"]]
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=6, va="bottom", ha="left",
                color="#444444")


def _y_label(cond: dict) -> str:
    return "Client accuracy, mean (%)" if cond["eval_mode"] == "personalized" else "Test accuracy (%)"


def _accuracy_figure(settings: list[dict], x_key: str, xlabel: str, title: str, reference=None) -> Figure:
    fig, axes = _grid(len(settings), title)
    entries: dict[str, dict] = {}
    for ax, setting in zip(axes, settings):
        # a published curve for this setting (fedhpro.published.figure_reference), drawn under our lines
        if reference is not None and x_key == "round" and reference(ax, setting["cond"]):
            entries.setdefault("published curve (reference)", {"color": "0.35", "linestyle": "--", "marker": ""})
        xs = []
        for line in setting["lines"]:
            style = style_of(line["method"], line["variant"])
            entries.setdefault(line["name"], style)
            x = line[x_key].astype(float)
            xs.append(x)
            _draw_line(ax, x, line["acc_mean"], line["acc_std"], style, line["dashed"])
        _diverged_note(ax, setting["lines"])
        ax.set_title(setting["label"], fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(_y_label(setting["cond"]), fontsize=8)
        ax.tick_params(labelsize=7)
        positive = np.concatenate(xs)[np.concatenate(xs) > 0] if xs else np.array([])
        if x_key == "mb_cum" and len(positive) and positive.max() / positive.min() > LOG_SPAN:
            ax.set_xscale("log")
        if x_key == "round":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    _legend_outside(fig, entries)
    return fig


def _main_rows(settings: list[dict]) -> list[dict]:
    out = []
    for s in settings:
        with_default = {ln["method"] for ln in s["lines"] if ln["variant"] == "default"}
        lines = [ln for ln in s["lines"] if is_main_row(ln["method"], ln["variant"], with_default)]
        if lines:
            out.append({**s, "lines": lines})
    return out


def _ablation_panels(settings: list[dict], kind: str) -> list[dict]:
    """(setting, method) panels of the ablated methods: every variant of each method that has more than one."""
    panels = []
    for s in settings:
        with_default = {ln["method"] for ln in s["lines"] if ln["variant"] == "default"}
        methods = []
        for ln in s["lines"]:
            ablated = ln["variant"] != "default" if kind == "ablation" else not is_main_row(
                ln["method"], ln["variant"], with_default)
            if ablated and ln["method"] not in methods:
                methods.append(ln["method"])
        for m in methods:
            lines = [ln for ln in s["lines"] if ln["method"] == m]
            panels.append({**s, "method": m, "lines": lines,
                           "label": f"{METHOD_NAMES.get(m, m)}: {s['label']}"})
    return panels


DEFAULT_UNDER_VARIANTS = {"linewidth": 4.0, "alpha": 0.45, "markersize": 9}  # the default's line in an ablation panel


def _ablation_figure(panels: list[dict], title: str) -> Figure:
    fig, axes = _grid(len(panels), title)
    entries: dict[str, dict] = {}
    # one style per (method, variant) over the whole figure, so every legend entry is told apart
    variants = [(p["method"], ln["variant"]) for p in panels for ln in p["lines"] if ln["variant"] != "default"]
    order = list(dict.fromkeys(variants))
    styles = {key: ablation_style(i) for i, key in enumerate(order)}
    for ax, panel in zip(axes, panels):
        # the default first, wide and translucent, the variants thin on top: a variant with the default's numbers
        # (e.g. one whose switch does nothing in this setting) runs inside it instead of hiding it
        for line in sorted(panel["lines"], key=lambda ln: ln["variant"] != "default"):
            key = (line["method"], line["variant"])
            style = styles[key] if key in styles else {**style_of(line["method"]), **DEFAULT_UNDER_VARIANTS}
            name = f"{METHOD_NAMES.get(line['method'], line['method'])}: {line['variant']}"
            entries.setdefault(name, style)
            _draw_line(ax, line["round"].astype(float), line["acc_mean"], line["acc_std"], style, line["dashed"])
        _diverged_note(ax, panel["lines"])
        ax.set_title(panel["label"], fontsize=9)
        ax.set_xlabel("Round", fontsize=8)
        ax.set_ylabel(_y_label(panel["cond"]), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    _legend_outside(fig, entries)
    return fig


def _diagnostics_figure(setting: dict, columns: list[str], title: str) -> Figure:
    fig, axes = _grid(len(columns), title, cols=len(columns))
    entries: dict[str, dict] = {}
    for ax, col in zip(axes, columns):
        for line in setting["lines"]:
            if f"{col}_mean" not in line or not np.isfinite(line[f"{col}_mean"]).any():
                continue
            style = style_of(line["method"], line["variant"])
            entries.setdefault(line["name"], style)
            ok = np.isfinite(line[f"{col}_mean"])
            std = line[f"{col}_std"][ok]
            _draw_line(ax, line["round"][ok].astype(float), line[f"{col}_mean"][ok], std, style, line["dashed"])
        ax.set_title(DIAGNOSTIC_COLUMNS[col], fontsize=9)
        ax.set_xlabel("Round", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    _legend_outside(fig, entries)
    return fig


# ====================================================================== public
def plot_accuracy(df: pd.DataFrame, out_dir: str | Path, data: list[dict] | None = None, *, title: str = "",
                  stem: str = "accuracy", reference=None) -> list[Path]:
    """Accuracy versus round of the main-table rows, one panel per setting (PNG + PDF); `reference(ax, cond)`
    may draw a published curve into a panel (returns whether it did)."""
    settings = _main_rows(curve_data(df) if data is None else data)
    if not settings:
        return []
    head = f"{title}: accuracy vs round" if title else "Accuracy vs round"
    return _save(_accuracy_figure(settings, "round", "Round", head, reference), Path(out_dir) / stem)


def plot_accuracy_vs_communication(df: pd.DataFrame, out_dir: str | Path, data: list[dict] | None = None, *,
                                   title: str = "", stem: str = "communication") -> list[Path]:
    """Accuracy versus cumulative bytes up + down (MB) of the main-table rows, one panel per setting."""
    settings = _main_rows(curve_data(df) if data is None else data)
    if not settings:
        return []
    head = f"{title}: accuracy vs communication" if title else "Accuracy vs communication"
    return _save(_accuracy_figure(settings, "mb_cum", "Cumulative communication, up + down (MB)", head),
                 Path(out_dir) / stem)


def plot_ablation(df: pd.DataFrame, out_dir: str | Path, data: list[dict] | None = None, *,
                  kind: str = "comparison", title: str = "", stem: str = "ablation") -> list[Path]:
    """The ablation variants against their method's default, one panel per (setting, method); none if no variants."""
    panels = _ablation_panels(curve_data(df) if data is None else data, kind)
    if not panels:
        return []
    head = f"{title}: ablation variants" if title else "Ablation variants"
    return _save(_ablation_figure(panels, head), Path(out_dir) / stem)


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
                  reference=None) -> list[Path]:
    """An experiment's figures as PNG and PDF; returns the paths written.

    ``comparison``: accuracy, communication, ablation (when some rows are ablation variants) and the
    diagnostics per setting (when recorded); ``ablation``: the ablation figure.
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
        paths += plot_diagnostics(df, out_dir, title=title)
    paths += plot_ablation(df, out_dir, data, kind=kind, title=title)
    return paths


__all__ = ["curve_data", "plot_accuracy", "plot_accuracy_vs_communication", "plot_ablation", "plot_diagnostics",
           "diagnostic_columns", "write_figures", "FORMATS", "DIAGNOSTIC_COLUMNS"]
