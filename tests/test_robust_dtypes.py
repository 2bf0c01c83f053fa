"""fp32, fp16 and bf16: float32 statistics, bit-exact restore, no fp16 overflow."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.core.masks import ablate, scale
from sw_hooks.core.record import channel_maxima, record
from sw_hooks.testing import planted_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.3.mlp.down_proj", 9, 33)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BITS[tensor.dtype])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: _raw(v).clone() for k, v in model.state_dict().items()}


def _assert_bit_exact(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for key, bits in model.state_dict().items():
        assert torch.equal(_raw(bits), snapshot[key]), key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_are_float32_and_match_the_activations(dtype):
    planted = planted_llama(dtype=dtype)
    down = planted.model.get_submodule(SUPER[0])
    seen: list[torch.Tensor] = []
    handle = down.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    handle.remove()
    stats = rec.stats[SUPER[0]].output
    assert stats.abs_max.dtype == torch.float32 and stats.value.dtype == torch.float32
    expected = seen[0].float().abs().amax(dim=(0, 1))
    assert torch.equal(stats.abs_max, expected)  # a max of exactly representable values
    assert stats.top()[0] == SUPER[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_restore_bit_exact(dtype):
    model = planted_llama(dtype=dtype).model
    snapshot = _snapshot(model)
    with ablate(model, [SUPER, DECOY]):
        assert float(model.get_submodule(SUPER[0]).weight.detach()[5, 17]) == 0.0
    _assert_bit_exact(model, snapshot)
    # A factor that overflows fp16 writes inf inside; the original bits still come back.
    with scale(model, [SUPER, DECOY], 1e5):
        inside = float(model.get_submodule(SUPER[0]).weight.detach()[5, 17])
        assert inside == (float("inf") if dtype == torch.float16 else pytest.approx(8e5, rel=1e-2))
    _assert_bit_exact(model, snapshot)


def test_fp16_maxima_do_not_overflow():
    largest = torch.finfo(torch.float16).max
    x = torch.tensor(
        [[[largest, -largest, 1.0], [-0.5, largest / 2, -largest]]], dtype=torch.float16
    )
    maxima = channel_maxima(x)
    assert torch.isfinite(maxima.abs_max).all()
    assert maxima.abs_max.tolist() == [largest, largest, largest]
    assert maxima.value.tolist() == [largest, -largest, -largest]
    assert maxima.token.tolist() == [0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_finds_the_planted_super_weight(dtype):
    from sw_hooks.analysis.detect import spike_candidates

    planted = planted_llama(dtype=dtype)
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    assert [w.coordinate for w in spike_candidates(planted.model, rec.stats)] == [SUPER, DECOY]
