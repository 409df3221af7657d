"""The README and docs/ stay navigable: every relative link resolves to a file (and its #anchor to a heading)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "rules" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _links(page: Path):
    for target in LINK.findall(page.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_readme_is_short_and_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    linked = {(ROOT / t.partition('#')[0]).resolve() for t in _links(ROOT / "README.md")}
    assert set((ROOT / "docs").glob("*.md")) <= {p for p in linked}


@pytest.mark.parametrize("command", ["compile", "barrier", "explain", "permute"])
def test_the_command_summary_names_every_flag(command):
    """docs/commands.md's summary lists every flag each command takes (bar the ones every command has)."""
    from fxfuse.commands.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.choices).choices[command]
    flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
    flags -= {"--help", "--rules", "--strict", "--quiet", "--trust-pickle", "--output"}  # common; -o OUT
    text = (ROOT / "docs" / "commands.md").read_text()
    summary = text[text.index("```\nfxfuse compile"):text.index("```\n\nEvery command")]
    lines = summary.split(f"fxfuse {command} ", 1)[1].split("\nfxfuse ")[0]
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", lines))
    assert not missing, f"fxfuse {command}: flags missing from docs/commands.md: {missing}"
