"""Comparing a model with a changed copy: through the API and through ``sw-hooks compare``.

The planted Llama's super weight (layer 1, [5, 17]) writes a super activation on channel 5;
a copy with that one weight zeroed must report it lost, an identical copy must report it
kept with nothing else changed.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sw_hooks.analysis.impact import perplexity
from sw_hooks.analysis.model_comparison import (
    COMPARE_SCHEMA_VERSION,
    DEFAULT_LOST_FRACTION,
    ModelComparison,
    compare_models,
)
from sw_hooks.analysis.report import collect_report
from sw_hooks.analysis.report_data import ReportOptions
from sw_hooks.core.results import SuperWeight, save_super_weights
from sw_hooks.outputs import plots
from sw_hooks.outputs.report import write_report
from sw_hooks.testing import byte_tokenizer, planted_llama, save_checkpoint, tiny_model

MODULE = "model.layers.1.mlp.down_proj"
PLANTED = SuperWeight(MODULE, 1, 5, 17, 8.0, verdict="super")
PROMPT_TOKENS = 8


def zeroed_copy(model: nn.Module) -> nn.Module:
    """The model with only the planted super weight set to 0."""
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        candidate.get_submodule(MODULE).weight[5, 17] = 0.0
    return candidate


def channel_5(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """The down-projection's output channel 5 over the prompt, read by a plain hook."""
    kept: list[torch.Tensor] = []
    handle = model.get_submodule(MODULE).register_forward_hook(
        lambda module, args, output: kept.append(output[0, :, 5].clone())
    )
    try:
        with torch.no_grad():
            model(prompt)
    finally:
        handle.remove()
    return kept[0]


@pytest.fixture(scope="module")
def planted():
    return planted_llama()


@pytest.fixture(scope="module")
def ids(planted) -> torch.Tensor:
    return planted.calibration_ids(128)


def test_zeroed_super_weight_is_reported_lost_with_the_exact_ratio(planted, ids) -> None:
    candidate = zeroed_copy(planted.model)
    comparison = compare_models(
        planted.model, candidate, ids, [PLANTED], prompt_tokens=PROMPT_TOKENS
    )
    before = channel_5(planted.model, ids[:, :PROMPT_TOKENS])
    after = channel_5(candidate, ids[:, :PROMPT_TOKENS])
    token = int(before.abs().argmax())
    (activation,) = comparison.super_activations
    assert (activation.token, activation.original, activation.candidate) == (
        token,
        float(before[token]),
        float(after[token]),
    )
    assert activation.ratio == float(after[token]) / float(before[token])
    assert abs(activation.ratio) < 1e-3
    assert comparison.lost() == (activation,) and activation.lost(DEFAULT_LOST_FRACTION)
    assert comparison.original_perplexity == perplexity(planted.model, ids)
    assert comparison.candidate_perplexity == perplexity(candidate, ids)
    assert comparison.candidate_perplexity > 2 * comparison.original_perplexity
    assert comparison.kl_divergence > 0.1 and comparison.top1_agreement < 1.0
    layer_1 = comparison.layers[1]
    assert (layer_1.original.output_channel, layer_1.original.input_channel) == (5, 17)
    assert layer_1.candidate.output_max < 1e-3 * layer_1.original.output_max


def test_identical_copy_keeps_everything(planted, ids) -> None:
    same = copy.deepcopy(planted.model)
    comparison = compare_models(planted.model, same, ids, [PLANTED], prompt_tokens=PROMPT_TOKENS)
    (activation,) = comparison.super_activations
    assert activation.ratio == 1.0 and activation.original > 100.0
    assert comparison.kl_divergence == 0.0
    assert comparison.top1_agreement == 1.0
    assert comparison.original_perplexity == comparison.candidate_perplexity
    assert comparison.lost(1.0) == ()
    assert all(pair.original == pair.candidate for pair in comparison.layers)


def test_comparison_json_is_versioned_and_reads_back(planted, ids) -> None:
    comparison = compare_models(
        planted.model, zeroed_copy(planted.model), ids[:, :32], [PLANTED], prompt_tokens=8
    )
    saved = json.loads(json.dumps(comparison.to_dict()))
    assert saved["schema_version"] == COMPARE_SCHEMA_VERSION == 1
    assert set(saved) == {
        "schema_version", "original", "candidate", "tokens", "prompt_tokens", "perplexity",
        "kl_divergence", "top1_agreement", "layers", "super_activations",
    }  # fmt: skip
    assert saved["super_activations"][0]["ratio"] == comparison.super_activations[0].ratio
    assert ModelComparison.from_dict(saved) == comparison
    with pytest.raises(ValueError, match="schema_version 1"):
        ModelComparison.from_dict({**saved, "schema_version": 7})
    with pytest.raises(ValueError, match=r"lacks \['layers'\]"):
        ModelComparison.from_dict({k: v for k, v in saved.items() if k != "layers"})


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: tiny_model("llama", vocab_size=300), "different vocabularies \\(256 and 300"),
        (lambda: tiny_model("llama", num_layers=3), "different layers \\(4 and 3"),
    ],
    ids=["vocabulary", "layers"],
)
def test_models_that_differ_are_refused_before_any_forward(planted, ids, other, message) -> None:
    forwards: list[int] = []
    handle = planted.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            compare_models(planted.model, other(), ids, [PLANTED])
    finally:
        handle.remove()
    assert forwards == []


def test_a_super_weight_outside_the_model_is_refused(planted, ids) -> None:
    outside = SuperWeight(MODULE, 1, 64, 17, 1.0)
    with pytest.raises(ValueError, match=r"\[64, 17\] lies outside .*a \[64, 128\] matrix"):
        compare_models(planted.model, planted.model, ids, [outside])


def test_report_with_a_candidate_draws_both_spike_profiles(planted, ids, tmp_path) -> None:
    options = ReportOptions(prompt_tokens=PROMPT_TOKENS, quantization=(), radius=4)
    data = collect_report(
        planted.model,
        None,
        ids,
        options=options,
        candidate=zeroed_copy(planted.model),
        candidate_name="zeroed",
    )
    ratios = {s["super_weight"]["row"]: s["ratio"] for s in data.comparison["super_activations"]}
    assert abs(ratios[5]) < 1e-3
    pairs = data.comparison["layers"]
    figure = plots.spike_profiles([p["original"] for p in pairs], [p["candidate"] for p in pairs])
    (mark,) = plots.marks(figure)
    assert (mark.label, mark.layer, mark.channel) == ("largest change", 1, 5)
    write_report(data, tmp_path)
    html = (tmp_path / "report.html").read_text()
    profile = base64.b64encode((tmp_path / "spike_profiles.png").read_bytes()).decode()
    assert f"data:image/png;base64,{profile}" in html
    assert "Against the candidate zeroed" in html
    assert "](spike_profiles.png)" in (tmp_path / "report.md").read_text()


# --------------------------------------------------------------------------- the command


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _save(model: nn.Module, folder: Path) -> Path:
    save_checkpoint(model, folder)
    return folder


@pytest.fixture(scope="module")
def saved(planted, tmp_path_factory) -> dict[str, Path]:
    """The planted model, its zeroed copy and an identical copy as checkpoints, and inputs."""
    root = tmp_path_factory.mktemp("compare")
    tokenizer = byte_tokenizer()
    trigger, target = tokenizer.convert_ids_to_tokens([1, 2])
    filler = "abcdefghijklmnopqrstuvwxyz"
    (root / "text.txt").write_text("".join(f"{trigger}{target}{c}" for c in filler * 3))
    save_super_weights([PLANTED], root / "super_weights.json")
    return {
        "root": root,
        "original": _save(planted.model, root / "original"),
        "zeroed": _save(zeroed_copy(planted.model), root / "zeroed"),
        "same": _save(copy.deepcopy(planted.model), root / "same"),
    }


def _compare(
    saved: dict[str, Path],
    candidate: str,
    *extra: str,
    original: str = "original",
    follow: str | None = "super_weights.json",
) -> subprocess.CompletedProcess:
    root = saved["root"]
    following = ["--super-weights", str(root / follow), "--candidates"] if follow else []
    command = [
        sys.executable, "-m", "sw_hooks.cli", "compare", str(saved[original]),
        str(saved[candidate]), *following,
        "--text", str(root / "text.txt"), "--max-tokens", "64", "--quiet", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def test_cli_fails_when_the_super_activation_is_lost(saved) -> None:
    out = saved["root"] / "zeroed.json"
    done = _compare(saved, "zeroed", "--fail-if-lost", "--json", str(out))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "sw-hooks compare: 1 super activation(s) below 0.5 of the original"
    )
    assert "LOST" in done.stdout
    result = json.loads(out.read_text())
    assert result["schema_version"] == 1 and result["tokens"] == 64
    (activation,) = result["super_activations"]
    assert activation["super_weight"]["row"] == 5 and abs(activation["ratio"]) < 1e-3


def test_cli_passes_an_identical_copy(saved) -> None:
    out = saved["root"] / "same.json"
    done = _compare(saved, "same", "--fail-if-lost", "0.9", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "sw-hooks compare" not in done.stderr
    result = json.loads(out.read_text())
    (activation,) = result["super_activations"]
    assert (activation["ratio"], result["kl_divergence"], result["top1_agreement"]) == (
        1.0,
        0.0,
        1.0,
    )
    assert "kept" in done.stdout


def test_cli_without_fail_if_lost_reports_but_exits_0(saved) -> None:
    done = _compare(saved, "zeroed")
    assert done.returncode == 0, done.stderr
    assert "LOST" in done.stdout


# --------------------------------------------------------------------------- no vacuous pass


def _reversed_byte_tokenizer():
    """:func:`byte_tokenizer` with its 256 ids in reverse order: same size, other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: len(alphabet) - 1 - i for i, c in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=alphabet[0], eos_token=alphabet[0]
    )


def _noise_copy(model: nn.Module, scale: float) -> nn.Module:
    """The model with every weight replaced by Gaussian noise of standard deviation ``scale``."""
    candidate = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in candidate.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return candidate


def _loud_head_copy(model: nn.Module) -> nn.Module:
    """The model with its LM head scaled by 1e4: every activation kept, perplexity inf."""
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        candidate.get_output_embeddings().weight.mul_(1e4)
    return candidate


@pytest.fixture(scope="module")
def unfollowed(planted, saved) -> dict[str, Path]:
    """A model with no super weight, a noise copy of it, and odd copies of the planted one."""
    root = saved["root"]
    plain = tiny_model("llama", num_layers=2)
    reversed_folder = root / "reversed"
    planted.model.save_pretrained(reversed_folder, safe_serialization=True)
    _reversed_byte_tokenizer().save_pretrained(reversed_folder)
    save_super_weights([], root / "nothing.json")
    return {
        **saved,
        "plain": _save(plain, root / "plain"),
        "noise": _save(_noise_copy(plain, 1.0), root / "noise"),
        "loud_head": _save(_loud_head_copy(planted.model), root / "loud_head"),
        "reversed": reversed_folder,
    }


def test_cli_fail_if_lost_refuses_when_detection_follows_nothing(unfollowed) -> None:
    """No super weight on ORIGINAL and a noise CANDIDATE: the guard must not pass vacuously."""
    done = _compare(unfollowed, "noise", "--fail-if-lost", original="plain", follow=None)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == (
        "sw-hooks compare: error: --fail-if-lost has nothing to follow: detection found no "
        "super weight on ORIGINAL; name the super weights to follow with --super-weights FILE, "
        "or leave out --fail-if-lost"
    )


def test_cli_fail_if_lost_refuses_an_empty_list_before_loading(unfollowed) -> None:
    done = _compare(unfollowed, "noise", "--fail-if-lost", original="plain", follow="nothing.json")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing.json lists no super weight" in lines[0]
    assert done.stdout == ""


def test_cli_fails_a_candidate_whose_perplexity_is_inf(unfollowed) -> None:
    """The followed super activation is kept (the head comes after it); the text is lost."""
    out = unfollowed["root"] / "loud_head.json"
    done = _compare(unfollowed, "loud_head", "--fail-if-lost", "--json", str(out))
    assert done.returncode == 1, (done.stdout, done.stderr)
    result = json.loads(out.read_text())
    (activation,) = result["super_activations"]
    assert activation["ratio"] == 1.0 and "kept" in done.stdout
    assert result["perplexity"]["candidate"] == float("inf")
    assert "the candidate's perplexity is inf" in done.stderr


def test_cli_refuses_a_candidate_with_a_reordered_vocabulary(unfollowed) -> None:
    done = _compare(unfollowed, "reversed", "--fail-if-lost")
    assert done.returncode == 2, (done.stdout, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "sw-hooks compare: error: CANDIDATE's tokenizer differs from ORIGINAL's: "
    )
    assert "is id 0 in ORIGINAL but is id 255 in CANDIDATE (256 and 256 tokens)" in line
