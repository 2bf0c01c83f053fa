"""Device, dtype and device map: what ``auto`` picks, checkpoints loading in their own dtype,
bad choices refused before anything is read, accelerate's big-model inference through
``load_model``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sw_hooks.analysis.detect import run_detection
from sw_hooks.core.masks import ablate
from sw_hooks.models import load_model
from sw_hooks.placement import (
    auto_device,
    checkpoint_dtype,
    placement,
    resolve_device,
    resolve_dtype,
)
from sw_hooks.testing import planted_llama, save_checkpoint

SUPER = ("model.layers.1.mlp.down_proj", 5, 17)


def _no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_is_the_cpu_on_a_machine_without_an_accelerator(monkeypatch):
    _no_accelerator(monkeypatch)
    assert auto_device() == torch.device("cpu")
    assert placement("auto").device == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    _no_accelerator(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert auto_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_device() == torch.device("cuda")


def test_default_device_is_the_cpu_and_dtype_names_resolve():
    assert placement().device == torch.device("cpu")
    assert resolve_dtype("auto") is None
    assert [resolve_dtype(n) for n in ("float32", "BFloat16", torch.float16)] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ]


@pytest.mark.parametrize(
    "choices, message",
    [
        (dict(device="tpu"), "device must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'"),
        (dict(device="cuda:x"), "device must be one of"),
        (dict(dtype="int8"), "dtype must be one of auto, float32, bfloat16, float16"),
        (dict(dtype=torch.int8), "dtype must be one of"),
        (dict(device_map="everywhere"), "device map must be one of auto"),
        (dict(offload_folder="/tmp"), "an offload folder is used with a device map"),
        (dict(device="cpu", device_map="auto"), "give a device (cpu) or a device map (auto)"),
    ],
)
def test_bad_choices_are_refused_before_the_model_is_looked_at(choices, message):
    # The model does not exist: had it been looked at first, the error would say so.
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model("/nonexistent/never-read.gguf", **choices)


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    _no_accelerator(monkeypatch)
    with pytest.raises(ValueError, match="this machine has no CUDA device"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="no MPS"):
        resolve_device("mps")


def test_an_offload_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        placement(device_map="auto", offload_folder=tmp_path / "file")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = planted_llama(dtype=torch.bfloat16).model
    return save_checkpoint(model, tmp_path_factory.mktemp("bf16"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_a_checkpoint_loads_in_its_own_dtype(dtype, tmp_path):
    folder = save_checkpoint(planted_llama(dtype=dtype).model, tmp_path)
    assert checkpoint_dtype(folder) == dtype
    model, _ = load_model(folder)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_a_config_without_dtype_falls_back_to_the_stored_tensors(bf16_checkpoint, tmp_path):
    for file in bf16_checkpoint.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(tmp_path) == torch.bfloat16
    assert load_model(tmp_path)[0].dtype == torch.bfloat16


def test_a_dtype_asked_for_is_the_dtype_loaded(bf16_checkpoint):
    model, _ = load_model(bf16_checkpoint, dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_writing_a_weight_of_a_loaded_checkpoint_never_writes_the_file(bf16_checkpoint):
    """A checkpoint in its own dtype may share pages with the file it was read from: an
    ablation must change the model only."""
    before = {p.name: p.read_bytes() for p in bf16_checkpoint.iterdir()}
    model, _ = load_model(bf16_checkpoint)
    weight = model.get_submodule(SUPER[0]).weight
    with ablate(model, [SUPER]):
        assert float(weight.detach()[SUPER[1], SUPER[2]]) == 0.0
        weight.detach()[0].fill_(3.0)  # beyond the mask: a whole row written
    assert {p.name: p.read_bytes() for p in bf16_checkpoint.iterdir()} == before


def test_detection_on_a_bf16_checkpoint_runs_in_bf16_and_finds_the_planted_weight(
    bf16_checkpoint,
):
    planted = planted_llama(dtype=torch.bfloat16)
    model, _ = load_model(bf16_checkpoint)
    assert model.dtype == torch.bfloat16
    result = run_detection(model, planted.prompt(), calibration=planted.calibration_ids())
    assert [w.coordinate for w in result.verified] == [SUPER]


def test_device_map_auto_offloads_to_disk_and_detection_still_finds_the_weight(
    bf16_checkpoint, tmp_path
):
    """accelerate's big-model inference through ``load_model``: with too little memory
    allowed, layers go to the offload folder, and detection gives the in-memory answer."""
    planted = planted_llama(dtype=torch.bfloat16)
    model, _ = load_model(
        bf16_checkpoint,
        device_map="auto",
        offload_folder=tmp_path / "offload",
        max_memory={"cpu": 60_000},
    )
    placed = set(model.hf_device_map.values())
    assert "disk" in placed, model.hf_device_map
    # Offloaded safetensors weights are read from the checkpoint itself: meta placeholders.
    assert any(p.device == torch.device("meta") for p in model.parameters())
    result = run_detection(model, planted.prompt(), calibration=planted.calibration_ids())
    assert [w.coordinate for w in result.verified] == [SUPER]


# The byte tokenizer's ids 1, 2 and 3 are the characters '"', '#' and '$': planted_llama's
# trigger, its target, and the decoy's trigger.
TRIGGERS = '"$'


def _planted_text(length: int = 256) -> str:
    """Letters, with the super weight's trigger followed by its target and the decoy's trigger
    in turn (as ``PlantedModel.calibration_ids``)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = ['"#', "$" + letters[0]]
    return "".join(pairs[i % 2] + letters[(7 * i) % 26] * 2 for i in range(length // 4))


def _cli(*argv: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "sw-hooks"), *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_cli_detect_with_a_device_map_and_an_offload_folder(bf16_checkpoint, tmp_path):
    """The user's path: ``sw-hooks detect --device-map auto --offload-folder DIR`` on a bf16
    checkpoint loads it through accelerate in bf16 and finds the planted weight."""
    out, text = tmp_path / "result.json", tmp_path / "text.txt"
    text.write_text(_planted_text())
    done = _cli(
        "detect", str(bf16_checkpoint), "--device-map", "auto", "--offload-folder",
        str(tmp_path / "offload"), "--text", str(text), "--max-tokens", "256",
        "--prompt", TRIGGERS, "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "bfloat16 on cpu" in done.stderr
    verified = [w for w in json.loads(out.read_text())["candidates"] if w["verdict"] == "super"]
    assert [(w["module"], w["row"], w["col"]) for w in verified] == [SUPER]


def test_a_bf16_model_is_scored_in_float32():
    """The model stays bf16; its logits are upcast where the loss is computed (a bf16
    log-softmax over the vocabulary would be off by about 1e-3)."""
    import torch.nn.functional as F

    from sw_hooks.analysis.impact import perplexity
    from sw_hooks.analysis.losses import Perplexity

    planted = planted_llama(dtype=torch.bfloat16)
    ids = planted.calibration_ids(128)
    with torch.no_grad():
        logits = planted.model(ids).logits[:, :-1]
        reference = F.cross_entropy(logits.float().reshape(-1, 256), ids[:, 1:].reshape(-1))
        in_bf16 = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss = Perplexity()(planted.model, ids)
    assert abs(float(in_bf16) - float(reference)) > 1e-4  # the test can tell them apart
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    assert perplexity(planted.model, ids) == pytest.approx(float(reference.exp()), rel=1e-5)
