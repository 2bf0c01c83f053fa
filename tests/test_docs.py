"""The documentation's examples run: every ```python block of docs/ and the README is
executed (a page's blocks in order, in one namespace, in a scratch folder), and every
``sw-hooks`` command line of a shell block parses with the command's own parser."""

from __future__ import annotations

import linecache
import re
import shlex
from pathlib import Path

import pytest

from sw_hooks.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
# docs/report/ is the output of `sw-hooks report`, not a page.
PAGES = [
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if not {"_build", "report"} & set(p.parts)),
    ROOT / "README.md",
]
_BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: Path, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced block of one of ``languages``."""
    text = page.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(2))
        for m in _BLOCK.finditer(text)
        if m.group(1) in languages
    ]


def _with_python(pages: list[Path]) -> list[Path]:
    return [p for p in pages if blocks(p, ("python",))]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", _with_python(PAGES), ids=_name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks(page, ("python",)):
        source = f"{_name(page)}, the block at line {line}"
        linecache.cache[source] = (len(code), None, code.splitlines(True), source)  # tracebacks
        exec(compile(code, source, "exec"), namespace)


def command_lines(page: Path) -> list[tuple[int, list[str]]]:
    """Every ``sw-hooks ...`` line of the page's shell blocks, continuation lines joined."""
    found = []
    for line, code in blocks(page, ("bash", "sh", "console")):
        for command in code.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if "&&" in words:  # the install one-liners end with the command itself
                words = words[len(words) - words[::-1].index("&&") :]
            if words[:1] == ["sw-hooks"]:
                found.append((line, words[1:]))
    return found


def test_every_documented_command_line_parses():
    parser = build_parser()
    checked = 0
    for page in PAGES:
        for line, argv in command_lines(page):
            try:
                parser.parse_args(argv)
            except SystemExit as error:
                pytest.fail(f"{_name(page)}:{line}: sw-hooks {' '.join(argv)} (exit {error.code})")
            checked += 1
    assert checked >= 10  # the guides do show commands: the extraction found them
