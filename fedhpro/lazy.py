"""Modules imported on first use, so that validating a workflow config never imports torch.

Snakemake's own process validates the workflow config and builds the run table
(`fedhpro.runtable.build_run_table`): the method, dataset and model registries and every config
check. That process lives for the whole sweep on the submit host, often a login node with a few GB
per user, and importing torch costs it ~0.6 GB resident (torchvision, PIL and friends more). So the
modules on that path bind torch lazily, ``torch = lazy_module("torch")``, and define nothing at
import time that needs it (the nn.Module architectures live in `fedhpro.nets`, reached the same
way); ``tests/test_torch_free.py`` checks that the validation path leaves torch unimported.

`lazy_module(name)` returns a stand-in module that imports the real one on its first attribute
access and then copies the real module's namespace into itself: from then on ``torch.zeros`` is a
plain attribute read (no per-call overhead in training loops). Names the copy lacks (torch's own
lazily loaded submodules, attributes set after the copy) still fall through to the real module.
The stand-in is not registered in `sys.modules`, so ``"torch" in sys.modules`` stays a true
answer to "was torch imported". One consequence of the copy: a test that replaces a function of the
real module after the first access must patch the stand-in where it is used, e.g.
``monkeypatch.setattr(fedhpro.runio.torch, "load", ...)``, not ``torch.load``.

`no_grad` replaces the decorator ``@torch.no_grad()``, which would need torch when the decorated
function is defined; this one enters ``torch.no_grad()`` when the function is called.
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import Any, Callable, TypeVar

__all__ = ["lazy_module", "no_grad"]

_F = TypeVar("_F", bound=Callable[..., Any])


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module `name` that imports it on the first attribute access (see the module docstring).

    A plain module object whose module-level ``__getattr__`` (PEP 562, consulted only for names its namespace
    lacks) does the import and the copy, then becomes the fall-through to the real module: no class-level
    ``__getattr__``, so once filled an attribute read costs what it costs on the real module.
    """
    stand_in = types.ModuleType(name)

    def load(attr: str) -> Any:
        real = importlib.import_module(name)
        stand_in.__dict__.update(real.__dict__)  # includes the real module's own __getattr__, replaced next
        stand_in.__dict__["__getattr__"] = lambda missing: getattr(real, missing)
        return getattr(stand_in, attr)

    stand_in.__dict__["__getattr__"] = load
    return stand_in


_torch = lazy_module("torch")


def no_grad(fn: _F) -> _F:
    """``@torch.no_grad()`` without importing torch at definition time: the call runs under torch.no_grad()."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
