"""sw_hooks.export.gguf: quantized GGUF files whose super-weight tensors keep their precision.

The source is a tiny planted llama written as an F32 GGUF file
(:func:`sw_hooks.testing.gguf_file.save_gguf`, with a 256-token byte-level tokenizer), so
transformers loads both the source and every export from local files.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GgmlType

from sw_hooks.export.gguf import QUANT_TYPES, export_gguf
from sw_hooks.export.gguf_names import gguf_tensor_name
from sw_hooks.export.manifest import apply_manifest, write_manifest
from sw_hooks.testing import planted_llama
from sw_hooks.testing.gguf_file import save_gguf

SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
SUPER_TENSOR = "blk.1.ffn_down.weight"
# Not representable in float16 nor on any 4-bit grid, so every rounding shows.
SUPER_VALUE = 7.3


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The planted llama as ``source.gguf``, its super weight set to :data:`SUPER_VALUE`."""
    model = planted_llama().model
    with torch.no_grad():
        model.get_submodule(SUPER[0]).weight[SUPER[1], SUPER[2]] = SUPER_VALUE
    path = tmp_path_factory.mktemp("gguf") / "source.gguf"
    save_gguf(model, path)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _fields(path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def _dequantized(path, name: str) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "architecture", "expected"),
    [
        ("model.layers.11.mlp.down_proj", "llama", "blk.11.ffn_down.weight"),
        ("model.layers.0.self_attn.q_proj", "llama", "blk.0.attn_q.weight"),
        ("model.layers.2.mlp.down_proj", "qwen2", "blk.2.ffn_down.weight"),
        ("transformer.h.3.mlp.c_proj", "gpt2", "blk.3.ffn_down.weight"),
        ("model.layers.1.block_sparse_moe.experts.w2", "llama", "blk.1.ffn_down_exps.weight"),
        ("model.layers.1.mlp.nonesuch", "llama", None),
        ("model.layers.1.mlp.down_proj", "no-such-architecture", None),
    ],
)
def test_gguf_tensor_name_follows_the_gguf_name_map(module, architecture, expected):
    if expected is None:
        with pytest.raises(ValueError, match="gguf"):
            gguf_tensor_name(module, architecture)
    else:
        assert gguf_tensor_name(module, architecture) == expected


# -- the written file -----------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["Q4_0", "Q8_0", "MXFP4", "Q5_1"])
@pytest.mark.parametrize(("keep", "kept_type"), [("f16", "F16"), ("q8_0", "Q8_0"), (None, None)])
def test_matrices_are_quantized_and_the_super_weight_tensor_kept(
    source, tmp_path, quant_type, keep, kept_type
):
    out = tmp_path / "out.gguf"
    export = export_gguf(source, out, quant_type=quant_type, keep=keep, super_weights=[SUPER])
    types = _types(out)
    expected_super = kept_type or quant_type
    assert types.pop(SUPER_TENSOR) == expected_super
    matrices = {name: t for name, t in types.items() if not name.endswith("norm.weight")}
    assert set(matrices.values()) == {quant_type}
    assert len(matrices) == 4 * 7 + 2 - 1  # 7 per layer, embeddings, output; one kept
    assert {t for name, t in types.items() if name.endswith("norm.weight")} == {"F32"}
    assert export.kept == ({SUPER_TENSOR: kept_type} if keep else {})
    assert (export.path, export.quant_type, export.unfit) == (out, quant_type, {})
    assert export.bytes_written == out.stat().st_size


def test_every_metadata_key_is_copied_and_the_file_type_updated(source, tmp_path):
    out = tmp_path / "out.gguf"
    export_gguf(source, out, quant_type="Q4_0", super_weights=[SUPER])
    written, original = _fields(out), _fields(source)
    assert written.pop("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert written == original
    assert len(written["tokenizer.ggml.tokens"]) == 256


def test_a_matrix_whose_rows_do_not_fit_the_block_keeps_its_source_type(tmp_path):
    model = planted_llama().model
    path = tmp_path / "odd.gguf"
    save_gguf(model, path, extra={"blk.0.odd.weight": np.ones((4, 20), np.float32)})
    export = export_gguf(path, tmp_path / "out.gguf", quant_type="Q4_0")
    assert export.unfit == {"blk.0.odd.weight": "F32"}
    assert _types(tmp_path / "out.gguf")["blk.0.odd.weight"] == "F32"


# What llama-quantize never quantizes, and a matrix and an experts tensor it does.
_RULE_TENSORS = {
    "blk.1.ffn_gate_inp.weight": ((8, 64), "F32"),  # the experts' router
    "blk.1.ffn_gate_inp_shexp.weight": ((1, 64), "F32"),  # one row: 1-D to ggml
    "position_embd.weight": ((64, 64), "F32"),
    "token_types.weight": ((2, 64), "F32"),
    "blk.1.ssm_conv1d.weight": ((64, 64), "F32"),
    "v.blk.0.attn_rel_b.weight": ((64, 64), "F32"),
    "blk.1.ffn_down_exps.weight": ((8, 64, 128), "Q4_0"),
    "blk.1.ffn_gate_shexp.weight": ((64, 64), "Q4_0"),
}


def test_what_llama_quantize_keeps_at_full_precision_stays_there(tmp_path):
    path = tmp_path / "moe.gguf"
    extra = {name: np.ones(shape, np.float32) for name, (shape, _) in _RULE_TENSORS.items()}
    save_gguf(planted_llama().model, path, extra=extra)
    export_gguf(path, tmp_path / "out.gguf", quant_type="Q4_0")
    types = _types(tmp_path / "out.gguf")
    assert {name: types[name] for name in _RULE_TENSORS} == {
        name: kind for name, (_, kind) in _RULE_TENSORS.items()
    }


@pytest.mark.parametrize(
    "module",
    [
        "model.layers.1.mlp.experts.down_proj",  # fused 3-D experts (transformers 5)
        "model.layers.1.mlp.experts.3.down_proj",  # a list of expert MLPs
        "model.layers.1.block_sparse_moe.experts.3.w2",  # older Mixtral checkpoints
    ],
)
def test_an_experts_super_weight_keeps_the_ffn_down_exps_tensor(tmp_path, module):
    from sw_hooks.core.coordinate import Coordinate

    path = tmp_path / "moe.gguf"
    extra = {"blk.1.ffn_down_exps.weight": np.ones((8, 64, 128), np.float32)}
    save_gguf(planted_llama().model, path, extra=extra)
    export = export_gguf(
        path, tmp_path / "out.gguf", super_weights=[Coordinate(module, 5, 100, expert=3)]
    )
    assert export.kept == {"blk.1.ffn_down_exps.weight": "F16"}
    assert _types(tmp_path / "out.gguf")["blk.1.ffn_down_exps.weight"] == "F16"
    with pytest.raises(ValueError, match="expert 8 is not in blk.1.ffn_down_exps.weight"):
        export_gguf(path, tmp_path / "x.gguf", super_weights=[Coordinate(module, 5, 100, 8)])


def test_progress_reports_the_tensors_written(source, tmp_path):
    lines: list[str] = []
    export_gguf(source, tmp_path / "out.gguf", progress=lines.append)
    assert lines[-1] == "tensors converted: 39/39"  # 9 per layer, embeddings, output norm, output
    assert len(lines) == 10


# -- loading it back ------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["Q4_0", "MXFP4"])
def test_transformers_loads_the_values_gguf_dequantizes(source, tmp_path, quant_type):
    out = tmp_path / "out.gguf"
    export_gguf(source, out, quant_type=quant_type, keep="f16", super_weights=[SUPER])
    loaded = _load(out)
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.down_proj"
        expected = torch.from_numpy(_dequantized(out, f"blk.{layer}.ffn_down.weight"))
        assert torch.equal(loaded.get_submodule(name).weight.detach(), expected)
    kept = loaded.get_submodule(SUPER[0]).weight.detach()[SUPER[1], SUPER[2]]
    assert float(kept) == float(np.float16(SUPER_VALUE))
    up = loaded.get_submodule("model.layers.1.mlp.up_proj").weight.detach()
    assert torch.equal(up, torch.from_numpy(_dequantized(out, "blk.1.ffn_up.weight")))


def test_the_manifest_restores_the_exact_bits_after_loading(source, tmp_path):
    original = _load(source)
    manifest = write_manifest([SUPER], original, tmp_path / "sw.json")
    assert manifest.super_weights[0].bits == f"{np.float32(SUPER_VALUE).view(np.uint32):08x}"
    out = tmp_path / "out.gguf"
    export_gguf(source, out, quant_type="Q4_0", keep=None, super_weights=manifest)
    loaded = _load(out)
    weight = loaded.get_submodule(SUPER[0]).weight.detach()
    assert float(weight[SUPER[1], SUPER[2]]) != np.float32(SUPER_VALUE)
    report = apply_manifest(loaded, tmp_path / "sw.json")
    assert [w.changed for w in report.weights] == [True]
    restored = weight[SUPER[1], SUPER[2]].reshape(1).view(torch.int32)
    assert int(restored) == int(np.float32(SUPER_VALUE).view(np.int32))


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant_type": "Q3_K"}, "unknown GGUF type 'Q3_K'; choose one of Q4_0"),
        ({"quant_type": None}, "unknown GGUF type None"),
        ({"keep": "f32"}, "keep must be one of f16, q8_0 or None, got 'f32'"),
        (
            {"super_weights": [("model.layers.1.mlp.gate", 0, 0)]},
            "model.layers.1.mlp.gate names no tensor of this llama GGUF file",
        ),
        (
            {"super_weights": [("model.layers.9.mlp.down_proj", 0, 0)]},
            r"names no tensor of this llama GGUF file \(looked for blk.9.ffn_down.weight\)",
        ),
        (
            {"super_weights": [("model.layers.1.mlp.down_proj", 64, 0)]},
            r"model.layers.1.mlp.down_proj\[64, 0\] is outside blk.1.ffn_down.weight, "
            r"whose shape is \[64, 128\]",
        ),
        (
            {"super_weights": [("model.layers.1.mlp.down_proj", 0, 128)]},
            r"\[0, 128\] is outside",
        ),
        (
            {"super_weights": [("model.layers.1.mlp.down_proj", 2, 0, 0)]},
            "expert 2 is not in blk.1.ffn_down.weight",
        ),
    ],
)
def test_bad_arguments_are_one_clear_error_and_write_nothing(source, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_gguf(source, tmp_path / "out.gguf", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_are_one_clear_error(source, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"{}")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not gguf")
    (tmp_path / "cut.gguf").write_bytes(source.read_bytes()[:2000])
    out = tmp_path / "out.gguf"
    cases = [
        (checkpoint, out, "reads GGUF only: convert the checkpoint with llama.cpp"),
        (checkpoint / "model.safetensors", out, "reads GGUF only"),
        (tmp_path / "missing.gguf", out, "no such GGUF file"),
        (tmp_path / "not.gguf", out, "is not a GGUF file"),
        (tmp_path / "cut.gguf", out, "cut.gguf is a truncated or corrupt GGUF file"),
        (source, source, "is the source file; write to another file"),
        (source, tmp_path / "nowhere" / "out.gguf", "folder .*nowhere does not exist"),
        (source, tmp_path, "is a folder; give the name of a .gguf file"),
    ]
    for src, dst, message in cases:
        with pytest.raises(ValueError, match=message):
            export_gguf(src, dst, super_weights=[SUPER])
    assert not out.exists()


def test_super_weights_of_the_wrong_kind_are_a_type_error(source, tmp_path):
    with pytest.raises(TypeError, match="super_weights must be a DetectionResult"):
        export_gguf(source, tmp_path / "out.gguf", super_weights="model.layers.1.mlp.down_proj")


def test_the_supported_types_are_the_ones_gguf_quantizes():
    values = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    for name in QUANT_TYPES:
        qtype = GgmlType[name]
        assert gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype).shape == (2, 32)


# -- the command ----------------------------------------------------------------------------


def test_the_command_writes_the_file_and_a_manifest_that_restores_the_bits(
    source, tmp_path, capsys
):
    from sw_hooks.analysis.detect import run_detection
    from sw_hooks.cli import main

    planted = planted_llama()
    result = run_detection(planted.model, planted.prompt(), calibration=planted.calibration_ids())
    result.save(tmp_path / "detected.json")
    out, manifest = tmp_path / "out.gguf", tmp_path / "sw.json"
    argv = ["export", str(source), "--gguf", str(out), "--type", "q4_0", "--keep", "none"]
    argv += ["--super-weights", str(tmp_path / "detected.json"), "--manifest", str(manifest)]
    assert main([*argv, "--quiet", "--no-cache"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["super weights: 1"]
    assert _types(out)[SUPER_TENSOR] == "Q4_0"
    loaded = _load(out)
    apply_manifest(loaded, manifest)
    restored = loaded.get_submodule(SUPER[0]).weight.detach()[SUPER[1], SUPER[2]]
    assert float(restored) == np.float32(SUPER_VALUE)


def test_the_command_keeps_the_super_weight_tensor_at_f16_by_default(source, tmp_path, capsys):
    from sw_hooks.cli import main

    out = tmp_path / "out.gguf"
    (tmp_path / "given.json").write_text(_detection_json())
    argv = ["export", str(source), "--gguf", str(out), "--super-weights"]
    assert main([*argv, str(tmp_path / "given.json"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == f"kept {SUPER_TENSOR} at F16"
    assert _types(out)[SUPER_TENSOR] == "F16"


def _detection_json() -> str:
    """A detection result holding :data:`SUPER`, verified."""
    from sw_hooks.core.results import DetectionResult, SuperWeight

    weight = SuperWeight(*SUPER[:1], 1, *SUPER[1:], SUPER_VALUE, impact=3.0, verdict="super")
    return json.dumps(DetectionResult("tiny", (weight,)).to_dict())
