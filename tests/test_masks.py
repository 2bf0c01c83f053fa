import pytest
import torch

from sw_hooks.masks import ablate, preserve, restore_activation, scale
from sw_hooks.record import record
from sw_hooks.results import SuperWeight
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
    from sw_hooks import access

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
    p = planted.causal[0]
    prompt = planted.prompt()
    with record(planted.model) as rec, torch.no_grad():
        planted.model(prompt)
    stats = rec.stats[p.module].output
    sw = SuperWeight(
        p.module,
        p.layer,
        p.row,
        p.col,
        p.value,
        output_activation=float(stats.value[p.row]),
        token_position=int(stats.token[p.row]),
    )
    with torch.no_grad():
        original = planted.model(prompt).logits
        with ablate(planted.model, [sw]):
            ablated = planted.model(prompt).logits
            with restore_activation(planted.model, [sw]):
                restored = planted.model(prompt).logits
    position = sw.token_position
    assert not torch.allclose(ablated[0, position], original[0, position], atol=1e-2)
    assert torch.allclose(restored[0, position], original[0, position], atol=1e-3)
