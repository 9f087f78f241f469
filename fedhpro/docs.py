"""The generated blocks of README.md and the `docs/` pages, written from the declarations in code.

A page marks a generated block with two lines, `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`;
what lies between them is the output of `BLOCKS[NAME]` and nothing else, so the reference (every run config
key, every method's parameters and declaration, every dataset) cannot drift from the code that validates it.
`fedhpro docs --write` rewrites every block of every page; `fedhpro docs --check` (and `tests/test_docs.py`)
fails naming each page whose committed blocks differ from their output. A new block is one entry in `BLOCKS`
plus its two marker lines on a page. (`fedhpro schema --write` writes the workflow's JSON schema, a YAML
file, not a page.) Blocks:

- ``config keys``, ``method params``, ``datasets``: what `fedhpro config`, `fedhpro config --method NAME` and
  `fedhpro datasets` print, as tables (docs/config.md, docs/datasets.md);
- ``methods table``: every registered method, its paper, what it communicates, modes, engines, heterogeneity;
- ``new method``: what adding a method takes, in one sentence (docs/methods.md);
- ``method declaration``: that sentence and the fields of `Method` with their help (docs/adding-a-method.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose README.md and docs/ the blocks live in

# What a new method takes (the test with tests/toy_method.py checks that it needs nothing more).
NEW_METHOD_FILES = ("fedhpro/methods/<name>.py",)
NEW_METHOD_EDITS = ("its line in `METHOD_MODULES` (`fedhpro/methods/__init__.py`)",)
FIELDS_PAGE = "docs/adding-a-method.md"  # the page with the `method declaration` block


def cell(text: object, code: bool = False) -> str:
    """Text for one Markdown table cell: a `|` would end the cell, a line break the row; outside a code span
    (`code=False`) runs of white space become one space and `<x>` would be read as HTML and `*` as emphasis.
    With `code=True` the text goes in a code span as it is, only `|` escaped."""
    text = str(text) if code else " ".join(str(text).split()).replace("<", "&lt;").replace("*", "\\*")
    text = text.replace("|", "\\|")
    return f"`{text}`" if code else text


def _keys_table(cls: type) -> list[str]:
    """One table row per declared key of `cls` (`param()` declarations): the `fedhpro config` listing."""
    import json

    from fedhpro.params import declared_fields, describe_accepted, describe_type, field_default

    rows = ["| key | type | default | accepted | help |", "|---|---|---|---|---|"]
    for name, (f, kind, nullable) in declared_fields(cls).items():
        # the default as written in a config file (null, true, [], "text")
        rows.append(f"| `{name}` | {describe_type(kind, nullable)} | {cell(json.dumps(field_default(f)), code=True)} | "
                    f"{cell(describe_accepted(f))} | {cell(f.metadata.get('help', ''))} |")
    return rows


def config_keys(doc_dir: str = ".") -> str:
    """Every run config key (`RunConfig`), as `fedhpro config` prints them."""
    from fedhpro.config import RunConfig

    return "\n".join(_keys_table(RunConfig))


def method_params(doc_dir: str = ".") -> str:
    """Every method's `method_params`, as `fedhpro config --method NAME` prints them, in registry order."""
    import dataclasses

    from fedhpro.methods import METHOD_MODULES, METHODS

    parts = []
    for name in METHOD_MODULES:
        params = METHODS[name].Params
        parts.append(f"**`{name}`**\n")
        parts.append("\n".join(_keys_table(params)) if dataclasses.fields(params) else "(no parameters)")
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def datasets(doc_dir: str = ".") -> str:
    """Every registered dataset, as `fedhpro datasets` prints them."""
    from fedhpro.data import DATASETS

    rows = ["| dataset | classes | default model | domains | what |", "|---|---|---|---|---|"]
    for name, spec in sorted(DATASETS.items()):
        rows.append(f"| `{name}` | {spec.num_classes or 'from the data'} | `{spec.default_model}` | "
                    f"{cell(', '.join(spec.domains)) if spec.domains else ''} | {cell(spec.description or name)} |")
    return "\n".join(rows)


def methods_table(doc_dir: str = ".") -> str:
    """The methods table, in registry order, from the declarations (`fedhpro.methods.Method`)."""
    from fedhpro.methods import METHOD_MODULES, METHODS

    lines = ["| method | paper | communicated | modes | engines | heterogeneous models | compile |",
             "|---|---|---|---|---|---|---|"]
    for name in METHOD_MODULES:
        m = METHODS[name]
        lines.append(f"| `{name}` ({cell(m.display)}) | {cell(m.paper)} | {cell(m.communicates)} | "
                     f"{', '.join(m.modes)} | {', '.join(m.engines)} | {'yes' if m.heterogeneous_models else 'no'} | "
                     f"{'yes' if m.calls_model else 'no'} |")
    return "\n".join(lines)


def _sentence(fields: str) -> str:
    files = " and ".join(f"`{f}`" for f in NEW_METHOD_FILES)
    return (f"A new method is one file, {files}, ending in `METHOD = Method(...)`, plus "
            f"{' and '.join(NEW_METHOD_EDITS)}; nothing else. The declaration is checked when the module is first "
            f"loaded (an error names the field); its fields{fields}")


def new_method(doc_dir: str = ".") -> str:
    """What adding a method takes (one paragraph), linking the fields page relative to `doc_dir` (the
    directory of the page it goes into, relative to the checkout)."""
    link = os.path.relpath(FIELDS_PAGE, doc_dir)
    return _sentence(f": [{FIELDS_PAGE}]({link}).")


def declaration_table(doc_dir: str = ".") -> str:
    """What adding a method takes, and the `Method` fields (required first) with their help."""
    import dataclasses

    from fedhpro.methods import Method

    lines = [_sentence(":"), "", "| field | required | what it says |", "|---|---|---|"]
    for f in dataclasses.fields(Method):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        lines.append(f"| `{f.name}` | {'yes' if required else 'no'} | {cell(f.metadata['help'])} |")
    return "\n".join(lines)


# block name -> the function writing its text, given the directory (relative to the checkout) of its page
BLOCKS: dict[str, Callable[[str], str]] = {
    "config keys": config_keys,
    "method params": method_params,
    "datasets": datasets,
    "methods table": methods_table,
    "new method": new_method,
    "method declaration": declaration_table,
}

START, END = "<!-- generated: ", "<!-- end generated: "


class DocsError(ValueError):
    """A block's markers are malformed (not once each, out of order, not lines of their own), a page names a
    block `BLOCKS` does not know, or a block is on no page."""


def replace_block(text: str, name: str, body: str, page: str = "page") -> str:
    """`text` with the block `name` replaced by `body`; refused unless both markers occur once, in order."""
    start, end = f"{START}{name} -->", f"{END}{name} -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise DocsError(f"{page}: needs exactly one '{start}' and one '{end}' line")
    head, rest = text.split(start, 1)
    old, tail = rest.split(end, 1)
    if not (head.endswith("\n") or not head) or not old.startswith("\n"):
        raise DocsError(f"{page}: the markers of block '{name}' must be lines of their own")
    return f"{head}{start}\n{body}\n{end}{tail}"


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and the pages under docs/ that hold a generated block."""
    candidates = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [p for p in candidates if p.is_file() and START in p.read_text(encoding="utf-8")]


def rendered(root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """page path -> (its text now, its text with every generated block rewritten), for every page holding a
    block; refused (`DocsError`, naming the page or block) where a page names an unknown block or a block of
    `BLOCKS` is on no page."""
    out: dict[Path, tuple[str, str]] = {}
    placed: set[str] = set()
    for path in pages(root):
        old = path.read_text(encoding="utf-8")
        names = {line[len(START):-len(" -->")] for line in old.splitlines()
                 if line.startswith(START) and line.endswith(" -->")}
        unknown = sorted(names - BLOCKS.keys())
        if unknown:
            raise DocsError(f"{path}: no generated block named {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(BLOCKS)}")
        new, doc_dir = old, os.path.relpath(path.parent, root)
        for name in names:
            new = replace_block(new, name, BLOCKS[name](doc_dir), str(path))
        placed |= names
        out[path] = (old, new)
    missing = [name for name in BLOCKS if name not in placed]
    if missing:
        raise DocsError(f"no page under {root} holds the generated block {', '.join(map(repr, missing))}")
    return out


def update(root: Path = ROOT, write: bool = True) -> list[Path]:
    """Rewrite (or with `write=False` only compare) every generated block under `root` -> the pages whose
    blocks were (would be) changed."""
    stale = {path: new for path, (old, new) in rendered(root).items() if old != new}
    if write:
        for path, text in stale.items():
            path.write_text(text, encoding="utf-8")
    return list(stale)
