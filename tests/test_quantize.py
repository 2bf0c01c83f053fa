"""Block RTN, clipping, holdout, model quantization and activation quantization."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sw_hooks.core.access import oriented_weight
from sw_hooks.quant import primitives as q
from sw_hooks.quant.activations import quantize_activation_tokens, quantize_activations
from sw_hooks.quant.config import (
    IQRClip,
    QuantConfig,
    TopFractionClip,
    ZScoreClip,
    parse_clip,
    quant_grid,
)
from sw_hooks.quant.primitives import choose_qparams, quantize_tensor
from sw_hooks.quant.quantize import QuantizedModel, quantize_model
from sw_hooks.quant.targets import select_modules
from sw_hooks.testing import tiny_model


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- hand-computed cases


def test_asymmetric_scale_and_zero_point() -> None:
    # range [-1, 2], 2 bits: scale 3 / 3 = 1, zero point round(1 / 1) = 1
    params = choose_qparams(t([[-1.0, 0.4, 0.6, 2.0]]), 2)
    assert params.scale.tolist() == [[1.0]]
    assert params.zero_point.tolist() == [[1.0]]
    assert (params.qmin, params.qmax) == (0, 3)
    assert quantize_tensor(t([-1.0, 0.4, 0.6, 2.0]), QuantConfig(2, 4)).tolist() == [
        -1.0,
        0.0,
        1.0,
        2.0,
    ]


def test_asymmetric_range_includes_zero() -> None:
    # all positive: the range widens to [0, 3], so 3 and 0 are exact at 2 bits
    params = choose_qparams(t([[1.0, 3.0]]), 2)
    assert params.scale.tolist() == [[1.0]] and params.zero_point.tolist() == [[0.0]]
    assert quantize_tensor(t([1.0, 3.0, 2.4]), QuantConfig(2, 3)).tolist() == [1.0, 3.0, 2.0]


def test_eight_bits_asymmetric() -> None:
    # range [0, 2.55]: scale 0.01, codes 0..255
    out = quantize_tensor(t([0.0, 2.55, 1.234, 1.236]), QuantConfig(8, 4))
    assert out.tolist() == pytest.approx([0.0, 2.55, 1.23, 1.24], abs=1e-12)


def test_symmetric_four_bits_rounds_half_to_even() -> None:
    # max |w| = 7 -> scale 7 / 7 = 1; -3.5 rounds to -4 (half to even), codes within +-7
    out = quantize_tensor(t([-3.5, 1.0, 7.0, 2.5]), QuantConfig(4, 4, symmetric=True))
    assert out.tolist() == [-4.0, 1.0, 7.0, 2.0]
    params = choose_qparams(t([[-3.5, 1.0, 7.0]]), 4, symmetric=True)
    assert params.zero_point.tolist() == [[0.0]] and (params.qmin, params.qmax) == (-7, 7)


def test_symmetric_two_bits_has_three_levels() -> None:
    # 2 bits symmetric: codes -1, 0, 1; scale = 2 / 1
    out = quantize_tensor(t([-0.4, 0.6, -2.0, 1.1]), QuantConfig(2, 4, symmetric=True))
    assert out.tolist() == [0.0, 0.0, -2.0, 2.0]


def test_zero_block_stays_zero() -> None:
    out = quantize_tensor(torch.zeros(8), QuantConfig(3, 4))
    assert torch.equal(out, torch.zeros(8))


def test_padding_is_not_per_tensor() -> None:
    # block 4 over 5 values: [0, .1, .2, .3] and [30, pad, pad, pad]; per-tensor would zero the first
    w = t([0.0, 0.1, 0.2, 0.3, 30.0])
    assert quantize_tensor(w, QuantConfig(2, 4)).tolist() == pytest.approx(
        [0.0, 0.1, 0.2, 0.3, 30.0]
    )
    assert quantize_tensor(w, QuantConfig(2, 5)).tolist() == [0.0, 0.0, 0.0, 0.0, 30.0]


def test_padding_stays_out_of_clip_statistics() -> None:
    # the tail block [10, pad x3]: zero padding would make 10 a z-score outlier and clip it
    w = t([1.0, 2.0, 3.0, 4.0, 10.0])
    out = quantize_tensor(w, QuantConfig(8, 4, clip=ZScoreClip(1.0)))
    assert out[4].item() == pytest.approx(10.0)


def test_one_d_blocks_are_chunks_of_the_flattened_tensor() -> None:
    w = t([[0.1, 0.2, 0.3, 9.0], [0.1, 0.2, 0.3, 0.0]])
    # block 4 = one row each: the second row keeps its precision
    assert quantize_tensor(w, QuantConfig(2, 4))[1].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.0])
    # block 8 = the whole tensor: 9.0 sets the scale for everything
    assert quantize_tensor(w, QuantConfig(2, 8))[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_two_d_tiles() -> None:
    w = t(
        [
            [0.3, 0.0, 0.6, 9.0],
            [0.1, 0.2, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    tiles = quantize_tensor(w, QuantConfig(2, 2, block_shape="2d"))
    # tile (0, 0) has range [0, 0.3]: exact; tile (0, 1) has range [0, 9]: 0.6 -> 0
    assert tiles[:2, :2].flatten().tolist() == pytest.approx([0.3, 0.0, 0.1, 0.2])
    assert tiles[:2, 2:].tolist() == [[0.0, 9.0], [0.0, 0.0]]
    rows = quantize_tensor(w, QuantConfig(2, 4))  # 1-D blocks of 4 = rows: 0.3 shares 9.0's scale
    assert rows[0].tolist() == [0.0, 0.0, 0.0, 9.0]
    assert torch.equal(quantize_tensor(w, QuantConfig(2, (2, 2), block_shape="2d")), tiles)


def test_two_d_tiles_pad_both_dimensions() -> None:
    w = torch.randn(5, 7, dtype=torch.float64)
    out = quantize_tensor(w, QuantConfig(4, (2, 3), block_shape="2d"))
    assert out.shape == w.shape
    assert torch.allclose(out, reference_quantize(w, 4, (2, 3), block_shape="2d"))


# --------------------------------------------------------------------------- clipping


def test_zscore_clip_hand_computed() -> None:
    # |w| = [0, 0, 0, 0, 10]: mean 2, population std 4 -> z = 1 threshold 6
    out = quantize_tensor(t([0.0, 0.0, 0.0, 0.0, -10.0]), QuantConfig(8, 5, clip=ZScoreClip(1.0)))
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, -6.0])


def test_top_fraction_clip_per_block_and_per_tensor() -> None:
    w = t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    # per block of 5, fraction 0.2: one value per block clamped to the next largest
    per_block = quantize_tensor(w, QuantConfig(8, 5, clip=TopFractionClip(0.2)))
    assert per_block[[4, 9]].tolist() == pytest.approx([4.0, 9.0], abs=0.02)
    # per tensor: the top two of ten clamped to 8; the first block is untouched
    per_tensor = quantize_tensor(w, QuantConfig(8, 5, clip=TopFractionClip(0.2, per="tensor")))
    assert per_tensor[[4, 8, 9]].tolist() == pytest.approx([5.0, 8.0, 8.0], abs=0.02)


def test_iqr_clip_hand_computed() -> None:
    # Q1 = 2, Q3 = 4 (linear interpolation), fences [-1, 7]
    out = quantize_tensor(t([1.0, 2.0, 3.0, 4.0, 100.0]), QuantConfig(8, 5, clip=IQRClip(1.5)))
    assert out.tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0, 7.0], abs=0.02)


def test_masked_quantile_matches_torch() -> None:
    values = torch.randn(6, 33, dtype=torch.float64)
    valid = torch.ones_like(values, dtype=torch.bool)
    for quantile in (0.0, 0.25, 0.5, 0.75, 1.0):
        expected = torch.quantile(values, quantile, dim=-1)
        assert torch.allclose(q._masked_quantile(values, valid, quantile), expected)


def test_parse_clip() -> None:
    assert parse_clip("zscore:6") == ZScoreClip(6.0)
    assert parse_clip("top:0.01") == TopFractionClip(0.01)
    assert parse_clip("top-tensor:0.01") == TopFractionClip(0.01, per="tensor")
    assert parse_clip("IQR:3") == IQRClip(3.0)
    assert parse_clip("none") is None and parse_clip(None) is None
    assert str(parse_clip("zscore:6")) == "zscore:6"


@pytest.mark.parametrize("spec", ["foo:1", "zscore", "zscore:abc", "zscore:-1", "top:1.5", "iqr:0"])
def test_bad_clip_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_clip(spec)


# --------------------------------------------------------------------------- holdout


def test_holdout_hand_computed() -> None:
    w = t([0.0, 0.1, 0.2, 0.3, 3.0])
    assert quantize_tensor(w, QuantConfig(2, 5)).tolist() == [0.0, 0.0, 0.0, 0.0, 3.0]
    held = quantize_tensor(w, QuantConfig(2, 5), holdout=[(4,)])
    assert held.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 3.0])
    assert held[4].item() == 3.0


def test_holdout_escapes_clipping() -> None:
    w = t([0.0, 0.0, 0.0, 0.0, -10.0])
    out = quantize_tensor(w, QuantConfig(8, 5, clip=ZScoreClip(1.0)), holdout=[(4,)])
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0, -10.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("block_shape", ["1d", "2d"])
def test_held_out_weights_come_back_bit_exact(dtype: torch.dtype, block_shape: str) -> None:
    w = torch.randn(12, 20).to(dtype)
    w[3, 7] = 37.123
    w[11, 19] = -0.0001234
    out = quantize_tensor(
        w, QuantConfig(3, 8, block_shape=block_shape, clip="zscore:2"), holdout=[(3, 7), (11, 19)]
    )
    assert out.dtype == dtype and out.shape == w.shape
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[w.element_size()]
    for row, col in [(3, 7), (11, 19)]:
        assert torch.equal(out[row, col : col + 1].view(as_int), w[row, col : col + 1].view(as_int))


def test_holdout_mask_and_index_forms_agree() -> None:
    w = torch.randn(6, 10)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[2, 3] = True
    by_mask = quantize_tensor(w, QuantConfig(4, 16), holdout=mask)
    assert torch.equal(by_mask, quantize_tensor(w, QuantConfig(4, 16), holdout=[(2, 3)]))
    assert torch.equal(
        by_mask, quantize_tensor(w, QuantConfig(4, 16), holdout=torch.tensor([[2, 3]]))
    )


# --------------------------------------------------------------------------- against a loop


def reference_quantize(
    w: torch.Tensor,
    bits: int,
    block: int | tuple[int, int],
    *,
    symmetric: bool = False,
    block_shape: str = "1d",
    clip: q.ClipConfig | None = None,
) -> torch.Tensor:
    """The obvious per-block loop: each block quantized on its own (no padding needed)."""
    out = w.clone().double()
    if block_shape == "1d":
        flat = out.reshape(-1)
        slices = [(slice(i, i + block),) for i in range(0, flat.numel(), block)]
        target = flat
    else:
        rows, cols = block if isinstance(block, tuple) else (block, block)
        slices = [
            (slice(r, r + rows), slice(c, c + cols))
            for r in range(0, w.shape[0], rows)
            for c in range(0, w.shape[1], cols)
        ]
        target = out
    for index in slices:
        chunk = target[index].reshape(1, -1)
        valid = torch.ones_like(chunk, dtype=torch.bool)
        if clip is not None:
            chunk = q._clip_blocks(chunk, valid, clip)
        params = choose_qparams(chunk, bits, symmetric=symmetric)
        target[index] = q.fake_quantize(chunk, params).reshape(target[index].shape)
    return out.reshape(w.shape).to(w.dtype)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 9),
    cols=st.integers(1, 13),
    block=st.integers(1, 20),
    symmetric=st.booleans(),
    two_d=st.booleans(),
    clip=st.sampled_from([None, ZScoreClip(1.5), TopFractionClip(0.1), IQRClip(1.0)]),
    seed=st.integers(0, 2**16),
)
def test_vectorized_matches_per_block_loop(
    bits: int,
    rows: int,
    cols: int,
    block: int,
    symmetric: bool,
    two_d: bool,
    clip: q.ClipConfig | None,
    seed: int,
) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    shape = "2d" if two_d else "1d"
    tile = (block % 4 + 1, block) if two_d else block
    expected = reference_quantize(w, bits, tile, symmetric=symmetric, block_shape=shape, clip=clip)
    out = quantize_tensor(
        w, QuantConfig(bits, tile, symmetric=symmetric, block_shape=shape, clip=clip)
    )
    assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    w = torch.randn(64, 48, dtype=torch.float64) * torch.rand(64, 1, dtype=torch.float64) * 5
    out = quantize_tensor(w, QuantConfig(bits, 32, symmetric=symmetric))
    blocks, quantized = w.reshape(-1, 32), out.reshape(-1, 32)
    low = blocks.amin(-1, keepdim=True).clamp(max=0)
    high = blocks.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        step = torch.maximum(-low, high) / (2 ** (bits - 1) - 1)
    else:
        step = (high - low) / (2**bits - 1)
    assert ((blocks - quantized).abs() <= step / 2 + 1e-12).all()
    # and the error really is that coarse: it is not secretly higher precision
    assert (blocks - quantized).abs().max() > (step / 4).min()
    levels = torch.unique(quantized[0]).numel()
    assert levels <= (2**bits - 1 if symmetric else 2**bits)


# --------------------------------------------------------------------------- the config


def test_config_defaults_and_clip_spellings() -> None:
    config = QuantConfig()
    assert (config.bits, config.block_size, config.block_shape) == (4, 4096, "1d")
    assert config.symmetric is False and config.clip is None
    assert QuantConfig(4, 64, clip="zscore:6") == QuantConfig(4, 64, clip=ZScoreClip(6.0))
    assert QuantConfig(3, 5, block_shape="2d").block == (5, 5)
    assert QuantConfig(3, 64, clip="iqr:3").to_dict() == {
        "bits": 3,
        "block_size": 64,
        "block_shape": "1d",
        "symmetric": False,
        "clip": "iqr:3",
    }


def test_config_is_frozen_and_keyword_only_after_the_block() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().bits = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        QuantConfig(4, 64, "2d")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(bits=1), "bits must be an integer from 2 to 8, got 1"),
        (dict(block_size=-1), "block size must be a positive integer, got -1"),
        (dict(block_size=(2, 3)), "a 1d block size has 1 dimension"),
        (dict(block_shape="3d"), "block_shape must be '1d' or '2d', got '3d'"),
        (dict(symmetric="yes"), "symmetric must be True or False, got 'yes'"),
        (dict(clip=6), "clip must be a clip config or a string, got int"),
        (dict(clip="median:3"), "unknown clip 'median:3'"),
    ],
)
def test_bad_config_field_is_one_value_error_naming_it(fields: dict, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        QuantConfig(**fields)
    assert message in str(raised.value)


def test_functions_take_only_a_config() -> None:
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        quantize_tensor(torch.randn(8), 4)  # type: ignore[arg-type]
    model = tiny_model("llama", num_layers=1)
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        quantize_model(model, 4)  # type: ignore[arg-type]


def test_grid_runs_bits_then_block_sizes_then_clips() -> None:
    grid = quant_grid([4, 3], [64, 128], ["none", "zscore:6"], symmetric=True)
    assert [(c.bits, c.block_size, str(c.clip or "none")) for c in grid[:3]] == [
        (4, 64, "none"),
        (4, 64, "zscore:6"),
        (4, 128, "none"),
    ]
    assert len(grid) == 8 and all(c.symmetric for c in grid)
    with pytest.raises(ValueError, match="at least one bits value"):
        quant_grid([], [64])


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        quantize_tensor(torch.randn(8), QuantConfig(bits, 4))


@pytest.mark.parametrize("block", [0, -4, 2.5, (2, 0)])
def test_bad_block_size(block: object) -> None:
    with pytest.raises(ValueError, match="block size"):
        quantize_tensor(
            torch.randn(4, 4), QuantConfig(4, block, block_shape="2d" if block == (2, 0) else "1d")
        )


def test_bad_tensor_arguments() -> None:
    with pytest.raises(ValueError, match="outside a tensor of shape"):
        quantize_tensor(torch.randn(4, 4), QuantConfig(4, 4), holdout=[(4, 0)])
    with pytest.raises(ValueError, match="2-D tiles need a 2-D tensor"):
        quantize_tensor(torch.randn(8), QuantConfig(4, 4, block_shape="2d"))
    with pytest.raises(ValueError, match="block_shape"):
        quantize_tensor(torch.randn(8), QuantConfig(4, 4, block_shape="3d"))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_tensor(torch.arange(8), QuantConfig(4, 4))


# --------------------------------------------------------------------------- whole models


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_default_selection_skips_embeddings_and_lm_head() -> None:
    model = tiny_model("llama", num_layers=2)
    names = select_modules(model)
    assert "lm_head" not in names and all("embed" not in n for n in names)
    assert len(names) == 14  # q, k, v, o, gate, up, down per layer
    assert list(select_modules(model, "*.mlp.down_proj")) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert len(select_modules(model, lambda name, module: "self_attn" in name)) == 8


def test_quantize_model_holds_out_and_restores_bit_exact() -> None:
    model = tiny_model("llama", num_layers=2)
    down = model.model.layers[1].mlp.down_proj
    down.weight.data[5, 17] = 40.0
    saved = snapshot(model)
    sw = ("model.layers.1.mlp.down_proj", 5, 17)
    handle = quantize_model(model, QuantConfig(3, 64, clip="zscore:3"), holdout=[sw])
    assert handle.held_out == 1 and handle.active
    assert down.weight[5, 17].item() == 40.0
    assert not torch.equal(down.weight, saved["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])
    handle.restore()
    handle.restore()  # idempotent
    assert same(model, saved) and not handle.active


def test_without_holdout_the_clip_destroys_the_planted_weight() -> None:
    model = tiny_model("llama", num_layers=1)
    model.model.layers[0].mlp.down_proj.weight.data[5, 17] = 40.0
    with quantize_model(model, QuantConfig(4, 64, clip="zscore:3")):
        # clamped to its block's mean + 3 std of |w|, which the 40 itself inflates to about 16
        assert model.model.layers[0].mlp.down_proj.weight[5, 17].item() < 20.0


def test_conv1d_holdout_coordinates_are_out_in() -> None:
    model = tiny_model("gpt2", num_layers=1)
    module = model.transformer.h[0].mlp.c_proj
    with torch.no_grad():
        oriented_weight(module)[3, 100] = 25.0  # stored as weight[100, 3]
    saved = snapshot(model)
    with quantize_model(
        model, QuantConfig(3, 32), holdout=[("transformer.h.0.mlp.c_proj", 3, 100)]
    ):
        assert module.weight[100, 3].item() == 25.0
        # blocks run along [out, in] rows: same as quantizing the oriented view directly
        expected = quantize_tensor(
            saved["transformer.h.0.mlp.c_proj.weight"].t(), QuantConfig(3, 32), holdout=[(3, 100)]
        )
        assert torch.equal(oriented_weight(module), expected)
    assert same(model, saved)


def test_quantize_model_keeps_dtype() -> None:
    model = tiny_model("llama", num_layers=1).to(torch.bfloat16)
    with quantize_model(model, QuantConfig(4, 32)):
        assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


LAYER0_DOWN = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        (dict(bits=9, block_size=64), {}, "bits"),
        (dict(bits=4, block_size=0), {}, "block size"),
        (dict(bits=4, block_size=64, clip="median:3"), {}, "unknown clip"),
        (dict(bits=4, block_size=64), dict(holdout=[(LAYER0_DOWN, 64, 0)]), "outside"),
        (
            dict(bits=4, block_size=64),
            dict(holdout=[("model.layers.9.mlp.down_proj", 0, 0)]),
            "no module",
        ),
        (
            dict(bits=4, block_size=64),
            dict(modules=["model.layers.0.mlp.nothing"]),
            "not Linear-like",
        ),
    ],
)
def test_bad_arguments_touch_no_weight(config: dict, kwargs: dict, message: str) -> None:
    model = tiny_model("llama", num_layers=1)
    saved = snapshot(model)
    with pytest.raises(ValueError, match=message):
        quantize_model(model, QuantConfig(**config), **kwargs)
    assert same(model, saved)


def test_quantized_model_changes_nothing_until_entered() -> None:
    model = tiny_model("llama", num_layers=1)
    saved = snapshot(model)
    quantized = QuantizedModel(model, QuantConfig(3, 64), holdout=[(LAYER0_DOWN, 3, 5)])
    assert not quantized.active and same(model, saved) and quantized.held_out == 1
    with quantized:
        assert quantized.active and not same(model, saved)
        assert (
            model.model.layers[0].mlp.down_proj.weight[3, 5] == saved[f"{LAYER0_DOWN}.weight"][3, 5]
        )
    assert not quantized.active and same(model, saved)
    with pytest.raises(ValueError, match="outside"):
        QuantizedModel(model, QuantConfig(3, 64), holdout=[(LAYER0_DOWN, 64, 0)])


def test_entering_what_quantize_model_returned_quantizes_once() -> None:
    model = tiny_model("llama", num_layers=1)
    saved = snapshot(model)
    handle = quantize_model(model, QuantConfig(2, 64, clip="zscore:1"))
    once = snapshot(model)
    with handle:
        assert same(model, once)
    assert same(model, saved)
    handle.apply()
    with pytest.raises(RuntimeError, match="already quantized"):
        handle.apply()
    handle.restore()
    assert same(model, saved)


def test_failure_midway_restores_every_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama", num_layers=1)
    saved = snapshot(model)
    calls = []
    real = q.quantize_tensor

    def fail_on_third(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(q, "quantize_tensor", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_model(model, QuantConfig(4, 64))
    assert len(calls) == 3 and same(model, saved)


# --------------------------------------------------------------------------- activations


def test_activation_tokens_are_quantized_per_token() -> None:
    # token 0: max 127 -> scale 1; token 1: max 1.27 -> scale 0.01
    x = torch.tensor([[[127.0, 3.4, -2.6], [1.27, 0.034, -0.026]]])
    out = quantize_activation_tokens(x, 8)
    assert out[0, 0].tolist() == [127.0, 3.0, -3.0]
    assert out[0, 1].tolist() == pytest.approx([1.27, 0.03, -0.03])


def test_activation_holdout_replaces_by_median_and_restores() -> None:
    x = torch.tensor([[0.1, -0.2, 0.3, 500.0, 0.05]])
    plain = quantize_activation_tokens(x, 8)
    held = quantize_activation_tokens(x, 8, holdout_channels=[3])
    assert plain[0, :3].abs().sum() == 0  # 500 sets the scale: everything else rounds to 0
    assert held[0, 3].item() == 500.0
    # with 500 replaced by the median (0.1), the token's scale is 0.3 / 127
    assert held[0, [0, 1, 2, 4]].tolist() == pytest.approx([0.1, -0.2, 0.3, 0.05], abs=0.0012)


def test_quantize_activations_hooks_and_holdout_channels() -> None:
    model = tiny_model("llama", num_layers=2)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits
        sw = ("model.layers.0.mlp.down_proj", 5, 17)
        with quantize_activations(model, 4, holdout=[sw]) as held:
            during = model(ids).logits
        after = model(ids).logits
    # the input spike at its own input; the super activation's channel in later layers only
    assert held["model.layers.0.mlp.down_proj"] == [17]
    assert held["model.layers.1.self_attn.q_proj"] == [5]
    assert held["model.layers.1.mlp.up_proj"] == [5]
    assert "model.layers.0.self_attn.q_proj" not in held
    assert "model.layers.1.mlp.down_proj" not in held  # reads the intermediate width
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)  # hooks gone


def test_quantize_activations_rejects_bad_bits() -> None:
    model = tiny_model("llama", num_layers=1)
    with pytest.raises(ValueError, match="bits"), quantize_activations(model, 1):
        pass
    with torch.no_grad():
        assert math.isfinite(float(model(torch.tensor([[1, 2]])).logits.sum()))


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bits", "9"], "bits must be an integer from 2 to 8"),
        (["--block-size", "0"], "--block-size must be a positive integer"),
        (["--clip", "median:2"], "unknown clip"),
        (["--holdout", "model.layers.1.mlp.down_proj:5"], "MODULE:ROW:COL"),
    ],
)
def test_cli_rejects_bad_arguments_before_loading(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sw_hooks.cli import main

    assert main(["quantize", "--quiet", *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_cli_defaults_are_the_config_defaults() -> None:
    import argparse

    from sw_hooks.cli.quantize import _configs

    defaults = argparse.Namespace(bits=None, block_size=None, clip=None)
    assert _configs(defaults) == (QuantConfig(),)
    chosen = argparse.Namespace(bits=[3], block_size=[64, 128], clip=["zscore:6"])
    assert _configs(chosen) == quant_grid([3], [64, 128], ["zscore:6"])


class CharTokenizer:
    """One token per character (code point mod 256): enough for the CLI on a tiny model."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_cli_quantize_runs_the_sweep_and_writes_json(tmp_path, monkeypatch, capsys) -> None:
    import json

    from sw_hooks.cli import main
    from sw_hooks.testing import planted_llama

    planted = planted_llama()
    monkeypatch.setattr(
        "sw_hooks.models.load_model", lambda *a, **k: (planted.model, CharTokenizer())
    )
    text = tmp_path / "text.txt"
    text.write_text("".join(f"\x01\x02{chr(40 + i % 60)}" for i in range(30)))
    out = tmp_path / "out.json"
    argv = ["quantize", "--text", str(text), "--holdout", "model.layers.1.mlp.down_proj:5:17"]
    argv += ["--bits", "3", "--block-size", "64", "--clip", "zscore:1", "--json", str(out)]
    assert main([*argv, "--quiet"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["bits"], r["block_size"], r["clip"], r["holdout"]) for r in runs] == [
        (3, 64, "zscore:1", False),
        (3, 64, "zscore:1", True),
    ]
    assert f"{runs[1]['perplexity']:>12.2f}" in capsys.readouterr().out
