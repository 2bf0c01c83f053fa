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
    assert not [p for p in root.iterdir() if p.name.startswith(".partial-")]


def test_a_changed_source_or_dtype_is_a_new_entry(source, tmp_path):
    convert, root = CountingConverter(), tmp_path / "cache"
    _load(source, root, convert)
    assert CacheEntry.for_source(source, torch.bfloat16, root) != CacheEntry.for_source(
        source, torch.float32, root
    )
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
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
