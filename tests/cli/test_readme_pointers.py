"""Every pointer into README.md from the packages' help texts and docstrings names a heading that exists.

A pointer is written `README "Heading"` (the heading's text as written after the #s). Any other mention of the
README in the packages' sources is a mistake this test reports, so a bare "see README" cannot come back."""

from __future__ import annotations

import argparse
import re

from tests.support.locations import REPO

PACKAGES = ("converter", "extractor", "schemas")
# The quotes may be escaped when the pointer sits inside a double-quoted Python string.
POINTER = re.compile(r'README \\?"([^"\\]+)\\?"')
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def readme_headings(markdown: str) -> set[str]:
    """The text of every Markdown heading, outside fenced code blocks."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {m.group(1).strip() for m in HEADING.finditer(prose)}


def readme_mentions(source: str) -> list[tuple[int, str, str | None]]:
    """(line number, line, pointed heading or None when the mention is not a `README "Heading"` pointer)."""
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        for match in re.finditer(r"README", line):
            pointer = POINTER.match(line, match.start())
            found.append((number, line.strip(), pointer.group(1) if pointer else None))
    return found


def test_every_readme_pointer_in_the_packages_names_a_heading():
    headings = readme_headings((REPO / "README.md").read_text(encoding="utf-8"))
    pointers, broken = 0, []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for number, line, heading in readme_mentions(path.read_text(encoding="utf-8")):
                where = f"{path.relative_to(REPO)}:{number}"
                if heading is None:
                    broken.append(f'{where}: mentions the README without naming a section as README "Heading": {line}')
                elif heading not in headings:
                    broken.append(f"{where}: README has no heading {heading!r}")
                else:
                    pointers += 1
    assert not broken, "\n".join(broken)
    assert pointers >= 5  # the help texts of --fast-draft, --compute-dtype, --batch-size, --scheduler and more


def test_the_help_text_pointers_resolve_as_printed():
    """The same check on the parsers' help strings as argparse holds them (what `--help` prints)."""
    from schemas.cli.dispatch import build_parser

    parser, _ = build_parser()
    headings = readme_headings((REPO / "README.md").read_text(encoding="utf-8"))
    seen = []

    def walk(p) -> None:
        for action in p._actions:
            for heading in re.findall(r'README "([^"]+)"', action.help or ""):
                seen.append(heading)
                assert heading in headings, f"{p.prog} {'/'.join(action.option_strings)}: README has no heading {heading!r}"
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(parser)
    assert "JPEG trees" in seen  # `imzarr convert jpeg --fast-draft`


def test_pointer_scanner():
    source = 'a = "see README"\nb = "x; README \\"Safety\\""\n# README "Models"\n'
    assert readme_mentions(source) == [
        (1, 'a = "see README"', None),
        (2, 'b = "x; README \\"Safety\\""', "Safety"),
        (3, '# README "Models"', "Models"),
    ]
    assert readme_headings("# A\ntext\n## B (`x`)\n```sh\n# not a heading\n```\n") == {"A", "B (`x`)"}
