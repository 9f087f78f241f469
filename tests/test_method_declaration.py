"""Method declarations (`fedhpro.methods.Method`): checked when registered, the one source of `fedhpro methods`,
the labels and the docs' method tables; a new method is exactly the files the docs state."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import types
from pathlib import Path

import pytest

from fedhpro import docs, labels
from fedhpro.config import ENGINES, EVAL_MODES, from_dict
from fedhpro.methods import (KNOWN_ENGINES, KNOWN_MODES, METHOD_MODULES, METHODS, MethodDeclarationError,
                             describe_methods, method_of)

ROOT = Path(__file__).resolve().parents[1]
TOY = Path(__file__).with_name("toy_method.py")


def test_every_registered_declaration_is_valid_and_the_registry_names_agree():
    orders = [METHODS[m].order for m in METHOD_MODULES]
    assert len(set(orders)) == len(orders), "two methods declare the same order"
    assert KNOWN_MODES == EVAL_MODES and KNOWN_ENGINES == ENGINES
    assert set(labels.METHOD_ORDER) == set(METHOD_MODULES)
    assert [m for m in METHOD_MODULES if METHODS[m].proposed] == ["fedhpro"]
    for m in METHOD_MODULES:  # what `fedhpro methods` prints is the declaration
        assert f"{m} ({METHODS[m].display}): {METHODS[m].paper}" in describe_methods()


def _register(monkeypatch, key: str, method) -> None:
    module = types.ModuleType(f"declared_{key}")
    if method is not None:
        module.METHOD = method
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(METHOD_MODULES, key, module.__name__)


@dataclasses.dataclass(frozen=True)
class Undeclared:
    x: int = 1  # not made with param(): no help, no validation


@pytest.mark.parametrize(("change", "field"), [
    ({"name": "other"}, "name"),
    ({"modes": ("local",)}, "modes"),
    ({"modes": ()}, "modes"),
    ({"engines": ("batched",)}, "engines"),
    ({"style": {"marker": "o"}}, "style"),
    ({"style": {"color": "#000000", "marker": "o", "colour": "red"}}, "style"),
    ({"order": "1"}, "order"),
    ({"display": ""}, "display"),
    ({"Params": Undeclared}, "Params.x"),
    ({"fast_test_params": {"penalty": -1.0}}, "fast_test_params"),
    ({"fast_test_params": {"unknown": 1}}, "fast_test_params"),
    ({"revisions": "one change"}, "revisions"),
    ({"main_variants": ("paper",)}, "main_variants"),
])
def test_a_malformed_declaration_is_refused_naming_the_field(monkeypatch, change, field):
    import toy_method  # tests/ is on sys.path (test_method_contract registers it the same way)

    _register(monkeypatch, "bad", dataclasses.replace(toy_method.METHOD, **{"name": "bad", **change}))
    with pytest.raises(MethodDeclarationError, match=rf"declared_bad: METHOD\.{field}"):
        METHODS["bad"]


def test_a_module_without_a_declaration_is_refused(monkeypatch):
    _register(monkeypatch, "bare", None)
    with pytest.raises(MethodDeclarationError, match="declared_bare: defines no METHOD"):
        method_of("bare")


def test_the_docs_hold_the_method_blocks():
    """The methods table and the declaration's fields are generated blocks of the docs (whether they are current
    is `tests/test_docs.py`'s check of every block)."""
    text = "".join(p.read_text() for p in docs.pages(ROOT))
    for name in ("methods table", "new method", "method declaration"):
        assert f"<!-- generated: {name} -->" in text, f"no docs file holds the generated block {name!r}"


def test_a_toy_method_needs_exactly_the_files_the_docs_state(monkeypatch, tmp_path):
    """The docs say a method is one file plus its registry line: a copy of tests/toy_method.py, alone in a
    directory, registered with one `METHOD_MODULES` entry, is validated, configurable, listed, in the methods
    table and the labels, with nothing else written anywhere."""
    assert docs.NEW_METHOD_FILES == ("fedhpro/methods/<name>.py",)
    assert len(docs.NEW_METHOD_EDITS) == 1 and "METHOD_MODULES" in docs.NEW_METHOD_EDITS[0]
    assert any(docs.new_method(str(p.parent.relative_to(ROOT))) in p.read_text()
               for p in docs.pages(ROOT)), "no docs file states what a new method takes"
    alone = tmp_path / "toy_alone.py"
    shutil.copy(TOY, alone)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = alone.read_text().replace('name="toy"', 'name="toy_alone"')
    alone.write_text(text)
    assert "toy_alone" not in METHOD_MODULES
    monkeypatch.setitem(METHOD_MODULES, "toy_alone", "toy_alone")  # the one registry line
    cfg = from_dict({"method": "toy_alone", "method_params": {"penalty": 0.5}})
    assert cfg.method_params == {"penalty": 0.5}
    assert "toy_alone (Toy): toy: FedAvg" in describe_methods()
    assert "| `toy_alone` (Toy) |" in docs.methods_table()
    assert labels.method_name("toy_alone") == "Toy" and labels.METHOD_ORDER[-1] == "toy_alone"
    assert labels.style_of("toy_alone")["color"] == "#000000"
    assert labels.method_label("toy_alone", "strong") == "Toy (strong)"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["toy_alone.py"]
