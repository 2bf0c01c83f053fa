"""The embedded GGUF model through the cache: converted once, then read back the same."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.model_cache import CACHE_DIR_ENV, NO_CACHE_ENV
from sw_hooks.models import load_model

pytestmark = pytest.mark.slow


def test_the_cached_copy_is_the_converted_model(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(NO_CACHE_ENV, raising=False)
    converted, converted_tokenizer = load_model()
    assert "converting" in capsys.readouterr().err
    model, tokenizer = load_model()
    assert "converting" not in capsys.readouterr().err
    assert not hasattr(model.config, "quantization_config")
    expected = smollm2[0].state_dict()
    for state in (converted.state_dict(), model.state_dict()):
        assert list(state) == list(expected)
        assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    text = "The quick brown fox jumps over the lazy dog. 12345 résumé\n"
    ids = smollm2[1](text)["input_ids"]
    assert tokenizer(text)["input_ids"] == ids == converted_tokenizer(text)["input_ids"]
    assert tokenizer.bos_token_id == smollm2[1].bos_token_id
    sample = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(sample).logits, smollm2[0](sample).logits)
