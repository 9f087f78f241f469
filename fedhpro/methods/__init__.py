"""Method registry: one module per method, each declaring itself in one `Method` object, `METHOD`.

A method module (`fedhpro/methods/<name>.py`) defines its hyperparameters `Params` (a frozen dataclass whose
fields are made with `param(default, help, choices=..., low=...)`, the helper `RunConfig`'s keys use too),
its `Client(ClientBase)` and `Server(ServerBase)` (`fedhpro.engine`), and then

    METHOD = Method(name="fedprox", paper=..., display="FedProx", order=2, style={...}, modes=("global",),
                    communicates=..., Params=Params, Client=Client, Server=Server, engines=(...), ...)

and its line in `METHOD_MODULES` below. Everything else asks the declaration: validation (`check_supported`),
the config hash (`revisions`), the tests (`fast_test_params`), `fedhpro methods`, the methods table of the docs
(`fedhpro.docs`), and the tables' and figures' names, order, styles and notes (`fedhpro.labels`). The
declaration is checked when the module is first loaded (`MethodDeclarationError` naming the field), so a
mistake stops `fedhpro methods` and every run, not a late report.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fedhpro.errors import ConfigError
from fedhpro.params import check_value, declared_choices, declared_fields, param  # noqa: F401  (param: methods')

METHOD_MODULES = {
    "fedavg": "fedhpro.methods.fedavg",
    "fedprox": "fedhpro.methods.fedprox",
    "creff": "fedhpro.methods.creff",
    "fedhpro": "fedhpro.methods.fedhpro",
    "fedproto": "fedhpro.methods.fedproto",
    "moon": "fedhpro.methods.moon",
    "fpl": "fedhpro.methods.fpl",
    "fedtgp": "fedhpro.methods.fedtgp",
    "fedsa": "fedhpro.methods.fedsa",
    "protonorm": "fedhpro.methods.protonorm",
    "gfpl": "fedhpro.methods.gfpl",
    "local": "fedhpro.methods.local",
}
# what a declaration may name (`fedhpro.config.EVAL_MODES`/`ENGINES`; a test checks they agree)
KNOWN_MODES = ("global", "personalized")
KNOWN_ENGINES = ("sequential", "batched")
STYLE_KEYS = ("color", "marker", "linestyle", "linewidth", "markersize")


def _field(help: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A `Method` field with its one line of help (the docs' "Adding a method" table is made from them)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass(frozen=True, eq=False)
class Method:
    """Everything the pipeline knows about a method, declared once in its module as `METHOD`."""

    name: str = _field("the registry key and the config's `method`")
    paper: str = _field("citation line")
    display: str = _field("its name in tables and figures")
    order: int = _field("rank of its rows in tables and legends (baselines first, the proposed method last)")
    style: Mapping[str, Any] = _field("its line in every figure: matplotlib `color`, `marker` (+ `linestyle`, "
                                      "`linewidth`, `markersize`)")
    modes: tuple[str, ...] = _field("the evaluation modes (`eval_mode`) it supports")
    communicates: str = _field("what travels between clients and server, in words")
    Params: type = _field("frozen dataclass of its hyperparameters, fields made with `param(default, help, "
                          "choices, bounds)`: their help and validation")
    Client: type = _field("`ClientBase` subclass: local training hooks (`setup`, `start_epoch`, `loss`, "
                          "`before_step`, `upload`) and `UPLOAD_METADATA`; one object serves every client, so "
                          "per-client data lives in `state`, never on `self`")
    Server: type = _field("`ServerBase` subclass: `broadcast`, `aggregate`, `aggregate_weights`, `scores`, "
                          "`global_class_signal`, the checkpointed `STATE` and `BROADCAST_METADATA`")
    engines: tuple[str, ...] = _field("the local-training engines (`engine`) that run it exactly", ("sequential",))
    heterogeneous_models: bool = _field("whether clients may use different architectures (`client_models`)", False)
    calls_model: bool = _field("whether its `Client.loss` runs the model itself (`model(x)`), the pass that `compile` "
                               "compiles; False (it calls submodules only): `compile` is refused, as it would "
                               "change nothing", True)
    fast_test_params: Mapping[str, Any] = _field("method parameters that make a digits run take seconds (the "
                                                 "contract, fault and precision tests, benchmarks)", factory=dict)
    revisions: tuple[str, ...] = _field("one line per change of its behaviour under unchanged parameters; the "
                                        "count enters the config hash, so a fix never reuses old results", ())
    model_wrapper: Callable[[Any], Callable | None] | None = _field(
        "`model_wrapper(ctx)` returns a function applied to every model the run builds (MOON's projection head)",
        None)
    weight_aggregation: Callable[[Any], str] | None = _field(
        "`weight_aggregation(cfg)`: the run's `aggregation` column, for a method with a choice of it", None)
    # ---- reporting (fedhpro.labels, fedhpro.aggregate, fedhpro.figures)
    proposed: bool = _field("the paper's method: the ablation table's default subject, highlighted in figures",
                            False)
    main_variants: tuple[str, ...] | None = _field("its variants that are main-table rows (the others are "
                                                   "ablations); None: all", None)
    variant_styles: Mapping[str, Mapping[str, Any]] = _field("the figure style of each main-table variant",
                                                             factory=dict)
    aggregation_names: Mapping[str, str] = _field("its `aggregation` column values in words", factory=dict)
    row_label: Callable[[str, str, str | None], str | None] | None = _field(
        "`row_label(display, variant, aggregation)`: a table row's name where the aggregation names it (None: "
        "the generic name)", None)
    notes: tuple[tuple[tuple[str, ...], str], ...] = _field(
        "notes under a table that shows its rows: (the `aggregation` values that need it, or () for any, note)", ())
    nearest_prototype: bool = _field("personalized `eval_rule: auto` predicts by the nearest global prototype",
                                     False)
    compare_upload: bool = _field("a prototype baseline the communication table compares the proposed method's "
                                  "upload with", False)
    upload_note: str = _field("the proposed method: what it uploads besides those baselines' payload", "")


class MethodDeclarationError(TypeError):
    """A method module's `METHOD` is missing or malformed (the message names the module and the field)."""


def _check_declaration(key: str, module_name: str, module: Any) -> Method:
    """The module's `METHOD`, checked field by field; MethodDeclarationError names the first bad one."""
    method = getattr(module, "METHOD", None)

    def bad(what: str) -> MethodDeclarationError:
        return MethodDeclarationError(f"{module_name}: METHOD.{what}")

    if not isinstance(method, Method):
        raise MethodDeclarationError(f"{module_name}: defines no METHOD = Method(...) (fedhpro.methods.Method)")
    if method.name != key:
        raise bad(f"name is {method.name!r}, but METHOD_MODULES registers it as {key!r}")
    for name in ("paper", "display", "communicates"):
        if not isinstance(getattr(method, name), str) or not getattr(method, name).strip():
            raise bad(f"{name}: a non-empty string is required")
    if not isinstance(method.order, int) or isinstance(method.order, bool):
        raise bad(f"order: an integer is required, not {method.order!r}")
    for name, known in (("modes", KNOWN_MODES), ("engines", KNOWN_ENGINES)):
        values = getattr(method, name)
        if not isinstance(values, tuple) or not values or len(set(values)) != len(values) \
                or any(v not in known for v in values):
            raise bad(f"{name}: a non-empty tuple of distinct values among {', '.join(known)}, not {values!r}")
    if "sequential" not in method.engines:
        raise bad("engines: must include 'sequential' (the reference every engine is checked against)")
    for name, style in [("style", method.style)] + [(f"variant_styles[{v!r}]", s)
                                                    for v, s in method.variant_styles.items()]:
        if not isinstance(style, Mapping) or not {"color", "marker"} <= set(style) or set(style) - set(STYLE_KEYS):
            raise bad(f"{name}: needs color and marker (and may set {', '.join(STYLE_KEYS[2:])})")
    if not (dataclasses.is_dataclass(method.Params) and isinstance(method.Params, type)
            and method.Params.__dataclass_params__.frozen):
        raise bad("Params: a frozen dataclass is required")
    for f in dataclasses.fields(method.Params):
        if not f.metadata.get("help"):
            raise bad(f"Params.{f.name}: declare it with param(default, help, ...)")
    for name in ("Client", "Server"):
        if not isinstance(getattr(method, name), type):
            raise bad(f"{name}: a class is required")
    if not isinstance(method.revisions, tuple) or not all(isinstance(r, str) and r for r in method.revisions):
        raise bad("revisions: a tuple of non-empty strings (one per behaviour change) is required")
    if method.main_variants is not None and "default" not in method.main_variants:
        raise bad("main_variants: must include 'default'")
    for name in ("model_wrapper", "weight_aggregation", "row_label"):
        if getattr(method, name) is not None and not callable(getattr(method, name)):
            raise bad(f"{name}: a function or None is required")
    try:
        resolve_params_of(method, method.fast_test_params)
    except ConfigError as err:
        raise bad(f"fast_test_params: {err}") from None
    return method


_LOADED: dict[str, tuple[str, Method]] = {}  # registry key -> (module name, its checked declaration)


def method_of(name: str) -> Method:
    """The checked declaration of the registered method `name` (its module imported on first use)."""
    module_name = METHOD_MODULES[name]
    cached = _LOADED.get(name)
    if cached is None or cached[0] != module_name:  # a test may register another module under a name
        cached = (module_name, _check_declaration(name, module_name, importlib.import_module(module_name)))
        _LOADED[name] = cached
    return cached[1]


class _LazyMethods(Mapping):
    """name -> its `Method` declaration, the module imported on first use."""

    def __getitem__(self, name: str) -> Method:
        if name not in METHOD_MODULES:
            raise KeyError(name)
        return method_of(name)

    def __iter__(self) -> Iterator[str]:
        return iter(METHOD_MODULES)

    def __len__(self) -> int:
        return len(METHOD_MODULES)


METHODS: Mapping[str, Method] = _LazyMethods()


def resolve_params_of(method: Method, overrides: Mapping[str, Any]) -> dict[str, Any]:
    known = declared_fields(method.Params)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"config key 'method_params.{unknown[0]}' is not a parameter of {method.name!r}; "
                          f"accepted: {', '.join(sorted(known)) or '(none)'}")
    return {name: check_value(f"method_params.{name}", f, kind, nullable, overrides[name], owner=method.name)
            if name in overrides else f.default for name, (f, kind, nullable) in known.items()}


def resolve_params(method: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of `method` updated with `overrides`, validated; a plain dict."""
    return resolve_params_of(METHODS[method], overrides)


def fast_test_params(method: str) -> dict[str, Any]:
    """The method's `fast_test_params` (a copy)."""
    return dict(METHODS[method].fast_test_params)


def check_supported(cfg: Any) -> None:
    """Raise ConfigError (naming the key) unless the method declares support for the config's evaluation mode
    (`modes`), engine (`engines`), with several client architectures `heterogeneous_models`, and with `compile`
    `calls_model`."""
    method = METHODS[cfg.method]
    if cfg.eval_mode not in method.modes:
        raise ConfigError(f"config key 'eval_mode': method {cfg.method!r} supports {', '.join(method.modes)}, "
                          f"not {cfg.eval_mode!r}")
    if cfg.engine not in method.engines:
        raise ConfigError(f"config key 'engine': method {cfg.method!r} supports engine "
                          f"{', '.join(method.engines)}, not {cfg.engine!r}")
    if len(set(cfg.client_models)) > 1 and not method.heterogeneous_models:
        raise ConfigError(f"config key 'client_models': method {cfg.method!r} needs identical client models")
    if cfg.compile != "none" and not method.calls_model:
        raise ConfigError(f"config key 'compile': method {cfg.method!r} runs its model's submodules in local "
                          "training, never the model itself (`calls_model` false), so compiling the model would "
                          "change nothing; use 'none'")


def method_revision(method: str) -> int:
    """The method's behaviour revision: how many behaviour changes its `revisions` lists."""
    return len(METHODS[method].revisions)


def revision_changes(method: str, since: int) -> list[str]:
    """The `revisions` lines of `method` after revision `since`: what changed since a result was computed."""
    return list(METHODS[method].revisions)[since:]


def make_params(method: str, values: Mapping[str, Any]) -> Any:
    return METHODS[method].Params(**resolve_params(method, values))


def describe_methods() -> str:
    """Human-readable list of every method, its paper, modes and hyperparameters with defaults."""
    lines = []
    for name in METHOD_MODULES:
        method = METHODS[name]
        lines.append(f"{name} ({method.display}): {method.paper}")
        lines.append(f"  modes: {', '.join(method.modes)}; engines: {', '.join(method.engines)}; "
                     f"heterogeneous models: {'yes' if method.heterogeneous_models else 'no'}; "
                     f"compile: {'yes' if method.calls_model else 'no'}; "
                     f"communicates: {method.communicates}")
        for f in dataclasses.fields(method.Params):
            choices = declared_choices(f)
            extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
            lines.append(f"    {f.name} = {f.default!r}{extra}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
