"""The memory plan counts exactly the parameters the model classes hold, block by block."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.analysis.memory_plan import ModelShape, activation_bytes, memory_plan

CONFIGS = [
    ("llama", {}),
    ("mistral", {"num_key_value_heads": 2}),
    ("olmo", {"num_key_value_heads": 2}),
    ("phi3", {"num_key_value_heads": 2}),
    ("llama", {"tie_word_embeddings": True, "head_dim": 32}),
    ("olmo", {"tie_word_embeddings": True}),
]


def _tiny(arch: str, extra: dict) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config = AutoConfig.for_model(arch, **(sizes | extra))
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("arch, extra", CONFIGS, ids=[f"{a}-{sorted(e)}" for a, e in CONFIGS])
def test_parameters_and_block_bytes_are_exactly_the_models(arch, extra):
    model = _tiny(arch, extra)
    plan = memory_plan(model.config.to_dict(), dtype_bytes=2)
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    assert plan.weight_bytes == _bytes(model)
    assert plan.largest_block_bytes == max(_bytes(b) for b in model.model.layers)
    ends = _bytes(model) - sum(_bytes(b) for b in model.model.layers)
    assert plan.embedding_and_head_bytes == ends


def test_streamed_peak_is_a_block_plus_the_ends_plus_every_stream():
    config = _tiny("mistral", {"num_key_value_heads": 2}).config.to_dict()
    one, many = memory_plan(config, streams=1), memory_plan(config, streams=7)
    assert many.streamed_bytes - one.streamed_bytes == 6 * 512 * 64 * 2
    assert one.in_memory_bytes == one.weight_bytes + one.in_memory_activation_bytes
    assert one.streamed_bytes < one.in_memory_bytes  # three blocks, one of them held
    assert one.streamed_bytes_read(passes=2) == one.embedding_and_head_bytes + 2 * (
        one.weight_bytes - one.embedding_and_head_bytes
    )


def test_activations_grow_with_tokens_and_dtype():
    shape = ModelShape.from_config(_tiny("llama", {}).config.to_dict())
    assert activation_bytes(shape, 256, 4, 1) > activation_bytes(shape, 256, 2, 1)
    assert activation_bytes(shape, 512, 2, 1) > activation_bytes(shape, 256, 2, 1)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"hidden_size": 64}, "config needs num_attention_heads"),
        ({"num_attention_heads": 4, "hidden_size": "64"}, "config needs hidden_size"),
    ],
)
def test_a_config_missing_a_size_is_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message):
        memory_plan(config)
