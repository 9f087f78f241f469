"""Method registry: one module per method, each with `Params`, `Client`, `Server`, `MODES`.

A method module declares:
- `Params`: a frozen dataclass of its hyperparameters; each field made with
  `param(default, help, choices=..., low=...)` (`fedhpro.params`, the helper
  RunConfig's keys use too) so defaults, documentation and validation live in
  one place and one checker validates both;
- `Client(ClientBase)` and `Server(ServerBase)` (see `fedhpro.engine`);
- `MODES`: the evaluation modes it supports; `ENGINES`: the local-training
  engines (`engine` key) that run it exactly (default: sequential only);
  `HETEROGENEOUS_MODELS`: whether clients may use different architectures;
  `PAPER`: the citation line; validation asks these (`check_supported`);
- `model_wrapper(ctx)` (optional): returns a function applied to every model
  the run builds (see `Context.install_model_wrapper`);
- `FAST_TEST_PARAMS` (optional): method parameters that make a digits run take
  seconds (fewer server steps); the contract test, the fault and precision
  tests and the benchmarks use them;
- `REVISIONS` (optional): one line per change of the method's behaviour under
  unchanged parameters (a bug fix, a corrected reading of the official code).
  Its length is the method's behaviour revision, which enters the config hash
  (`RunConfig.canonical_dict`), so results computed before a change are never
  reused under the same run id: a behaviour fix is one appended line.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Iterator

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


class _LazyMethods(Mapping):
    """name -> method module, imported on first use."""

    def __getitem__(self, name: str) -> ModuleType:
        if name not in METHOD_MODULES:
            raise KeyError(name)
        return importlib.import_module(METHOD_MODULES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(METHOD_MODULES)

    def __len__(self) -> int:
        return len(METHOD_MODULES)


METHODS: Mapping[str, ModuleType] = _LazyMethods()


def resolve_params(method: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of `method` updated with `overrides`, validated; a plain dict."""
    module = METHODS[method]
    known = declared_fields(module.Params)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"config key 'method_params.{unknown[0]}' is not a parameter of {method!r}; "
                          f"accepted: {', '.join(sorted(known)) or '(none)'}")
    return {name: check_value(f"method_params.{name}", f, kind, nullable, overrides[name], owner=method)
            if name in overrides else f.default for name, (f, kind, nullable) in known.items()}


def supported_engines(module: ModuleType) -> tuple[str, ...]:
    return tuple(getattr(module, "ENGINES", ("sequential",)))


def fast_test_params(method: str) -> dict[str, Any]:
    """The method's `FAST_TEST_PARAMS` (a copy; {} if it declares none)."""
    return dict(getattr(METHODS[method], "FAST_TEST_PARAMS", {}))


def check_supported(cfg: Any) -> None:
    """Raise ConfigError (naming the key) unless the method's module declares support for the config's
    evaluation mode (`MODES`), engine (`ENGINES`) and, with several client architectures,
    `HETEROGENEOUS_MODELS`."""
    module = METHODS[cfg.method]
    if cfg.eval_mode not in module.MODES:
        raise ConfigError(f"config key 'eval_mode': method {cfg.method!r} supports {', '.join(module.MODES)}, "
                          f"not {cfg.eval_mode!r}")
    engines = supported_engines(module)
    if cfg.engine not in engines:
        raise ConfigError(f"config key 'engine': method {cfg.method!r} supports engine {', '.join(engines)}, "
                          f"not {cfg.engine!r}")
    if len(set(cfg.client_models)) > 1 and not module.HETEROGENEOUS_MODELS:
        raise ConfigError(f"config key 'client_models': method {cfg.method!r} needs identical client models")


def method_revision(method: str) -> int:
    """The method's behaviour revision: how many behaviour changes its `REVISIONS` lists (0 if none)."""
    return len(getattr(METHODS[method], "REVISIONS", ()))


def revision_changes(method: str, since: int) -> list[str]:
    """The `REVISIONS` lines of `method` after revision `since`: what changed since a result was computed."""
    return list(getattr(METHODS[method], "REVISIONS", ()))[since:]


def make_params(method: str, values: Mapping[str, Any]) -> Any:
    return METHODS[method].Params(**resolve_params(method, values))


def describe_methods() -> str:
    """Human-readable list of every method, its paper, modes and hyperparameters with defaults."""
    lines = []
    for name in METHOD_MODULES:
        module = METHODS[name]
        lines.append(f"{name}: {module.PAPER}")
        lines.append(f"  modes: {', '.join(module.MODES)}; engines: {', '.join(supported_engines(module))}; "
                     f"heterogeneous models: "
                     f"{'yes' if module.HETEROGENEOUS_MODELS else 'no'}; communicates: {module.COMMUNICATES}")
        for f in dataclasses.fields(module.Params):
            choices = declared_choices(f)
            extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
            lines.append(f"    {f.name} = {f.default!r}{extra}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
