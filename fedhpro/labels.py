"""How runs are shown: display names, paper order, setting labels and slugs, and each method's plot style.

The one public place shared by the tables (`fedhpro.aggregate`) and the figures (`fedhpro.figures`), so
neither imports the other's internals. A *setting* (`CONDITION_KEYS`) is everything that defines a
table column or a figure panel: dataset, split, clients, evaluation mode and model; a table row is a
method with its variant (and, for FedHPro, how its global model was aggregated).

`STYLES` fixes one colour and one marker per method (and per FedHPro main-table variant), so a method
looks the same in every figure; `style_of` falls back to a deterministic extra style for a method or
variant that is not listed.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Sequence

import pandas as pd

SETTING_KEYS = ("method", "variant", "eval_mode", "dataset", "partition", "alpha", "classes_per_client",
                "imbalance_ratio", "num_clients", "model", "aggregation")
# a "setting" as a table column: everything but the method, its variant and how its weights were aggregated
CONDITION_KEYS = tuple(k for k in SETTING_KEYS if k not in ("method", "variant", "aggregation"))
MB = 1e6  # tables and figures use SI megabytes (10^6 bytes)

METHOD_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "creff": "CReFF", "fedhpro": "FedHPro", "moon": "MOON",
                "fedproto": "FedProto", "fpl": "FPL", "fedtgp": "FedTGP", "fedsa": "FedSA", "protonorm": "ProtoNorm",
                "gfpl": "GFPL (reconstructed)", "local": "Local"}
METHOD_ORDER = ("local", "fedavg", "fedprox", "moon", "creff", "fedproto", "fpl", "fedtgp", "fedsa", "protonorm", "gfpl",
                "fedhpro")
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny-ImageNet",
                 "ham10000": "HAM10000", "digit_domains": "Digits", "office_caltech": "Office-Caltech",
                 "agnews": "AG News", "sun397": "SUN397", "digits": "digits"}
PARTITION_ORDER = ("iid", "dirichlet", "creff", "pathological", "nway", "domains")


def sort_key_method(method: str, variant: str) -> tuple:
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method, variant != "default", variant)


def _num(x) -> float:
    return math.nan if x is None or x is pd.NA else float(x)


def sort_key_condition(cond: dict) -> tuple:
    part = cond["partition"]
    alpha = _num(cond["alpha"])
    return (cond["dataset"], PARTITION_ORDER.index(part) if part in PARTITION_ORDER else len(PARTITION_ORDER), part,
            -alpha if alpha == alpha else 0.0, int(cond["classes_per_client"]), float(cond["imbalance_ratio"]),
            int(cond["num_clients"]), cond["eval_mode"] != "global", cond["eval_mode"], str(cond["model"]))


# FedHPro's variants that are rows of the main table (its other variants are ablations): as published
# (`default`) and with real FedAvg aggregation (`fedavg`), and the paper-text variant with each aggregation.
MAIN_VARIANTS = {"fedhpro": ("default", "fedavg", "paper", "paper_fedavg")}
AGGREGATION_NAMES = {"last_client": "last-client aggregation", "fedavg": "FedAvg aggregation",
                     "last_client_head": "last-client head aggregation", "fedavg_head": "FedAvg head aggregation"}
AGGREGATION_NOTE = ("FedHPro rows: \"official code\" and \"last-client aggregation\" = the global model of each round "
                    "is the last sampled client's trained model (with the re-trained classifier), which is what the "
                    "official code computes (its client state_dicts alias one reused model; `aggregation: "
                    "last_client`); \"FedAvg aggregation\" = the sample-weighted mean of the client models "
                    "(`aggregation: fedavg`). \"[recon]\" rows: FedHPro with heterogeneous models (personalized "
                    "mode, reconstructed: no public code), whose shared classifier head is aggregated by the same rule.")


def method_label(method: str, variant: str = "default", aggregation: str | None = None) -> str:
    """Display name of a table row; FedHPro's says which aggregation it used."""
    name = METHOD_NAMES.get(method, method)
    if method == "fedhpro" and aggregation in AGGREGATION_NAMES:
        if aggregation.endswith("_head"):  # personalized mode: a reconstruction, never "the official code"
            what = AGGREGATION_NAMES[aggregation]
            return f"{name} [recon] ({what})" if variant == "default" else f"{name} [recon] ({variant}, {what})"
        if variant == "default" and aggregation == "last_client":
            return f"{name} (official code)"
        if variant in ("default", "fedavg") and aggregation == "fedavg":
            return f"{name} (FedAvg aggregation)"
        variant = variant.removesuffix("_fedavg") if aggregation == "fedavg" else variant
        return f"{name} ({variant}, {AGGREGATION_NAMES[aggregation]})"
    if variant == "default":
        return name
    return f"{name[:-1]}, {variant})" if name.endswith(")") else f"{name} ({variant})"



def _g(x: float) -> str:
    return f"{float(x):g}"


def heterogeneity_label(cond: dict) -> str:
    """'Dir(0.5)', 'Dir(0.5) ρ=100', 'pathological k=2', 'iid', 'domains'."""
    part = cond["partition"]
    alpha, rho, k = _num(cond["alpha"]), float(cond["imbalance_ratio"]), int(cond["classes_per_client"])
    if part in ("dirichlet", "creff"):
        text = f"Dir({_g(alpha)})" if alpha == alpha else part
    elif part == "pathological":
        text = f"pathological k={k}" if k > 0 else "pathological"
    else:
        text = part
    if rho > 1 or part == "creff":
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
# One colour and marker per method, fixed (never assigned by plotting order), so FedAvg is the same
# blue circle in every figure. Colours: tab10 plus darker tones, chosen so no two methods share one.
STYLES: dict[str, dict] = {
    "fedavg": {"color": "#1f77b4", "marker": "o"},
    "fedprox": {"color": "#17becf", "marker": "v"},
    "moon": {"color": "#2ca02c", "marker": "s"},
    "creff": {"color": "#8c564b", "marker": "D"},
    "fedproto": {"color": "#ff7f0e", "marker": "^"},
    "fpl": {"color": "#bcbd22", "marker": "<"},
    "fedtgp": {"color": "#9467bd", "marker": ">"},
    "fedsa": {"color": "#e377c2", "marker": "p"},
    "protonorm": {"color": "#7f7f7f", "marker": "h"},
    "gfpl": {"color": "#393b79", "marker": "X"},
    "fedhpro": {"color": "#d62728", "marker": "*"},
    "local": {"color": "#000000", "marker": "x"},
}
# FedHPro's main-table rows: one red family, told apart by marker and line style
VARIANT_STYLES: dict[tuple[str, str], dict] = {
    ("fedhpro", "fedavg"): {"color": "#ff9896", "marker": "P", "linestyle": "--"},
    ("fedhpro", "paper"): {"color": "#8b0000", "marker": "d", "linestyle": "-."},
    ("fedhpro", "paper_fedavg"): {"color": "#e7969c", "marker": "d", "linestyle": ":"},
}
# for methods and ablation variants not listed above (deterministic: picked by a hash of the name)
EXTRA_STYLES = ({"color": "#000000", "marker": "o"}, {"color": "#aec7e8", "marker": "s"},
                {"color": "#98df8a", "marker": "^"}, {"color": "#c49c94", "marker": "v"},
                {"color": "#f7b6d2", "marker": "D"}, {"color": "#c5b0d5", "marker": "<"},
                {"color": "#dbdb8d", "marker": ">"}, {"color": "#9edae5", "marker": "p"})
# ablation variants of one method: distinct from each other, in variant order (the default keeps the method's style)
ABLATION_STYLES = ({"color": "#1f77b4", "marker": "o", "linestyle": "--"}, {"color": "#2ca02c", "marker": "s", "linestyle": "-."},
                   {"color": "#ff7f0e", "marker": "^", "linestyle": ":"}, {"color": "#9467bd", "marker": "v", "linestyle": "--"},
                   {"color": "#8c564b", "marker": "D", "linestyle": "-."}, {"color": "#e377c2", "marker": "<", "linestyle": ":"},
                   {"color": "#17becf", "marker": ">", "linestyle": "--"}, {"color": "#bcbd22", "marker": "p", "linestyle": "-."},
                   {"color": "#7f7f7f", "marker": "h", "linestyle": ":"}, {"color": "#000000", "marker": "X", "linestyle": "--"})


def style_of(method: str, variant: str = "default") -> dict:
    """matplotlib keywords (color, marker, linestyle) of a main-table row: the same in every figure."""
    if (method, variant) in VARIANT_STYLES:
        return {"linestyle": "-", **VARIANT_STYLES[(method, variant)]}
    if method in STYLES and (variant == "default" or method != "fedhpro"):
        return {"linestyle": "-", **STYLES[method]}
    key = method if variant == "default" else f"{method}/{variant}"
    pick = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(EXTRA_STYLES)
    return {"linestyle": "-" if method not in STYLES else "--", **EXTRA_STYLES[pick]}


def ablation_style(index: int) -> dict:
    """The style of the `index`-th ablation variant drawn in a figure (the defaults keep their method's style)."""
    return dict(ABLATION_STYLES[index % len(ABLATION_STYLES)])


def is_main_row(method: str, variant: str, methods_with_default: set[str] | None = None) -> bool:
    """Whether a (method, variant) is a main-table row: FedHPro's non-main variants are ablations when its
    default ran (`methods_with_default` holds the methods whose default ran; None = assume it did)."""
    if method not in MAIN_VARIANTS:
        return True
    if methods_with_default is not None and method not in methods_with_default:
        return True
    return variant in MAIN_VARIANTS[method]
