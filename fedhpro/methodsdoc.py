"""The docs' method tables, generated from the declarations (`fedhpro.methods.Method`), never copied by hand.

A Markdown file (README.md, docs/*.md) holds a generated block between the lines ``<!-- generated: NAME -->``
and ``<!-- end generated: NAME -->``; `update_docs` rewrites every such block of every file that has one, and
`fedhpro methods --write-docs` runs it (`--check-docs` only says which files differ). A test checks the
committed blocks equal the output, so the tables cannot drift from the code. Blocks:

- ``methods table``: every registered method, its paper, what it communicates, modes, engines, heterogeneity;
- ``new method``: what adding a method takes, in one sentence (README.md);
- ``method declaration``: that sentence and the fields of `Method` with their help (docs/adding-a-method.md).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from fedhpro.methods import METHOD_MODULES, METHODS, Method

# What a new method takes (the test with tests/toy_method.py checks that it needs nothing more).
NEW_METHOD_FILES = ("fedhpro/methods/<name>.py",)
NEW_METHOD_EDITS = ("its line in `METHOD_MODULES` (`fedhpro/methods/__init__.py`)",)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def methods_table(doc_dir: str = ".") -> str:
    """The methods table (Markdown), in registry order."""
    lines = ["| method | paper | communicated | modes | engines | heterogeneous models |",
             "|---|---|---|---|---|---|"]
    for name in METHOD_MODULES:
        m = METHODS[name]
        lines.append(f"| `{name}` ({_cell(m.display)}) | {_cell(m.paper)} | {_cell(m.communicates)} | "
                     f"{', '.join(m.modes)} | {', '.join(m.engines)} | {'yes' if m.heterogeneous_models else 'no'} |")
    return "\n".join(lines)


FIELDS_PAGE = "docs/adding-a-method.md"  # the page with the `method declaration` block


def _sentence(fields: str) -> str:
    files = " and ".join(f"`{f}`" for f in NEW_METHOD_FILES)
    return (f"A new method is one file, {files}, ending in `METHOD = Method(...)`, plus "
            f"{' and '.join(NEW_METHOD_EDITS)}; nothing else. The declaration is checked when the module is first "
            f"loaded (an error names the field); its fields{fields}")


def new_method(doc_dir: str = ".") -> str:
    """What adding a method takes (Markdown, one paragraph), linking the fields page relative to `doc_dir` (the
    directory of the file it goes into, relative to the checkout)."""
    link = os.path.relpath(FIELDS_PAGE, doc_dir)
    return _sentence(f": [{FIELDS_PAGE}]({link}).")


def declaration_table(doc_dir: str = ".") -> str:
    """What adding a method takes, and the `Method` fields (required first) with their help (Markdown)."""
    lines = [_sentence(":"), "", "| field | required | what it says |", "|---|---|---|"]
    for f in dataclasses.fields(Method):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        lines.append(f"| `{f.name}` | {'yes' if required else 'no'} | {_cell(f.metadata['help'])} |")
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[str], str]] = {"methods table": methods_table, "new method": new_method,
                                        "method declaration": declaration_table}


def render(text: str, doc_dir: str = ".", page: str = "page") -> str:
    """`text` (a file in `doc_dir`, relative to the checkout) with every generated block it holds replaced by
    its current output, through the docs' one block rewriter (`fedhpro.docs.replace_block`, which refuses
    markers that are not one pair of lines of their own)."""
    from fedhpro.docs import replace_block

    for name, make in BLOCKS.items():
        if f"<!-- generated: {name} -->" in text:
            text = replace_block(text, name, make(doc_dir), page)
    return text


def doc_files(root: Path) -> list[Path]:
    """README.md and docs/*.md under `root` that hold a generated block."""
    candidates = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [p for p in candidates if p.is_file() and "<!-- generated: " in p.read_text()]


def update_docs(root: Path, write: bool = True) -> list[Path]:
    """Rewrite the generated blocks of the docs under `root`; the files whose blocks were (or, with
    `write=False`, would be) changed."""
    changed = []
    for path in doc_files(root):
        old = path.read_text()
        new = render(old, os.path.relpath(path.parent, root), str(path))
        if new != old:
            changed.append(path)
            if write:
                path.write_text(new)
    return changed
