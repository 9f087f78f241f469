"""The documentation: generated blocks equal their generator's output, every relative link in the README and
the docs/ pages resolves (file and heading) inside the repository, the index lists every page, and the
README stays a one-screen page."""

import re
import sys
from pathlib import Path

import pytest

from fedhpro import cli, docs

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_LIMIT = 12_000  # bytes (issue 22: the anchors' READMEs are 1-18 KB; ours was 41 KB)

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (links there are not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation dropped, spaces '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    prose = CODE_SPAN.sub("", _prose(text))
    return [m.group(1) for m in LINK.finditer(prose)]


def broken_links(page: Path) -> list[str]:
    """'target: why' for each relative link of `page` that does not resolve to a file (and heading) in the repo."""
    bad = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:: not a path
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("/"):
            bad.append(f"{target}: an absolute path (links must be relative to the page)")
            continue
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(REPO):
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(REPO)}")
    return bad


def test_slug_follows_github():
    assert slug("Bit for bit, and what it holds across") == "bit-for-bit-and-what-it-holds-across"
    assert slug("`fedhpro bench`") == "fedhpro-bench"
    assert slug("Per-client state on disk (`client_store: disk`)") == "per-client-state-on-disk-client_store-disk"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_link_check_finds_what_is_broken(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)  # the check's repository: tmp_path
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some part\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok](docs/a.md#some-part) [ok](#top) [ok](https://x.org/y)\n"
                    "`[not a link](nowhere.md)`\n```\n[not a link](nowhere.md)\n```\n"
                    "[1](docs/b.md) [2](docs/a.md#no-part) [3](/etc/passwd) [4](../outside.md) [5](#missing)\n# Top\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["docs/b.md", "docs/a.md#no-part", "/etc/passwd",
                                                             "../outside.md", "#missing"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(page):
    assert broken_links(page) == []


def test_the_docs_index_lists_every_page():
    index = REPO / "docs" / "README.md"
    listed = {(index.parent / t.partition("#")[0]).resolve() for t in links(index.read_text(encoding="utf-8"))}
    pages = {p.resolve() for p in (REPO / "docs").glob("*.md")} - {index.resolve()}
    assert sorted(p.name for p in pages - listed) == []


def test_the_readme_fits_on_a_screen_and_keeps_its_two_commands_first():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) < README_LIMIT
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [["bash", "scripts/run-pipeline.sh"],
                                                           ["bash", "scripts/run-tests.sh"]]


def test_generated_blocks_equal_their_generators_output():
    """Stale: run `fedhpro docs --write` (a declaration changed since the page was written)."""
    rendered = docs.rendered(REPO)
    assert {p.relative_to(REPO).as_posix() for p in rendered} >= {"docs/config.md", "docs/datasets.md",
                                                                  "docs/methods.md", "docs/adding-a-method.md"}
    stale = [str(path.relative_to(REPO)) for path, (old, new) in rendered.items() if old != new]
    assert stale == []


def test_fedhpro_docs_rewrites_a_stale_block_and_refuses_malformed_pages(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "p.md"
    page.write_text("# P\n\n<!-- generated: x -->\nold\n<!-- end generated: x -->\n\nafter\n")
    monkeypatch.setattr(docs, "BLOCKS", {"x": lambda doc_dir: f"| a {doc_dir} |\n|---|"})
    root = ["--root", str(tmp_path)]
    assert cli.main(["docs", "--check", *root]) == 1
    assert "docs/p.md is out of date: run fedhpro docs --write" in capsys.readouterr().err
    assert cli.main(["docs", "--write", *root]) == 0
    assert page.read_text() == "# P\n\n<!-- generated: x -->\n| a docs |\n|---|\n<!-- end generated: x -->\n\nafter\n"
    assert cli.main(["docs", "--check", *root]) == 0
    (tmp_path / "README.md").write_text("<!-- generated: x -->\n<!-- end generated: x -->\n")
    assert cli.main(["docs", "--write", *root]) == 0  # a block may be on several pages; each gets its own dir
    assert "| a . |" in (tmp_path / "README.md").read_text()
    for text, why in [("# P\n\nno markers\n", "no page under"),
                      ("<!-- generated: x -->\n<!-- end generated: x -->\n<!-- generated: x -->\n",
                       "needs exactly one"),
                      ("<!-- generated: x -->\n<!-- end generated: x -->\n<!-- generated: y -->\n"
                       "<!-- end generated: y -->\n", "no generated block named 'y'")]:
        (tmp_path / "README.md").unlink(missing_ok=True)
        page.write_text(text)
        capsys.readouterr()
        assert cli.main(["docs", "--check", *root]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1


def test_one_cell_escaper():
    assert docs.cell("a | b\n  <c> *d*") == "a \\| b &lt;c> \\*d\\*"
    assert docs.cell('"x|y  z"', code=True) == '`"x\\|y  z"`'


def test_the_key_reference_lists_every_declared_key():
    from fedhpro.config import RunConfig
    from fedhpro.params import declared_fields

    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert all(f"| `{key}` |" in text for key in declared_fields(RunConfig))
    methods = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    assert "<!-- generated: methods table -->" in methods and "<!-- end generated: methods table -->" in methods
