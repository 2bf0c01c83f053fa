"""Convert a GGUF model once: a safetensors copy in the user's cache directory.

Loading a GGUF file dequantizes every tensor and rebuilds the tokenizer from the file's
metadata (about 20 s for the embedded SmolLM2-135M on two cores). The result is the same
every time, so the first load writes it as an ordinary transformers checkpoint and later
loads read that (about half a second).

An entry is keyed by the source file's content (a BLAKE2 digest of every byte: a file
rewritten with the same size and time, as ``cp -p``, ``rsync -t`` or ``tar`` leave it, is a
new entry), the dtype, and the versions of what converts it (this package's converter,
transformers and gguf). The digest reads the whole file once per load; on the embedded
94 MiB SmolLM2 file it took 1.4 s against 142 s for the conversion it saves (x0.009, one
interleaved run of ``benchmarks/bench_cache_key.py`` on two heavily shared CPU cores).
Each entry carries a manifest with the size and a BLAKE2 digest of every file it holds
(sampled blocks for files over 64 MiB); an entry whose files do not match (a partial
write, a truncated or replaced file) is rebuilt.

An entry's name is a symbolic link to a folder of its files. A new entry is written into a
fresh folder, then the link is swapped onto it with one atomic ``rename``, so a concurrent
reader always finds either the old entry or the new one, never none, and a crash never
leaves a half entry behind. A reader loads from the folder the link pointed to when it
checked it.

Where the cache lives:

* ``SW_HOOKS_CACHE_DIR``: the folder (default ``$XDG_CACHE_HOME/sw_hooks`` or
  ``~/.cache/sw_hooks``);
* ``SW_HOOKS_NO_CACHE=1``: never read or write the cache (as ``load_model(cache=False)``
  and ``sw-hooks --no-cache`` do).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

CACHE_DIR_ENV = "SW_HOOKS_CACHE_DIR"
NO_CACHE_ENV = "SW_HOOKS_NO_CACHE"
MANIFEST = "sw_hooks_cache.json"
FORMAT_VERSION = 2
"""The converter's own version: raise it when what an entry holds or how it is made changes."""
ENTRIES = ".entries"
_CONVERTER_PACKAGES = ("sw_hooks", "transformers", "gguf")
_CHUNK = 1 << 22
_FULL_DIGEST_LIMIT = 64 << 20
_SAMPLES = 64
_SAMPLE_BYTES = 64 << 10

Converter = Callable[[], tuple[nn.Module, Any]]


def cache_enabled(requested: bool = True) -> bool:
    """False when the caller or ``SW_HOOKS_NO_CACHE`` turned the cache off."""
    flag = os.environ.get(NO_CACHE_ENV, "").strip().lower()
    return requested and flag in ("", "0", "false", "no")


def cache_root() -> Path:
    """The folder holding every entry (``SW_HOOKS_CACHE_DIR`` or the user's cache folder)."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "sw_hooks"


def content_digest(path: Path) -> str:
    """BLAKE2 of every byte of ``path`` (what the file holds, whatever its time stamp says)."""
    digest = hashlib.blake2b(digest_size=20)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def converter_versions() -> dict[str, str]:
    """The versions of what turns a GGUF file into an entry; a new one makes new entries."""
    found = {"format": str(FORMAT_VERSION)}
    for package in _CONVERTER_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def entry_key(source: Path, dtype: torch.dtype) -> str:
    """A short key that changes when the file's bytes, the dtype or the converter change."""
    identity = {"content": content_digest(source), "dtype": str(dtype), **converter_versions()}
    return hashlib.blake2b(
        json.dumps(identity, sort_keys=True).encode(), digest_size=10
    ).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One converted model: ``folder`` (a link to the current copy) is a transformers
    checkpoint with a manifest."""

    folder: Path

    @classmethod
    def for_source(cls, source: Path, dtype: torch.dtype, root: Path | None = None) -> CacheEntry:
        root = cache_root() if root is None else root
        return cls(root / f"{source.stem}-{entry_key(source, dtype)}")

    def is_valid(self) -> bool:
        """True when the manifest exists and every file it lists has its size and digest."""
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return manifest.get("version") == FORMAT_VERSION and all(
            _file_matches(self.folder / name, record) for name, record in files.items()
        )

    def current(self) -> Path:
        """The folder the entry's link points to now (a reader keeps to it while loading)."""
        return self.folder.resolve()


def load_through_cache(
    source: Path, dtype: torch.dtype, convert: Converter, *, root: Path | None = None
) -> tuple[Path | None, tuple[nn.Module, Any] | None]:
    """``(entry folder, converted model and tokenizer)``; either may be ``None``.

    A hit gives ``(folder, None)``: load from the folder. A miss runs ``convert`` once,
    writes its model and tokenizer into a new entry and gives ``(folder, converted)``, so a
    miss costs one conversion and no second load. A cache folder that cannot be written is
    not an error: the miss then gives ``(None, converted)``.
    """
    entry = CacheEntry.for_source(source, dtype, root)
    current = entry.current()
    if CacheEntry(current).is_valid():
        return current, None
    if entry.folder.exists():
        _say(f"the cached copy of {source.name} is damaged; converting again")
    _say(
        f"converting {source.name} once into {entry.folder.parent} (about 20 s for a small "
        "model); later loads read the converted copy"
    )
    converted = convert()
    try:
        written = write_entry(entry, *converted, source=source, dtype=dtype)
    except OSError as error:
        _say(f"could not write the model cache ({error}); continuing without it")
        return None, converted
    return written, converted


def _say(message: str) -> None:
    print(f"sw_hooks: {message}", file=sys.stderr, flush=True)


def write_entry(
    entry: CacheEntry, model: nn.Module, tokenizer: Any, *, source: Path, dtype: torch.dtype
) -> Path:
    """Write model, config and tokenizer into a new folder, then swap the entry's link onto it.

    Returns the folder now current. When another process wrote a valid entry meanwhile,
    that one is kept and the new folder dropped; otherwise the old folder (a damaged entry,
    which no reader accepts) is removed once the link no longer points to it.
    """
    store = entry.folder.parent / ENTRIES
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{entry.folder.name}.", dir=store))
    try:
        _write_files(staging, model, tokenizer, source=source, dtype=dtype)
        current = entry.current()
        if CacheEntry(current).is_valid():
            shutil.rmtree(staging, ignore_errors=True)
            return current
        _swap_link(entry.folder, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if current != staging and current.parent == store:
        shutil.rmtree(current, ignore_errors=True)
    return staging


def _write_files(
    folder: Path, model: nn.Module, tokenizer: Any, *, source: Path, dtype: torch.dtype
) -> None:
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the copy holds plain dequantized tensors
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_model(model, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(str(folder))
    manifest = {
        "version": FORMAT_VERSION,
        "source": str(source),
        "dtype": str(dtype),
        "converter": converter_versions(),
        "files": {p.name: _file_record(p) for p in sorted(folder.iterdir()) if p.is_file()},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _swap_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` in one atomic rename (a relative link: the cache can move)."""
    fresh = link.parent / f".link-{target.name}"
    fresh.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), fresh)
    try:
        if link.is_dir() and not link.is_symlink():  # an entry written before links
            shutil.rmtree(link)
        os.replace(fresh, link)
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "blake2b": _digest(path)}


def _file_matches(path: Path, record: dict[str, Any]) -> bool:
    try:
        return path.stat().st_size == record["size"] and _digest(path) == record["blake2b"]
    except (OSError, KeyError, TypeError):
        return False


def _digest(path: Path) -> str:
    """BLAKE2 of a small file; of its size and 64 evenly spaced 64 KiB blocks for a large one.

    Sampling keeps a check of a multi-GB checkpoint under a second; it catches truncation,
    partial writes and replaced files, though not every flipped bit inside a large file.
    """
    digest = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= _FULL_DIGEST_LIMIT:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(str(size).encode())
        last = size - _SAMPLE_BYTES
        for index in range(_SAMPLES):
            handle.seek(last * index // (_SAMPLES - 1))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()
