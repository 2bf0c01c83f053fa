"""Output paths, checked before any slow work so that a run never ends failing to write.

A path is refused when its folder is missing, is a file or is not writable, or when the
path itself is a folder; writing turns an unexpected ``OSError`` into one clear line too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sw_hooks.cli._common import CliError


def check_output_file(path: Path | None, option: str) -> None:
    """Refuse an output file ``path`` (given as ``option``) that could not be written."""
    if path is None:
        return
    if path.is_dir():
        raise CliError(f"{option} {path} is a folder; give the name of a file to write")
    _check_folder(path.parent, path)
    _check_writable_file(path)


def check_output_folder(path: Path, option: str, file_names: Iterable[str]) -> None:
    """Refuse an output folder that could not be created or could not take ``file_names``."""
    if not path.exists():
        _check_folder(_nearest_existing_ancestor(path), path)
        return
    if not path.is_dir():
        raise CliError(f"{option} {path} exists and is not a folder")
    if not _writable(path):
        raise CliError(f"cannot write into {path}: folder {path} is not writable")
    for name in file_names:
        target = path / name
        if target.is_dir():
            raise CliError(f"cannot write {target}: {target} is a folder")
        _check_writable_file(target)


def write_output(path: Path, text: str) -> None:
    """Write ``text`` to ``path``; a failure the checks could not foresee (a full disk) is a CliError."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror or error}") from None


def _check_folder(folder: Path, target: Path) -> None:
    """``target`` can be created inside ``folder``."""
    if not folder.exists():
        raise CliError(f"cannot write {target}: folder {folder} does not exist")
    if not folder.is_dir():
        raise CliError(f"cannot write {target}: {folder} is not a folder")
    if not _writable(folder):
        raise CliError(f"cannot write {target}: folder {folder} is not writable")


def _check_writable_file(path: Path) -> None:
    if path.exists() and not _writable(path):
        raise CliError(f"cannot write {path}: the file is not writable")


def _nearest_existing_ancestor(path: Path) -> Path:
    """The deepest ancestor of ``path`` that exists: where creating the missing folders starts."""
    return next(parent for parent in path.parents if parent.exists())


def _writable(path: Path) -> bool:
    """A file we may overwrite, or a folder we may create files in."""
    mode = os.W_OK | os.X_OK if path.is_dir() else os.W_OK
    return os.access(path, mode)
