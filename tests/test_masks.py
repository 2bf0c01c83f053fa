import itertools

import pytest
import torch

from sw_hooks.core.masks import ablate, preserve, restore_activation, scale
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing import tiny_model

DOWN = "model.layers.0.mlp.down_proj"


def _weight(model):
    return model.model.layers[0].mlp.down_proj.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ablate_zeroes_and_restores_bit_exact(dtype):
    model = tiny_model("llama", num_layers=1, dtype=dtype)
    before = _weight(model).clone()
    with ablate(model, [(DOWN, 3, 5), (DOWN, 4, 6)]):
        assert float(_weight(model)[3, 5]) == 0.0 and float(_weight(model)[4, 6]) == 0.0
    assert torch.equal(
        _weight(model).view(torch.int16 if dtype != torch.float32 else torch.int32),
        before.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


def test_restore_after_exception_and_nesting_and_overlap():
    model = tiny_model("llama", num_layers=1)
    before = _weight(model).clone()
    original = float(before[3, 5])
    with pytest.raises(RuntimeError):
        with scale(model, [(DOWN, 3, 5)], 2.0):
            assert float(_weight(model)[3, 5]) == pytest.approx(2 * original)
            with ablate(model, [(DOWN, 3, 5), (DOWN, 1, 1)]):
                assert float(_weight(model)[3, 5]) == 0.0
            assert float(_weight(model)[3, 5]) == pytest.approx(2 * original)
            raise RuntimeError("boom")
    assert torch.equal(_weight(model), before)


def test_preserve_undoes_any_change_inside():
    model = tiny_model("llama", num_layers=1)
    before = _weight(model).clone()
    with preserve(model, [(DOWN, 3, 5)]) as kept:
        with torch.no_grad():
            _weight(model).mul_(0.5)
            kept.write_back()
            assert _weight(model)[3, 5] == before[3, 5]
            assert _weight(model)[3, 6] == before[3, 6] * 0.5
            _weight(model)[3, 5] = 123.0
    assert _weight(model)[3, 5] == before[3, 5]


def test_bad_coordinate_touches_nothing():
    model = tiny_model("llama", num_layers=1)
    before = _weight(model).clone()
    with pytest.raises(ValueError, match="outside"):
        ablate(model, [(DOWN, 3, 5), (DOWN, 999, 0)]).apply()
    assert torch.equal(_weight(model), before)
    with pytest.raises(ValueError, match="finite"):
        scale(model, [(DOWN, 3, 5)], float("nan"))
    with pytest.raises(TypeError):
        ablate(model, [(DOWN, "3", 5)])


def test_interrupt_between_writes_restores_everything(monkeypatch):
    model = tiny_model("llama", num_layers=1)
    before = _weight(model).clone()
    from sw_hooks.core import access

    calls = {"n": 0}
    real_write = access.WeightElement.write

    def flaky(self, value):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_write(self, value)

    monkeypatch.setattr(access.WeightElement, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        ablate(model, [(DOWN, 3, 5), (DOWN, 4, 6), (DOWN, 7, 8)]).apply()
    monkeypatch.setattr(access.WeightElement, "write", real_write)
    assert torch.equal(_weight(model), before)


def test_single_super_weight_and_conv1d():
    model = tiny_model("gpt2", num_layers=1)
    name = "transformer.h.0.mlp.c_proj"
    stored = model.transformer.h[0].mlp.c_proj.weight
    sw = SuperWeight(name, 0, row=7, col=100, value=float(stored[100, 7]))
    with ablate(model, sw):
        assert float(stored[100, 7]) == 0.0
    assert float(stored[100, 7]) == sw.value


def test_restore_activation_puts_the_super_activation_back(planted):
    prompt = planted.prompt()
    sw = planted.recorded_super_weight(prompt)
    with torch.no_grad():
        original = planted.model(prompt).logits
        with ablate(planted.model, [sw]):
            ablated = planted.model(prompt).logits
            with restore_activation(planted.model, [sw]):
                restored = planted.model(prompt).logits
    position = sw.token_position
    assert not torch.allclose(ablated[0, position], original[0, position], atol=1e-2)
    assert torch.allclose(restored[0, position], original[0, position], atol=1e-3)


_OVERLAPPING = {
    "ablate": lambda model, weights: ablate(model, weights),
    "scale": lambda model, weights: scale(model, weights, 2.5),
    "preserve": lambda model, weights: preserve(model, weights),
}
# Every pair of these shares (3, 5); (4, 6) and (7, 8) are shared by two of the three.
_MASK_WEIGHTS = [
    [(DOWN, 3, 5), (DOWN, 4, 6)],
    [(DOWN, 7, 8), (DOWN, 3, 5)],
    [(DOWN, 3, 5), (DOWN, 7, 8), (DOWN, 4, 6)],
]


def _bits(tensor):
    return tensor.detach().view(torch.int16 if tensor.element_size() == 2 else torch.int32).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kinds",
    list(itertools.permutations(_OVERLAPPING, 2)) + list(itertools.permutations(_OVERLAPPING, 3)),
    ids="-then-".join,
)
def test_overlapping_masks_released_in_any_order_restore_bit_exact(dtype, kinds):
    model = tiny_model("llama", num_layers=1, dtype=dtype)
    before = _bits(_weight(model))
    for release_order in itertools.permutations(range(len(kinds))):
        masks = [_OVERLAPPING[kind](model, _MASK_WEIGHTS[i]) for i, kind in enumerate(kinds)]
        for mask in masks:
            mask.apply()
        for index in release_order:
            masks[index].restore()
        assert torch.equal(_bits(_weight(model)), before), release_order


def test_releasing_an_earlier_mask_takes_its_effect_out_from_under_later_ones():
    model = tiny_model("llama", num_layers=1)
    original = _weight(model)[3, 5].item()
    zeroed = ablate(model, [(DOWN, 3, 5)]).apply()
    doubled = scale(model, [(DOWN, 3, 5)], 2.0).apply()
    assert _weight(model)[3, 5].item() == 0.0
    zeroed.restore()
    assert _weight(model)[3, 5].item() == 2.0 * original  # as if only the scale were applied
    doubled.restore()
    assert _weight(model)[3, 5].item() == original


def test_a_preserve_above_a_released_mask_keeps_the_true_original():
    model = tiny_model("llama", num_layers=1)
    original = _weight(model)[3, 5].item()
    zeroed = ablate(model, [(DOWN, 3, 5)]).apply()
    kept = preserve(model, [(DOWN, 3, 5)]).apply()
    with torch.no_grad():
        _weight(model)[3, 5] = 7.0
    kept.write_back()
    assert _weight(model)[3, 5].item() == 0.0  # what preserve found: the ablated value
    zeroed.restore()
    assert _weight(model)[3, 5].item() == original  # preserve now keeps the true original
    kept.restore()
    assert _weight(model)[3, 5].item() == original


def test_restorer_acts_only_between_enter_and_exit(planted):
    p = planted.causal[0]
    sw = SuperWeight(p.module, p.layer, p.row, p.col, p.value, output_activation=50.0)
    prompt = planted.prompt()
    with torch.no_grad():
        original = planted.model(prompt).logits
        restorer = restore_activation(planted.model, [sw])
        assert not restorer.active and torch.equal(planted.model(prompt).logits, original)
        with restorer:
            assert restorer.active
            assert not torch.equal(planted.model(prompt).logits, original)
            with pytest.raises(RuntimeError, match="already applied"):
                restorer.apply()
        assert torch.equal(planted.model(prompt).logits, original)
    hooked = [m for m in planted.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
