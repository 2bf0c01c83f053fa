"""The progress callback every slow function takes: called with one line of text per step."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
"""Called with a line of text as each slow step starts and ends (``print``, a logger)."""


def silent(line: str) -> None:
    """A :data:`Progress` that says nothing: the default where none is given."""
