"""How runs are shown: display names, paper order, setting labels and slugs, and each method's plot style.

The one public place shared by the tables (`fedhpro.aggregate`) and the figures (`fedhpro.figures`), so
neither imports the other's internals. A *setting* (`CONDITION_KEYS`) is everything that defines a
table column or a figure panel: dataset, split, clients, evaluation mode and model; a table row is a
method with its variant (and, for FedHPro, how its global model was aggregated).

Everything about a method (display name, order, style, main-table variants, how its `aggregation` values
read, its notes) is its declaration's (`fedhpro.methods.Method`): this module reads it, and names no
method. `style_of` gives one colour and one marker per method (and per declared main-table variant), so a
method looks the same in every figure, and falls back to a deterministic extra style for a method or variant
that is not declared (e.g. the results of a method no longer registered).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Sequence

import pandas as pd

from fedhpro.methods import METHOD_MODULES, METHODS, Method
from fedhpro.partition import SCHEMES  # each partition scheme's label and table order, declared with the scheme

PARTITION_ORDER = tuple(sorted(SCHEMES, key=lambda name: SCHEMES[name].rank))  # the shipped schemes' table order

SETTING_KEYS = ("method", "variant", "eval_mode", "dataset", "partition", "alpha", "classes_per_client",
                "imbalance_ratio", "num_clients", "model", "aggregation")
# a "setting" as a table column: everything but the method, its variant and how its weights were aggregated
CONDITION_KEYS = tuple(k for k in SETTING_KEYS if k not in ("method", "variant", "aggregation"))
MB = 1e6  # tables and figures use SI megabytes (10^6 bytes)



def declared(method: str) -> Method | None:
    """The declaration of a registered method; None for a name that is not (results of an old method)."""
    return METHODS[method] if method in METHOD_MODULES else None


def method_name(method: str) -> str:
    """The display name of a method (its own name if it is not registered)."""
    decl = declared(method)
    return decl.display if decl is not None else method


def method_order() -> tuple[str, ...]:
    """The registered methods in paper order (their declared `order`)."""
    return tuple(sorted(METHOD_MODULES, key=lambda m: (METHODS[m].order, m)))


def aggregation_name(value: str | None) -> str | None:
    """An `aggregation` column value in words, as the method that writes it declares (None if none does)."""
    for m in METHOD_MODULES:
        if value in METHODS[m].aggregation_names:
            return METHODS[m].aggregation_names[value]
    return None


def shows_aggregation(methods: Sequence[str]) -> bool:
    """Whether a table of these methods' rows needs an Aggregation column: one of them has a choice of it."""
    return any(d is not None and d.aggregation_names for d in map(declared, methods))


def proposed_method() -> str | None:
    """The paper's method (declared `proposed`): the ablation table's default subject."""
    return next((m for m in method_order() if METHODS[m].proposed), None)


DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny-ImageNet",
                 "ham10000": "HAM10000", "digit_domains": "Digits", "office_caltech": "Office-Caltech",
                 "agnews": "AG News", "sun397": "SUN397", "digits": "digits"}


def sort_key_method(method: str, variant: str) -> tuple:
    order = method_order()
    rank = order.index(method) if method in order else len(order)
    return (rank, method, variant != "default", variant)


def _num(x) -> float:
    return math.nan if x is None or x is pd.NA else float(x)


def sort_key_condition(cond: dict) -> tuple:
    part = cond["partition"]
    alpha = _num(cond["alpha"])
    rank = SCHEMES[part].rank if part in SCHEMES else max(s.rank for s in SCHEMES.values()) + 1
    return (cond["dataset"], rank, part,
            -alpha if alpha == alpha else 0.0, int(cond["classes_per_client"]), float(cond["imbalance_ratio"]),
            int(cond["num_clients"]), cond["eval_mode"] != "global", cond["eval_mode"], str(cond["model"]))


def method_label(method: str, variant: str = "default", aggregation: str | None = None) -> str:
    """Display name of a table row: the method's own label where it declares one for this aggregation
    (`Method.row_label`), else its display name with the variant."""
    decl = declared(method)
    name = method_name(method)
    if decl is not None and decl.row_label is not None:
        label = decl.row_label(name, variant, aggregation)
        if label is not None:
            return label
    if variant == "default":
        return name
    return f"{name[:-1]}, {variant})" if name.endswith(")") else f"{name} ({variant})"


def _g(x: float) -> str:
    return f"{float(x):g}"


def heterogeneity_label(cond: dict) -> str:
    """'Dir(0.5)', 'Dir(0.5) ρ=100', 'pathological k=2', 'iid', 'domains': the scheme's declared label
    (`fedhpro.partition.SCHEMES`; a scheme no longer declared: its name), then ρ where there is a long tail."""
    part = cond["partition"]
    scheme = SCHEMES.get(part)
    rho = float(cond["imbalance_ratio"])
    text = scheme.label_of(cond) if scheme is not None else str(part)
    if rho > 1 or (scheme is not None and scheme.rho_in_label):
        text += f" ρ={_g(rho)}"
    return text


def condition_label(cond: dict) -> str:
    return f"{DATASET_NAMES.get(cond['dataset'], cond['dataset'])} {heterogeneity_label(cond)}"


def condition_labels(conds: Sequence[dict]) -> list[str]:
    """Column labels; settings that would read the same get the fields that tell them apart appended."""
    base = [condition_label(c) for c in conds]
    extras: list[list[str]] = [[] for _ in conds]
    for label in set(base):
        idx = [i for i, b in enumerate(base) if b == label]
        if len(idx) < 2:
            continue
        for key, fmt in (("partition", str), ("eval_mode", str), ("num_clients", lambda v: f"N={int(v)}"),
                         ("model", str)):
            values = {str(conds[i][key]) for i in idx}
            if len(values) > 1:
                for i in idx:
                    extras[i].append(fmt(conds[i][key]))
    return [b + (f" [{', '.join(e)}]" if e else "") for b, e in zip(base, extras)]


def _slug_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-.") or "x"


def condition_slug(cond: dict) -> str:
    """A safe, deterministic file-name stem for a setting: 'digits_dirichlet_a0.5_n10_global_auto'."""
    parts = [cond["dataset"], cond["partition"]]
    alpha = _num(cond["alpha"])
    if alpha == alpha:
        parts.append(f"a{_g(alpha)}")
    if int(cond["classes_per_client"]) > 0:
        parts.append(f"k{int(cond['classes_per_client'])}")
    if float(cond["imbalance_ratio"]) != 1:
        parts.append(f"rho{_g(cond['imbalance_ratio'])}")
    parts += [f"n{int(cond['num_clients'])}", cond["eval_mode"], cond["model"]]
    return "_".join(_slug_part(p) for p in parts)


def cond_of(row) -> dict:
    return {k: row[k] for k in CONDITION_KEYS}


def cond_id(cond: dict) -> tuple:
    return tuple("nan" if isinstance(v, float) and v != v else v for v in (cond[k] for k in CONDITION_KEYS))


# ====================================================================== plot styles
# One colour, marker and line style per method, fixed (never assigned by plotting order), so FedAvg is the
# same dark-blue circle in every figure. Colours from Paul Tol's colour-blind-safe schemes, picked over the
# whole range of lightness; rows of similar lightness differ in line style, and every row has its own marker,
# so the rows stay apart in greyscale print too (tests/test_experiments.py checks both).
# for methods and ablation variants not listed above (deterministic: picked by a hash of the name)
EXTRA_STYLES = ({"color": "#555555", "marker": "1"}, {"color": "#BBBBBB", "marker": "2"},
                {"color": "#004488", "marker": "3"}, {"color": "#DDAA33", "marker": "4"},
                {"color": "#BB5566", "marker": "+"}, {"color": "#66CCEE", "marker": "x"},
                {"color": "#228833", "marker": "|"}, {"color": "#AA3377", "marker": "_"})
# ablation variants of one method: distinct from each other, in variant order (the default keeps the method's style)
ABLATION_STYLES = ({"color": "#004488", "marker": "o", "linestyle": "--"}, {"color": "#DDAA33", "marker": "s", "linestyle": "-."},
                   {"color": "#117733", "marker": "^", "linestyle": ":"}, {"color": "#AA3377", "marker": "v", "linestyle": "--"},
                   {"color": "#88CCEE", "marker": "D", "linestyle": "-."}, {"color": "#000000", "marker": "<", "linestyle": ":"},
                   {"color": "#999933", "marker": ">", "linestyle": "--"}, {"color": "#BBBBBB", "marker": "p", "linestyle": "-."},
                   {"color": "#882255", "marker": "h", "linestyle": ":"}, {"color": "#44AA99", "marker": "X", "linestyle": "--"})


def grey_level(color: str) -> float:
    """Lightness of a '#rrggbb' colour as greyscale print renders it (ITU-R BT.601 luma, 0 black .. 1 white)."""
    r, g, b = (int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b


def style_of(method: str, variant: str = "default") -> dict:
    """matplotlib keywords (color, marker, linestyle) of a main-table row: the same in every figure (the method's
    declared `style`, or `variant_styles`). A variant the method does not style (e.g. a FedProx mu sweep) keeps
    the method's colour with its own marker and line style."""
    decl = declared(method)
    if decl is not None and variant in decl.variant_styles:
        return {"linestyle": "-", **decl.variant_styles[variant]}
    if decl is not None and variant == "default":
        return {"linestyle": "-", **decl.style}
    key = method if variant == "default" else f"{method}/{variant}"
    pick = EXTRA_STYLES[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(EXTRA_STYLES)]
    if decl is not None:
        own = decl.style.get("linestyle", "-")
        return {"color": decl.style["color"], "marker": pick["marker"],
                "linestyle": next(ls for ls in ("--", ":", "-.", "-") if ls != own), "linewidth": 1.0}
    return {"linestyle": "-", **pick}


def ablation_style(index: int) -> dict:
    """The style of the `index`-th ablation variant drawn in a figure (the defaults keep their method's style)."""
    return dict(ABLATION_STYLES[index % len(ABLATION_STYLES)])


def is_main_row(method: str, variant: str, methods_with_default: set[str] | None = None) -> bool:
    """Whether a (method, variant) is a main-table row: a method that declares its `main_variants` (FedHPro) has
    its other variants in the ablation table when its default ran (`methods_with_default` holds the methods whose
    default ran; None = assume it did)."""
    decl = declared(method)
    if decl is None or decl.main_variants is None:
        return True
    if methods_with_default is not None and method not in methods_with_default:
        return True
    return variant in decl.main_variants


# ====================================================================== ablations: Δ against the right default
NOISE_SE = 2.0  # a Δ is "inside the noise" when |Δ| < NOISE_SE x its standard error


def reference_variant(variant: str, aggregation: str | None, aggregation_of: dict[str, str | None]) -> str | None:
    """The variant an ablation variant is compared with: the method's default of the same aggregation.

    `aggregation_of` maps the method's variants (in the setting) to their aggregation. The references are
    ``default`` and a variant named after an aggregation (FedHPro's ``fedavg``: ``aggregation: fedavg``), so
    ``no_hpcl_fedavg`` (FedAvg aggregation) is compared with ``fedavg``, ``no_hpcl`` with ``default``.
    None for a reference itself, or when no reference ran.
    """
    refs = {v: a for v, a in aggregation_of.items() if v == "default" or (a is not None and v == a)}
    if variant in refs:
        return None
    same = [v for v, a in refs.items() if a == aggregation]
    if same:
        return "default" if "default" in same else same[0]
    return "default" if "default" in refs else None


def paired_delta(variant_runs: pd.DataFrame, reference_runs: pd.DataFrame) -> dict:
    """Δ (points) of a variant against its reference over the seeds both finished, paired by (seed, partition
    seed): ``{"delta", "se", "n", "noise"}``. ``se`` is the standard error of the mean paired difference (NaN
    under two pairs); ``noise``: |Δ| < `NOISE_SE` x se (None when se is unknown). Runs carry ``acc`` (fraction)."""
    def by_seed(runs: pd.DataFrame) -> pd.Series:
        ok = runs[(runs["status"] == "finished") & runs["acc"].notna()]
        return ok.groupby(["seed", "partition_seed"])["acc"].mean() * 100

    a, b = by_seed(variant_runs), by_seed(reference_runs)
    common = a.index.intersection(b.index)
    diffs = (a[common] - b[common]).to_numpy(float)
    n = len(diffs)
    delta = float(diffs.mean()) if n else math.nan
    se = float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"delta": delta, "se": se, "n": n, "noise": None if not se == se else bool(abs(delta) < NOISE_SE * se)}


def combine_deltas(parts: Sequence[dict]) -> dict:
    """Mean of per-setting Δs with the standard error of that mean (independent settings), as `paired_delta`."""
    parts = [p for p in parts if p["n"] and p["delta"] == p["delta"]]
    if not parts:
        return {"delta": math.nan, "se": math.nan, "n": 0, "noise": None}
    k = len(parts)
    delta = sum(p["delta"] for p in parts) / k
    ses = [p["se"] for p in parts]
    se = math.sqrt(sum(s * s for s in ses)) / k if all(s == s for s in ses) else math.nan
    return {"delta": delta, "se": se, "n": min(p["n"] for p in parts),
            "noise": None if not se == se else bool(abs(delta) < NOISE_SE * se)}


def delta_text(d: dict) -> str:
    """'+1.20 ± 0.40', '-0.31 ± 0.90 (noise)', '+2.00 (n=1, no SE)', '–'."""
    if not d["n"] or d["delta"] != d["delta"]:
        return "–"
    if d["se"] != d["se"]:
        return f"{d['delta']:+.2f} (n={d['n']}, no SE)"
    return f"{d['delta']:+.2f} ± {d['se']:.2f}" + (" (noise)" if d["noise"] else "")


# ====================================================================== method notes (once per experiment)
def method_notes(rows: Sequence[tuple[str, str, str | None]], personalized: bool = False) -> str:
    """The notes that explain the row names present (method, variant, aggregation); '' when none applies.
    `personalized`: some rows are personalized-mode runs, so say which methods predict by nearest prototype
    (declared `nearest_prototype`). Each method's own notes (`Method.notes`) follow: the proposed method's first,
    then in method order."""
    notes = []
    methods = sorted({m for m, _, _ in rows}, key=lambda m: sort_key_method(m, "default"))
    if personalized and methods:
        nearest = {m for m in methods if (d := declared(m)) is not None and d.nearest_prototype}
        proto = [method_name(m) for m in methods if m in nearest]
        other = [method_name(m) for m in methods if m not in nearest]
        parts = ([f"{', '.join(proto)} predict{'s' if len(proto) == 1 else ''} by the nearest global prototype"]
                 if proto else []) + ([f"{', '.join(other)} by {'its' if len(other) == 1 else 'their'} classifier"]
                                      if other else [])
        notes.append("Personalized mode: " + "; ".join(parts) + " (unless a variant sets `eval_rule`).")
    for m in sorted(methods, key=lambda m: not (declared(m) is not None and declared(m).proposed)):
        decl = declared(m)
        if decl is None:
            continue
        aggs = {a for mm, _, a in rows if mm == m}
        notes += [text for needs, text in decl.notes if not needs or aggs & set(needs)]
    return " ".join(notes)


# Names that read the declarations (`from fedhpro.labels import METHOD_ORDER`), computed when asked for, so
# importing this module imports no method.
_DERIVED = {
    "METHOD_ORDER": method_order,
    "METHOD_NAMES": lambda: {m: METHODS[m].display for m in method_order()},
    "STYLES": lambda: {m: dict(METHODS[m].style) for m in method_order()},
    "VARIANT_STYLES": lambda: {(m, v): dict(s) for m in method_order() for v, s in METHODS[m].variant_styles.items()},
}


def __getattr__(name: str) -> Any:
    if name in _DERIVED:
        return _DERIVED[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
