"""Bad input everywhere it enters: one clear error naming the problem, no weight changed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sw_hooks.analysis.detect import DetectionOptions, detect, spike_candidates
from sw_hooks.cli import main
from sw_hooks.core.masks import ablate, scale
from sw_hooks.core.record import record
from sw_hooks.core.results import DetectionResult, SuperWeight, load_super_weights
from sw_hooks.models import ModelNotFoundError, check_gguf, load_model, tokenize
from sw_hooks.testing import planted_llama, tiny_model

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SUPER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return planted_llama().model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@FAST
@given(data=JSON)
def test_malformed_reports_raise_value_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("report") / "report.json"
    path.write_text(json.dumps({"schema_version": 1, "super_weights": [data]}))
    try:
        weights = load_super_weights(path, candidates=True)
    except ValueError as error:
        assert str(error)
    else:  # only a complete, well-typed object is accepted
        assert isinstance(data, dict) and {"module", "row", "col", "value"} <= set(data)
        assert weights[0].row >= 0 and weights[0].col >= 0
    with pytest.raises(ValueError):
        DetectionResult.from_dict(
            data if not isinstance(data, dict) else {**data, "schema_version": 0}
        )


@settings(max_examples=20, deadline=None)
@given(text=st.binary(max_size=64))
def test_non_json_and_foreign_files_name_the_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("bytes") / "weights.json"
    path.write_bytes(text)
    with pytest.raises(ValueError, match="weights.json"):
        load_super_weights(path)


@FAST
@given(
    row=st.integers(min_value=-(2**40), max_value=2**40),
    col=st.integers(min_value=-(2**40), max_value=2**40),
)
def test_out_of_range_coordinates_change_nothing(model, row, col):
    snapshot = _snapshot(model)
    coordinates = [(SUPER, 5, 17), (SUPER, row, col)]
    if 0 <= row < 64 and 0 <= col < 128:
        with ablate(model, coordinates):
            pass
    else:
        with pytest.raises(ValueError, match=r"outside|shape"):
            ablate(model, coordinates)
    assert _unchanged(model, snapshot)


@pytest.mark.parametrize("name", ["nope", "model.layers.9.mlp.down_proj", "model.norm"])
def test_unknown_modules_change_nothing(model, name):
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="no module|no 2-D weight"):
        ablate(model, [(SUPER, 5, 17), (name, 0, 0)])
    assert _unchanged(model, snapshot)


@FAST
@given(value=st.floats(max_value=0.999) | st.just(math.nan) | st.just(-math.inf))
def test_bad_thresholds_are_refused(value):
    for name in ("spike_factor", "min_impact"):
        with pytest.raises(ValueError, match=name):
            DetectionOptions(**{name: value})


@pytest.mark.parametrize("factor", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_is_refused(model, factor):
    with pytest.raises(ValueError, match="finite"):
        scale(model, [(SUPER, 5, 17)], factor)


@settings(max_examples=20, deadline=None)
@given(text=st.text(alphabet=" \t\n\r\x0b\x0c", max_size=10))
def test_empty_or_whitespace_text_is_refused(text):
    with pytest.raises(ValueError, match="empty"):
        tokenize(lambda t, **_: {"input_ids": [1]}, text)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_activations_are_recorded_and_refused_by_detection(bad):
    planted = planted_llama()
    down = planted.model.get_submodule(SUPER)

    def poison(module, args, output):
        output = output.clone()
        output[0, 1, 7] = bad
        return output

    handle = down.register_forward_hook(poison)
    snapshot = _snapshot(planted.model)
    try:
        with record(planted.model, [SUPER]) as rec, torch.no_grad():
            planted.model(planted.prompt())
            planted.model(planted.prompt()[:, :2])  # a later finite call must not hide it
        maxima = rec.stats[SUPER].output
        assert math.isnan(float(maxima.abs_max[7])) == math.isnan(bad)
        assert int(maxima.token[7]) == 1
        with pytest.raises(ValueError, match=rf"output of {SUPER}, channel 7, token 1"):
            spike_candidates(planted.model, rec.stats)
        with pytest.raises(ValueError, match="non-finite activation"):
            detect(planted.model, planted.prompt(), verify_impact=False)
    finally:
        handle.remove()
    assert _unchanged(planted.model, snapshot)


def test_model_without_down_projection_is_named():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="no MLP down-projection.*Sequential"):
        record(net)
    with pytest.raises(ValueError, match="no MLP down-projection"):
        detect(net, torch.tensor([[1, 2]]))


@settings(max_examples=6, deadline=None)
@given(size=st.integers(min_value=0, max_value=4096))
def test_truncated_gguf_is_a_clear_error(tmp_path_factory, size):
    from sw_hooks.models import default_model_path

    try:
        source = default_model_path()
    except ModelNotFoundError:
        source = None
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "model.gguf"
    head = source.open("rb").read(size) if source is not None else b"GGUF" + bytes(size)
    path.write_bytes(head)
    with pytest.raises(ValueError, match="model.gguf"):
        load_model(path)


def test_not_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf(path)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(path)
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="empty"):
        load_model("   ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["detect", "--min-impact", "nan"], "min_impact"),
        (["detect", "--spike-factor", "-3"], "spike_factor"),
        (["detect", "{bad}.gguf"], "no such GGUF file"),
        (["quantize", "--bits", "1"], "bits must be an integer from 2 to 8"),
        (["quantize", "--holdout", "down_proj"], "--holdout takes MODULE:ROW:COL"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    out = tmp_path / "result.json"  # a good output path: the bad input must stop the run first
    assert main([*argv, "--json", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["detect", "quantize"])
def test_cli_refuses_an_output_folder_that_does_not_exist(command, capsys, tmp_path):
    out = tmp_path / "no" / "such" / "folder" / "out.json"
    assert main([command, "--json", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"folder {out.parent} does not exist" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no folder made on the way


def _save_pickle_checkpoint(folder: Path) -> None:
    """A tiny Llama as ``save_pretrained(safe_serialization=False)`` wrote it (transformers < 5)."""
    model = tiny_model("llama", num_layers=1)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_pickle_only_checkpoint_is_refused_by_name(tmp_path):
    _save_pickle_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="holds no weights"):
        load_model(tmp_path)


def test_hub_ids_load_safetensors_only(monkeypatch):
    import transformers

    calls: list[dict] = []

    def from_pretrained(source, **kwargs):
        calls.append({"source": source, **kwargs})
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    load_model("HuggingFaceTB/SmolLM2-135M")
    tokenizer_call, model_call = calls
    assert model_call["source"] == "HuggingFaceTB/SmolLM2-135M"
    assert model_call["use_safetensors"] is True
    assert "use_safetensors" not in tokenizer_call
    with pytest.raises(ValueError, match="safetensors only"):
        load_model("HuggingFaceTB/SmolLM2-135M", use_safetensors=False)
    assert len(calls) == 2


def test_cli_rejects_whitespace_text_file(tmp_path, capsys):
    text = tmp_path / "blank.txt"
    text.write_text("  \n\t ")
    assert main(["detect", "--text", str(text), "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err


def test_super_weight_rejects_negative_coordinates():
    with pytest.raises(ValueError, match="non-negative"):
        SuperWeight(SUPER, 1, -1, 0, 1.0)
