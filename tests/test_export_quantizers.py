"""Quantizer configs from a detection result, each read back by its tool's own parser.

The planted model's one verified super weight is ``model.layers.1.mlp.down_proj[5, 17]``
(a 64 x 128 weight: 8,192 parameters); its decoy in layer 3 is a candidate only.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import types

import pytest
import torch
import yaml
from torch import nn

from sw_hooks.analysis.detect import run_detection
from sw_hooks.cli._noise import is_known_import_noise, silence_known_import_noise
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.export.gguf_names import gguf_tensor_name
from sw_hooks.export.quantizers import (
    HF_METHODS,
    TOOLS,
    KeptModules,
    gptqmodel_dynamic,
    hf_quantization_config,
    kept_modules,
    llama_cpp_tensor_types,
    llm_compressor_recipe,
    render,
    torchao_filter_fn,
)
from sw_hooks.testing import planted_llama

SUPER = "model.layers.1.mlp.down_proj"
DECOY = "model.layers.3.mlp.down_proj"
SUMMARY = "keeps 1 module (8,192 parameters) at high precision to protect 1 super weight"


@pytest.fixture(scope="module")
def planted():
    return planted_llama()


@pytest.fixture(scope="module")
def result(planted) -> DetectionResult:
    return run_detection(planted.model, planted.prompt(), calibration=planted.calibration_ids())


@pytest.fixture(scope="module")
def kept(result, planted) -> KeptModules:
    return kept_modules(result, planted.model)


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


# -- what is kept ----------------------------------------------------------------------------
def test_detection_keeps_the_verified_down_projection_and_counts_it(kept: KeptModules) -> None:
    assert kept == KeptModules((SUPER,), super_weights=1, parameters=8192, architecture="llama")
    assert kept.summary() == SUMMARY


def test_candidates_too_when_asked(result, planted) -> None:
    every = kept_modules(result, planted.model, candidates=True)
    assert (every.modules, every.super_weights, every.parameters) == ((SUPER, DECOY), 2, 16384)


def test_without_a_model_nothing_is_counted(result) -> None:
    kept = kept_modules(result)
    assert (kept.parameters, kept.architecture) == (None, None)
    assert kept.summary() == (
        "keeps 1 module (parameters not counted) at high precision to protect 1 super weight"
    )


def test_two_weights_in_one_module_keep_it_once() -> None:
    weights = tuple(SuperWeight(SUPER, 1, row, 17, 1.0, verdict="super") for row in (5, 6))
    kept = kept_modules(DetectionResult("m", weights))
    assert (kept.modules, kept.super_weights) == ((SUPER,), 2)


def test_a_result_without_verified_weights_is_refused(result) -> None:
    candidates = DetectionResult("tiny", tuple(w for w in result.candidates if w.module == DECOY))
    with pytest.raises(ValueError, match="no verified super weights.*candidates=True"):
        kept_modules(candidates)


def test_a_module_the_model_lacks_is_named(planted) -> None:
    weight = SuperWeight("model.layers.9.mlp.down_proj", 9, 1, 2, 1.0, verdict="super")
    with pytest.raises(ValueError, match=r"no module 'model\.layers\.9\.mlp\.down_proj'"):
        kept_modules(DetectionResult("tiny", (weight,)), planted.model)


# -- llm-compressor --------------------------------------------------------------------------
def test_llm_compressor_recipe_ignores_exactly_the_kept_modules(kept, planted) -> None:
    match = pytest.importorskip("compressed_tensors.utils.match")  # llm-compressor's matcher
    recipe = llm_compressor_recipe(kept)
    stage = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert stage == {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head", SUPER]}
    matched = {
        name
        for name, _ in match.match_named_modules(planted.model, stage["targets"], stage["ignore"])
    }
    assert matched == linear_names(planted.model) - {"lm_head", SUPER}


def test_llm_compressor_yaml_is_the_recipe_with_the_cost_on_top(kept) -> None:
    text = render(kept, "llm-compressor")
    assert text.splitlines()[0] == f"# sw_hooks: {SUMMARY}"
    assert yaml.safe_load(text) == llm_compressor_recipe(kept)


# -- torchao ---------------------------------------------------------------------------------
# torchao is a dev dependency, so these tests run in CI rather than skip.
_IMPORT_LOGGED = """
import json, logging, warnings
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append([record.name, record.getMessage()])
for name in ("", "torch"):  # torch's loggers do not propagate to the root
    logging.getLogger(name).addHandler(Keep(logging.WARNING))
logging.getLogger().setLevel(logging.DEBUG)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torchao.quantization
seen += [["warnings", str(w.message)] for w in caught]
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def torchao_quantization() -> types.ModuleType:
    silence_known_import_noise()
    return importlib.import_module("torchao.quantization")


def test_torchao_import_says_nothing_but_the_noise_the_cli_silences() -> None:
    """A fresh interpreter: a new message at import (a failed kernel, a torch mismatch) shows."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_LOGGED], capture_output=True, text=True, check=True
    )
    said = json.loads(done.stdout.splitlines()[-1])
    assert [m for m in said if not is_known_import_noise(*m)] == []


def _is_quantized(module: nn.Module) -> bool:
    return type(module.weight) is not nn.Parameter and type(module.weight) is not torch.Tensor


def test_torchao_filter_fn_chooses_every_linear_but_the_kept_ones(kept, planted) -> None:
    chosen = torchao_filter_fn(kept)
    picked = {name for name, module in planted.model.named_modules() if chosen(module, name)}
    assert picked == linear_names(planted.model) - {"lm_head", SUPER}


def test_torchao_script_calls_quantize_with_the_same_choice(kept, planted, monkeypatch) -> None:
    """The script runs against a stand-in ``torchao.quantization`` that records the call."""
    calls = []
    stand_in = types.ModuleType("torchao.quantization")
    stand_in.Int8WeightOnlyConfig = lambda: "int8 weight-only"
    stand_in.quantize_ = lambda model, config, filter_fn: calls.append((model, config, filter_fn))
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", stand_in)
    script = render(kept, "torchao")
    assert script.splitlines()[0] == f"# sw_hooks: {SUMMARY}"
    exec(compile(script, "torchao_config.py", "exec"), {"model": planted.model})
    ((model, config, chosen),) = calls
    assert (model, config) == (planted.model, "int8 weight-only")
    picked = {name for name, module in model.named_modules() if chosen(module, name)}
    assert picked == linear_names(model) - {"lm_head", SUPER}


def test_torchao_quantizes_every_linear_but_the_kept_ones(kept, torchao_quantization) -> None:
    quantization = torchao_quantization
    model = planted_llama().model
    quantization.quantize_(
        model, quantization.Int8WeightOnlyConfig(), filter_fn=torchao_filter_fn(kept)
    )
    quantized = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_quantized(m)
    }
    assert quantized == linear_names(model) - {"lm_head", SUPER}


def test_torchao_script_runs_under_torchao(kept, torchao_quantization) -> None:
    model = planted_llama().model
    exec(compile(render(kept, "torchao"), "torchao_config.py", "exec"), {"model": model})
    assert not _is_quantized(model.get_submodule(SUPER))
    assert _is_quantized(model.get_submodule(DECOY))


def test_torchao_script_refuses_a_config_that_is_not_a_call(kept) -> None:
    with pytest.raises(ValueError, match="torchao config call"):
        render(kept, "torchao", config="import os")


# -- Hugging Face ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", HF_METHODS)
def test_hf_config_is_read_by_transformers_with_the_skip_list(kept, method: str) -> None:
    from transformers.quantizers.auto import AutoQuantizationConfig

    config = AutoQuantizationConfig.from_dict(hf_quantization_config(kept, method))
    skip = getattr(config, "llm_int8_skip_modules", None) or config.modules_to_not_convert
    assert skip == ["lm_head", SUPER]


def test_hf_bitsandbytes_config_keeps_its_bits(kept) -> None:
    from transformers import BitsAndBytesConfig

    four = BitsAndBytesConfig.from_dict(hf_quantization_config(kept, "bitsandbytes_4bit"))
    eight = BitsAndBytesConfig.from_dict(hf_quantization_config(kept, "bitsandbytes_8bit"))
    assert (four.load_in_4bit, four.load_in_8bit, eight.load_in_8bit) == (True, False, True)


def test_hf_file_holds_the_config_and_the_cost(kept) -> None:
    data = json.loads(render(kept, "hf"))
    assert data["quantization_config"] == hf_quantization_config(kept)
    assert data["sw_hooks"] == {
        "kept_modules": [SUPER],
        "kept_parameters": 8192,
        "super_weights": 1,
        "summary": SUMMARY,
    }


def test_unknown_hf_method_is_refused(kept) -> None:
    with pytest.raises(ValueError, match="unknown Hugging Face method 'gguf'"):
        hf_quantization_config(kept, "gguf")


# -- GPTQModel -------------------------------------------------------------------------------
def test_gptqmodel_dynamic_skips_exactly_the_kept_module(kept, planted) -> None:
    """GPTQModel's documented rule: a ``-:`` key skips the modules its regex ``re.match``es."""
    dynamic = gptqmodel_dynamic(kept)
    assert dynamic == {r"-:model\.layers\.1\.mlp\.down_proj$": {}}
    (key,) = dynamic
    names = [name for name, _ in planted.model.named_modules()]
    planted_12 = "model.layers.12.mlp.down_proj"  # a deeper model's layer 12 must not match
    assert [n for n in [*names, planted_12] if re.match(key[2:], n)] == [SUPER]
    assert json.loads(render(kept, "gptqmodel"))["dynamic"] == dynamic


# -- llama.cpp -------------------------------------------------------------------------------
def _gguf_tensor_names(model: nn.Module) -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        module, _, suffix = name.rpartition(".")
        try:
            names.append(gguf_tensor_name(module, "llama").removesuffix(".weight") + f".{suffix}")
        except ValueError:
            continue
    return names


def test_llama_cpp_arguments_select_the_one_gguf_tensor(kept, planted) -> None:
    import gguf

    arguments = llama_cpp_tensor_types(kept)
    assert arguments == ["--tensor-type", r"blk\.1\.ffn_down\.weight=f16"]
    pattern, tensor_type = arguments[1].split("=")
    names = _gguf_tensor_names(planted.model)
    assert len(names) > 20  # every block's tensors are there to be (not) matched
    assert [n for n in names if re.search(pattern.lower(), n)] == ["blk.1.ffn_down.weight"]
    assert tensor_type.upper() in gguf.GGMLQuantizationType.__members__


def test_llama_cpp_file_is_shell_arguments_with_the_cost(kept) -> None:
    assert render(kept, "llama.cpp", tensor_type="q8_0") == (
        f"# sw_hooks: {SUMMARY}\n--tensor-type 'blk\\.1\\.ffn_down\\.weight=q8_0'\n"
    )


def test_llama_cpp_needs_an_architecture_and_a_ggml_type(result, kept) -> None:
    with pytest.raises(ValueError, match="needs the architecture"):
        llama_cpp_tensor_types(kept_modules(result))
    assert llama_cpp_tensor_types(kept_modules(result), architecture="qwen2")[1].startswith("blk")
    with pytest.raises(ValueError, match="unknown GGML type 'f17'"):
        llama_cpp_tensor_types(kept, tensor_type="f17")
    with pytest.raises(ValueError, match="does not map the architecture 'made_up'"):
        llama_cpp_tensor_types(kept, architecture="made_up")


def test_every_tool_renders_and_an_unknown_one_is_refused(kept) -> None:
    assert all(SUMMARY in render(kept, tool) for tool in TOOLS)
    with pytest.raises(ValueError, match="unknown tool 'awq'"):
        render(kept, "awq")


# -- sw-hooks quantizer-config ---------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, planted, result):
    """The planted model as a folder the CLI loads, and its detection result as JSON."""
    from sw_hooks.testing import save_checkpoint

    folder = tmp_path_factory.mktemp("cli")
    save_checkpoint(planted.model, folder / "model")
    result.save(folder / "result.json")
    return folder


def test_cli_counts_the_model_and_names_its_gguf_tensors(saved, capsys) -> None:
    from sw_hooks.cli import main

    out = saved / "tensor-types.txt"
    argv = ["quantizer-config", str(saved / "model"), "--super-weights", str(saved / "result.json")]
    assert main([*argv, "--tool", "llama.cpp", "-o", str(out), "--quiet"]) == 0
    assert out.read_text() == (
        f"# sw_hooks: {SUMMARY}\n--tensor-type 'blk\\.1\\.ffn_down\\.weight=f16'\n"
    )
    assert capsys.readouterr().out == ""


def test_cli_prints_the_config_counting_the_model(saved, kept, capsys) -> None:
    from sw_hooks.cli import main

    argv = ["quantizer-config", str(saved / "model"), "--super-weights", str(saved / "result.json")]
    assert main([*argv, "--tool", "hf", "--method", "quanto", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantization_config"] == hf_quantization_config(kept, "quanto")
    assert (data["sw_hooks"]["kept_parameters"], data["sw_hooks"]["super_weights"]) == (
        kept.parameters,
        1,
    )
