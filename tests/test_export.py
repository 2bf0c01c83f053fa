import hashlib
import json

import pytest
import torch

from sw_hooks.analysis.detect import run_detection
from sw_hooks.core.access import WeightElement, oriented_weight
from sw_hooks.export.manifest import (
    FORMAT,
    SCHEMA_VERSION,
    apply_manifest,
    manifest_from_dict,
    read_manifest,
    write_manifest,
)
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.primitives import quantize_tensor
from sw_hooks.testing import plant_super_weight, planted_llama, tiny_model

CAUSAL = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.3.mlp.down_proj", 9, 33)


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_detection_result_round_trip_restores_a_zeroed_weight_bit_exactly(tmp_path):
    planted = planted_llama()
    model = planted.model
    result = run_detection(model, planted.prompt(), calibration=planted.calibration_ids())
    path = tmp_path / "sw.json"
    write_manifest(result, model, path, source="main")
    weight = oriented_weight(model.get_submodule(CAUSAL[0])).detach()
    original = weight.clone()
    WeightElement.resolve(model, CAUSAL).write(torch.tensor(0.0))

    report = apply_manifest(model, read_manifest(path))

    assert torch.equal(weight[5, 17], original[5, 17]) and torch.equal(weight, original)
    [applied] = report.weights  # the verified weight only: the decoy stays a candidate
    assert (applied.module, applied.row, applied.col, applied.expert) == (*CAUSAL, None)
    assert (applied.old, applied.new, applied.changed) == (0.0, 8.0, True)
    data = json.loads(path.read_text())
    assert data["detection"] == result.options
    assert data["model"]["source"] == {"kind": "revision", "revision": "main"}
    token = planted.prompt()[0].tolist().index(1)
    assert data["super_weights"][0]["token_position"] == token
    assert data["super_weights"][0]["activation_channel"] == 5


def test_quantize_round_trip_restores_only_the_super_weights(tmp_path):
    model = planted_llama().model
    element = WeightElement.resolve(model, CAUSAL)
    element.write(torch.tensor(8.123456789))  # not on any coarse quantization grid
    original = element.read()
    write_manifest([CAUSAL, DECOY], model, tmp_path / "sw.json")
    weights = {
        name: oriented_weight(model.get_submodule(name)).detach() for name in (CAUSAL[0], DECOY[0])
    }
    with torch.no_grad():
        for weight in weights.values():
            weight.copy_(quantize_tensor(weight, QuantConfig(3, 128)))
    assert not torch.equal(element.read(), original)
    quantized = {name: weight.clone() for name, weight in weights.items()}

    report = apply_manifest(model, tmp_path / "sw.json")

    assert torch.equal(element.read(), original)
    for (name, row, col), applied in zip((CAUSAL, DECOY), report.weights, strict=True):
        expected = quantized[name].clone()
        expected[row, col] = 8.123456789 if row == 5 else 8.0
        assert torch.equal(weights[name], expected)
        assert applied.new == float(expected[row, col])
    assert report.changed[0].module == CAUSAL[0]


def test_gpt2_conv1d_weight_is_restored_through_its_transposed_storage(tmp_path):
    model = plant_super_weight(tiny_model("gpt2"), 1, 5, 17, trigger_token=1, target_token=2).model
    name = "transformer.h.1.mlp.c_proj"
    write_manifest([(name, 5, 17)], model, tmp_path / "sw.json")
    stored = model.get_submodule(name).weight
    original = stored.detach().clone()
    with torch.no_grad():
        stored[17, 5] = 0.0  # Conv1D stores [in, out]

    apply_manifest(model, read_manifest(tmp_path / "sw.json"))

    assert stored[17, 5].item() == 8.0 and torch.equal(stored, original)
    data = json.loads((tmp_path / "sw.json").read_text())
    assert data["model"]["architecture"] == "GPT2LMHeadModel"
    assert data["model"]["modules"] == {name: [64, 128]}


def test_bfloat16_bits_round_trip_and_convert_into_other_dtypes(tmp_path):
    model = planted_llama().model.to(torch.bfloat16)
    element = WeightElement.resolve(model, CAUSAL)
    element.write(torch.tensor(8.0625, dtype=torch.bfloat16))
    write_manifest([CAUSAL], model, tmp_path / "sw.json")
    entry = json.loads((tmp_path / "sw.json").read_text())["super_weights"][0]
    assert (entry["dtype"], entry["bits"], entry["value"]) == ("bfloat16", "4101", 8.0625)
    original = oriented_weight(model.get_submodule(CAUSAL[0])).clone()
    element.write(torch.tensor(-0.0, dtype=torch.bfloat16))

    apply_manifest(model, tmp_path / "sw.json")
    assert torch.equal(oriented_weight(model.get_submodule(CAUSAL[0])), original)

    float32 = planted_llama().model
    report = apply_manifest(float32, tmp_path / "sw.json")
    assert WeightElement.resolve(float32, CAUSAL).read().item() == 8.0625
    assert (report.weights[0].old, report.weights[0].changed) == (8.0, True)


def test_float32_bits_are_recorded_as_hex(tmp_path):
    model = planted_llama().model
    manifest = write_manifest([CAUSAL], model, tmp_path / "m.json")
    assert (manifest.super_weights[0].dtype, manifest.super_weights[0].bits) == (
        "float32",
        "41000000",
    )


def test_applying_to_an_unchanged_model_reports_no_change(tmp_path):
    model = planted_llama().model
    write_manifest([CAUSAL], model, tmp_path / "sw.json")
    report = apply_manifest(model, tmp_path / "sw.json")
    assert report.changed == () and report.weights[0].old == report.weights[0].new == 8.0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (lambda: planted_llama(num_layers=6).model, "num_hidden_layers 4"),
        (lambda: tiny_model("mistral"), "manifest is for LlamaForCausalLM, not Mistral"),
    ],
)
def test_a_different_model_is_refused_with_nothing_written(tmp_path, target, message):
    write_manifest([CAUSAL, DECOY], planted_llama().model, tmp_path / "sw.json")
    model = target()
    WeightElement.resolve(model, CAUSAL).write(torch.tensor(0.0))
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        apply_manifest(model, tmp_path / "sw.json")
    assert _unchanged(model, before)


def test_a_missing_module_is_refused_before_the_first_write(tmp_path):
    source = planted_llama(num_layers=6).model
    data = write_manifest(
        [CAUSAL, ("model.layers.5.mlp.down_proj", 9, 33)], source, tmp_path / "m.json"
    )
    data = data.to_dict()
    data["model"]["num_hidden_layers"] = None
    model = planted_llama().model
    WeightElement.resolve(model, CAUSAL).write(torch.tensor(0.0))
    before = _state(model)
    with pytest.raises(ValueError, match="no module named 'model.layers.5.mlp.down_proj'"):
        apply_manifest(model, manifest_from_dict(data))
    assert _unchanged(model, before)


def test_a_different_shape_is_refused_with_nothing_written(tmp_path):
    data = write_manifest([CAUSAL], planted_llama().model, tmp_path / "m.json").to_dict()
    data["model"]["modules"][CAUSAL[0]] = [64, 256]
    model = planted_llama().model
    WeightElement.resolve(model, CAUSAL).write(torch.tensor(0.0))
    before = _state(model)
    with pytest.raises(ValueError, match=r"has shape \[64, 128\], the manifest says \[64, 256\]"):
        apply_manifest(model, manifest_from_dict(data))
    assert _unchanged(model, before)


def _corrupt(data, edit):
    edit(data)
    return data


CORRUPTIONS = [
    (lambda d: d.update(schema_version=2), "unsupported schema_version 2"),
    (lambda d: d.pop("format"), "not a super-weight manifest"),
    (lambda d: d.pop("super_weights"), "missing field 'super_weights'"),
    (lambda d: d["model"].pop("architecture"), "model: missing field 'architecture'"),
    (lambda d: d["super_weights"][0].pop("bits"), r"super_weights\[0\]: missing field 'bits'"),
    (lambda d: d["super_weights"][0].update(row="5"), "field 'row' has the wrong type"),
    (lambda d: d["super_weights"][0].update(row=True), "field 'row' has the wrong type"),
    (lambda d: d["super_weights"][0].update(col=-1), "field 'col' must be >= 0"),
    (lambda d: d["super_weights"][0].update(dtype="int8"), "dtype 'int8' is not one of"),
    (lambda d: d["super_weights"][0].update(bits="4100"), "bits '4100' are not 8 lowercase hex"),
    (lambda d: d["super_weights"][0].update(value=7.5), "value 7.5 disagrees with its bits"),
    (lambda d: d["model"]["modules"].clear(), "model.modules lacks"),
    (lambda d: d["model"].update(hidden_size="64"), "field 'hidden_size' has the wrong type"),
]


@pytest.mark.parametrize(("edit", "message"), CORRUPTIONS)
def test_a_corrupt_manifest_gives_one_clear_error(tmp_path, edit, message):
    path = tmp_path / "sw.json"
    write_manifest([CAUSAL], planted_llama().model, path)
    path.write_text(json.dumps(_corrupt(json.loads(path.read_text()), edit)))
    with pytest.raises(ValueError, match=message):
        read_manifest(path)


def test_the_manifest_json_is_stable_and_follows_the_schema(tmp_path):
    model = planted_llama().model
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_manifest([DECOY, CAUSAL], model, first)
    write_manifest([DECOY, CAUSAL], model, second)
    text = first.read_text()
    assert text == second.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data == {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": {
            "architecture": "LlamaForCausalLM",
            "model_type": "llama",
            "num_hidden_layers": 4,
            "hidden_size": 64,
            "modules": {CAUSAL[0]: [64, 128], DECOY[0]: [64, 128]},
            "source": None,
        },
        "super_weights": [
            {
                "module": DECOY[0],
                "row": 9,
                "col": 33,
                "expert": None,
                "value": 8.0,
                "dtype": "float32",
                "bits": "41000000",
                "activation_channel": 9,
                "token_position": None,
            },
            {
                "module": CAUSAL[0],
                "row": 5,
                "col": 17,
                "expert": None,
                "value": 8.0,
                "dtype": "float32",
                "bits": "41000000",
                "activation_channel": 5,
                "token_position": None,
            },
        ],
        "detection": None,
    }


def test_a_local_source_file_is_hashed_and_a_bad_path_is_refused(tmp_path):
    weights_file = tmp_path / "model.safetensors"
    weights_file.write_bytes(b"not really weights" * 1000)
    model = planted_llama().model
    manifest = write_manifest([CAUSAL], model, tmp_path / "sw.json", source=weights_file)
    assert manifest.model["source"] == {
        "kind": "file",
        "name": "model.safetensors",
        "bytes": 18000,
        "sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest(),
    }
    with pytest.raises(ValueError, match="is not a file"):
        write_manifest([CAUSAL], model, tmp_path / "x.json", source=tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="is not a file"):
        write_manifest([CAUSAL], model, tmp_path / "x.json", source=str(tmp_path))
    assert not (tmp_path / "x.json").exists()


def test_a_failed_write_puts_back_what_was_already_written(tmp_path, monkeypatch):
    model = planted_llama().model
    write_manifest([CAUSAL, DECOY], model, tmp_path / "sw.json")
    for coordinate in (CAUSAL, DECOY):
        WeightElement.resolve(model, coordinate).write(torch.tensor(0.0))
    before = _state(model)
    real_write = WeightElement.write

    def fail_on_the_decoy(element, value):
        if element.module_name == DECOY[0] and float(value) != 0.0:
            raise RuntimeError("disk full")
        real_write(element, value)

    monkeypatch.setattr(WeightElement, "write", fail_on_the_decoy)
    with pytest.raises(RuntimeError, match="disk full"):
        apply_manifest(model, tmp_path / "sw.json")
    assert _unchanged(model, before)
