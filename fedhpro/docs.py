"""The generated blocks of the `docs/` pages, written from the declarations in code.

A page marks a generated block with two lines, `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`;
what lies between them is the output of `BLOCKS[NAME]` and nothing else, so the reference (every run config
key, every method's parameters, every dataset) cannot drift from the code that validates it.
`python -m fedhpro.docs --write` rewrites every block; `python -m fedhpro.docs --check` (and
`tests/test_docs.py`) fails naming each page whose committed block differs from its output.
A new block is one entry in `BLOCKS` plus its two marker lines on the page.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _cell(text: object) -> str:
    """Text for one Markdown table cell: a `|` would end the cell, a newline the row, `<x>` be read as HTML
    and `*` as emphasis."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace("*", "\\*")


def _keys_table(cls: type) -> list[str]:
    """One table row per declared key of `cls` (`param()` declarations): the `fedhpro config` listing."""
    import json

    from fedhpro.params import declared_fields, describe_accepted, describe_type, field_default

    rows = ["| key | type | default | accepted | help |", "|---|---|---|---|---|"]
    for name, (f, kind, nullable) in declared_fields(cls).items():
        # as written in a config file (null, true, [], "text"), in a code span: only a `|` is escaped there
        default = json.dumps(field_default(f)).replace("|", "\\|")
        rows.append(f"| `{name}` | {describe_type(kind, nullable)} | `{default}` | "
                    f"{_cell(describe_accepted(f))} | {_cell(f.metadata.get('help', ''))} |")
    return rows


def config_keys() -> str:
    """Every run config key (`RunConfig`), as `fedhpro config` prints them."""
    from fedhpro.config import RunConfig

    return "\n".join(_keys_table(RunConfig))


def method_params() -> str:
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


def datasets() -> str:
    """Every registered dataset, as `fedhpro datasets` prints them."""
    from fedhpro.data import DATASETS

    rows = ["| dataset | classes | default model | domains | what |", "|---|---|---|---|---|"]
    for name, spec in sorted(DATASETS.items()):
        rows.append(f"| `{name}` | {spec.num_classes or 'from the data'} | `{spec.default_model}` | "
                    f"{_cell(', '.join(spec.domains)) if spec.domains else ''} | {_cell(spec.description or name)} |")
    return "\n".join(rows)


# block name -> (page under docs/, the function writing the block's text)
BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "config keys": ("config.md", config_keys),
    "method params": ("config.md", method_params),
    "datasets": ("datasets.md", datasets),
}


class DocsError(ValueError):
    """A page lacks a block's markers (or has them twice, or out of order)."""


def replace_block(text: str, name: str, body: str, page: str = "page") -> str:
    """`text` with the block `name` replaced by `body`; refused unless both markers occur once, in order."""
    start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise DocsError(f"{page}: needs exactly one '{start}' and one '{end}' line")
    head, rest = text.split(start, 1)
    old, tail = rest.split(end, 1)
    if not (head.endswith("\n") or not head) or not old.startswith("\n"):
        raise DocsError(f"{page}: the markers of block '{name}' must be lines of their own")
    return f"{head}{start}\n{body}\n{end}{tail}"


def rendered(docs: Path = DOCS) -> dict[Path, tuple[str, str]]:
    """page path -> (its text now, its text with every generated block rewritten)."""
    pages: dict[Path, tuple[str, str]] = {}
    for name, (page, write) in BLOCKS.items():
        path = docs / page
        if path not in pages:
            text = path.read_text(encoding="utf-8")
            pages[path] = (text, text)
        old, new = pages[path]
        pages[path] = (old, replace_block(new, name, write(), str(path)))
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedhpro.docs", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite every generated block in docs/")
    mode.add_argument("--check", action="store_true", help="exit 1 if a committed block differs from its output")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: this checkout's)")
    args = parser.parse_args(argv)
    docs = args.docs
    try:
        pages = rendered(docs)
    except (DocsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = [path for path, (old, new) in pages.items() if old != new]
    if args.write:
        for path in stale:
            path.write_text(pages[path][1], encoding="utf-8")
            print(f"rewrote {path.relative_to(docs.parent)}")
        return 0
    for path in stale:
        print(f"error: {path.relative_to(docs.parent)} is out of date: python -m fedhpro.docs --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
