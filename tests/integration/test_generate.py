"""``model.generate`` with and without a KV cache under ``ablate`` + ``restore_activation``.

With a cache every decode call holds one new token, so a restorer that counted positions
within each call would write the super activation into every generated token.
"""

import pytest
import torch

from sw_hooks.core.masks import ablate, restore_activation
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing import PlantedModel

NEW_TOKENS = 6


def _prompt(*fillers: int) -> torch.Tensor:
    """The causal trigger (token 1) at position 0, then filler tokens."""
    return torch.tensor([[1, *fillers]])


def _generate(planted: PlantedModel, ids: torch.Tensor, use_cache: bool):
    """Greedy decoding; returns (generated token ids, scores ``[steps, batch, vocab]``)."""
    with torch.no_grad():
        out = planted.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores)


def _generate_restored(planted: PlantedModel, ids: torch.Tensor, sw: SuperWeight, use_cache: bool):
    with ablate(planted.model, [sw]), restore_activation(planted.model, [sw]):
        return _generate(planted, ids, use_cache)


def test_cached_generation_restores_only_at_the_recorded_token(planted):
    ids = _prompt(20, 21, 22)
    sw = planted.recorded_super_weight(ids)
    assert sw.token_position == 0 and sw.output_activation > 10.0
    cached_tokens, cached_scores = _generate_restored(planted, ids, sw, use_cache=True)
    full_tokens, full_scores = _generate_restored(planted, ids, sw, use_cache=False)
    assert cached_scores.shape == (NEW_TOKENS, 1, planted.model.config.vocab_size)
    assert torch.equal(cached_tokens, full_tokens)
    torch.testing.assert_close(cached_scores, full_scores, rtol=0, atol=1e-4)


def test_the_activation_restored_in_the_prompt_reaches_cached_decoding(planted):
    ids = _prompt(20, 21, 22)
    sw = planted.recorded_super_weight(ids)
    with ablate(planted.model, [sw]):
        _, pruned_scores = _generate(planted, ids, use_cache=True)
    _, restored_scores = _generate_restored(planted, ids, sw, use_cache=True)
    # Column 0 is the end-of-sequence token, held at -inf until min_new_tokens.
    assert (restored_scores - pruned_scores)[..., 1:].abs().max() > 1e-2


def test_batched_generation_with_and_without_cache(planted):
    ids = torch.cat([_prompt(20, 21, 22), _prompt(40, 41, 42)])
    sw = planted.recorded_super_weight(ids[:1])
    cached_tokens, cached_scores = _generate_restored(planted, ids, sw, use_cache=True)
    full_tokens, full_scores = _generate_restored(planted, ids, sw, use_cache=False)
    assert cached_scores.shape[1] == 2
    assert torch.equal(cached_tokens, full_tokens)
    torch.testing.assert_close(cached_scores, full_scores, rtol=0, atol=1e-4)
    for row in range(2):
        single_tokens, single_scores = _generate_restored(planted, ids[row : row + 1], sw, True)
        assert torch.equal(cached_tokens[row : row + 1], single_tokens)
        torch.testing.assert_close(cached_scores[:, row], single_scores[:, 0], rtol=0, atol=1e-4)


def test_unknown_token_position_is_refused_before_any_hook(planted):
    ids = _prompt(20, 21, 22)
    sw = planted.recorded_super_weight(ids, locations=False)
    assert sw.token_position == -1
    down = planted.model.get_submodule(sw.module)
    with pytest.raises(ValueError, match=rf"{sw.module}.*\[5, 17\].*token position -1"):
        restore_activation(planted.model, [sw])
    assert not down._forward_hooks and not down._forward_pre_hooks
