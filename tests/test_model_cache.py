"""The converted-model cache: hits, misses, stale and damaged entries, and switching it off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from sw_hooks import model_cache
from sw_hooks.model_cache import (
    CACHE_DIR_ENV,
    MANIFEST,
    NO_CACHE_ENV,
    CacheEntry,
    cache_enabled,
    cache_root,
    load_through_cache,
)
from sw_hooks.testing import tiny_model


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    words = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words)


class CountingConverter:
    """Stands in for the slow GGUF conversion and counts how often it ran."""

    def __init__(self) -> None:
        self.calls = 0
        self.model = tiny_model("llama", num_layers=2)

    def __call__(self):
        self.calls += 1
        return self.model, _tokenizer()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


def _load(source: Path, root: Path, convert: CountingConverter):
    return load_through_cache(source, torch.float32, convert, root=root)


def test_first_load_converts_and_writes_then_later_loads_read_the_copy(source, tmp_path):
    convert, root = CountingConverter(), tmp_path / "cache"
    written, converted = _load(source, root, convert)
    assert converted[0] is convert.model and convert.calls == 1
    folder, converted = _load(source, root, convert)
    assert folder == written
    assert converted is None and convert.calls == 1
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected, actual = convert.model.state_dict(), reloaded.state_dict()
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert AutoTokenizer.from_pretrained(folder)("hello world")["input_ids"] == [1, 2]
    assert [p.name for p in root.iterdir() if p.name != ".entries"] == [written.name.split(".")[0]]
    assert list((root / ".entries").iterdir()) == [written]  # nothing half-written left


def test_a_changed_source_or_dtype_is_a_new_entry(source, tmp_path):
    convert, root = CountingConverter(), tmp_path / "cache"
    _load(source, root, convert)
    assert CacheEntry.for_source(source, torch.bfloat16, root) != CacheEntry.for_source(
        source, torch.float32, root
    )
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _, converted = _load(source, root, convert)
    assert converted is None and convert.calls == 1  # touched, same bytes: the same entry
    source.write_bytes(source.read_bytes()[:-1] + b"x")
    _, converted = _load(source, root, convert)
    assert converted is not None and convert.calls == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_a_damaged_entry_is_detected_and_rebuilt(source, tmp_path, damage, capsys):
    convert, root = CountingConverter(), tmp_path / "cache"
    _load(source, root, convert)
    entry = CacheEntry.for_source(source, torch.float32, root)
    weights = entry.folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "manifest":
        (entry.folder / MANIFEST).write_text("{not json")
    else:
        (entry.folder / "config.json").unlink()
    assert not entry.is_valid()
    _, converted = _load(source, root, convert)
    assert converted is not None and convert.calls == 2
    assert "damaged" in capsys.readouterr().err
    assert entry.is_valid()


def test_an_unwritable_cache_still_returns_the_converted_model(source, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    convert = CountingConverter()
    folder, converted = _load(source, blocker / "cache", convert)
    assert folder is None and converted[0] is convert.model


def test_environment_moves_and_disables_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv(NO_CACHE_ENV, raising=False)
    assert cache_enabled() and not cache_enabled(False)
    monkeypatch.setenv(NO_CACHE_ENV, "1")
    assert not cache_enabled()


# -- keyed on content and converter ---------------------------------------------------------


def test_a_file_rewritten_with_the_same_size_and_time_is_a_new_entry(tmp_path):
    """As ``cp -p`` or ``rsync -t`` leave it: only bytes past the first MiB differ."""
    source = tmp_path / "big.gguf"
    data = bytearray(b"GGUF" + bytes(range(256)) * (3 << 12))  # 3 MiB
    source.write_bytes(bytes(data))
    convert, root = CountingConverter(), tmp_path / "cache"
    first, _ = _load(source, root, convert)
    stat = source.stat()
    data[(1 << 20) + 12345] ^= 0xFF
    source.write_bytes(bytes(data))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (source.stat().st_size, source.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second, converted = _load(source, root, convert)
    assert converted is not None and convert.calls == 2 and second != first


@pytest.mark.parametrize("package", ["sw_hooks", "transformers", "gguf"])
def test_another_converter_version_is_a_new_entry(source, tmp_path, monkeypatch, package):
    convert, root = CountingConverter(), tmp_path / "cache"
    _load(source, root, convert)
    real = model_cache.version
    monkeypatch.setattr(
        model_cache, "version", lambda name: "99.0" if name == package else real(name)
    )
    model_cache.converter_versions.cache_clear()
    try:
        _, converted = _load(source, root, convert)
    finally:
        model_cache.converter_versions.cache_clear()
    assert converted is not None and convert.calls == 2


def test_replacing_a_damaged_entry_never_leaves_a_moment_without_one(source, tmp_path, monkeypatch):
    """Every removal the cache makes while rebuilding is followed by a readable entry."""
    convert, root = CountingConverter(), tmp_path / "cache"
    _load(source, root, convert)
    entry = CacheEntry.for_source(source, torch.float32, root)
    (entry.folder / "config.json").write_text("{}")  # damaged: its digest no longer matches
    present_after_removal = []
    real_rmtree = model_cache.shutil.rmtree

    def watched_rmtree(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        present_after_removal.append((entry.folder / MANIFEST).is_file())

    monkeypatch.setattr(model_cache.shutil, "rmtree", watched_rmtree)
    folder, converted = _load(source, root, convert)
    assert converted is not None and entry.is_valid() and folder == entry.current()
    assert present_after_removal and all(present_after_removal)
    assert list((root / ".entries").iterdir()) == [folder]  # the damaged copy is gone


def test_a_valid_entry_written_meanwhile_is_kept(source, tmp_path):
    """Two processes converting at once: the second keeps the first one's entry."""
    convert, root = CountingConverter(), tmp_path / "cache"
    first, _ = _load(source, root, convert)
    entry = CacheEntry.for_source(source, torch.float32, root)
    kept = model_cache.write_entry(
        entry, convert.model, _tokenizer(), source=source, dtype=torch.float32
    )
    assert kept == first == entry.current()
    assert list((root / ".entries").iterdir()) == [first]


def test_load_model_reads_a_gguf_file_rewritten_past_its_first_mib(tmp_path, monkeypatch):
    """The user's path: ``load_model`` on a GGUF file changed in place with its size and time
    kept must give the new weights, not the cached conversion of the old ones."""
    import gguf
    import numpy as np

    from sw_hooks.models import load_model
    from sw_hooks.testing.gguf_file import save_gguf

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(NO_CACHE_ENV, raising=False)
    source = tmp_path / "tiny.gguf"
    save_gguf(tiny_model("llama", num_layers=8), source)
    tensor = next(t for t in gguf.GGUFReader(source).tensors if t.name == "blk.7.ffn_down.weight")
    offset = int(tensor.data_offset)
    assert offset > 1 << 20 and source.stat().st_size > offset
    weight = "model.layers.7.mlp.down_proj"
    before = float(load_model(str(source))[0].get_submodule(weight).weight.detach()[0, 0])
    stat = source.stat()
    with source.open("r+b") as handle:
        handle.seek(offset)
        handle.write(np.float32(42.0).tobytes())  # element [0, 0] of the down-projection
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = float(load_model(str(source))[0].get_submodule(weight).weight.detach()[0, 0])
    assert (before != 42.0, after) == (True, 42.0)
