"""The embedded SmolLM2-135M exported to Q4_0 with its super-weight tensor kept at f16."""

import gguf
import numpy as np
import pytest
import torch

from sw_hooks.export.gguf import export_gguf
from sw_hooks.export.manifest import apply_manifest, write_manifest
from sw_hooks.models import default_model_path, load_model

pytestmark = pytest.mark.slow

SUPER = ("model.layers.11.mlp.down_proj", 507, 1229)


def _source_value() -> float:
    """The super weight as the source file stores it (Q4_1), dequantized by gguf."""
    reader = gguf.GGUFReader(default_model_path())
    tensor = next(t for t in reader.tensors if t.name == "blk.11.ffn_down.weight")
    return float(gguf.quants.dequantize(tensor.data, tensor.tensor_type)[SUPER[1], SUPER[2]])


def test_q4_0_with_the_super_weight_kept_at_f16_loads_with_it(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2.Q4_0.gguf"
    export = export_gguf(default_model_path(), out, quant_type="Q4_0", super_weights=[SUPER])
    assert export.kept == {"blk.11.ffn_down.weight": "F16"} and export.unfit == {}
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert sum(kind == "Q4_0" for kind in types.values()) == 210
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=out.name, dtype=torch.float32, local_files_only=True
    )
    weight = loaded.get_submodule(SUPER[0]).weight.detach()
    source = _source_value()
    assert source == pytest.approx(5.8757, abs=1e-4)
    assert float(weight[SUPER[1], SUPER[2]]) == float(np.float16(source))

    original, _ = load_model()
    manifest = write_manifest([SUPER], original, tmp_path / "sw.json")
    apply_manifest(loaded, manifest)
    assert float(weight[SUPER[1], SUPER[2]]) == source


def test_the_exported_file_has_the_perplexity_the_benchmark_measured(tmp_path):
    """The README's table comes from ``benchmarks/bench_gguf.py``: loading the exported file
    the way a user does (``load_model`` on the .gguf) gives the perplexity it recorded."""
    import json
    from pathlib import Path

    from sw_hooks.analysis.impact import perplexity
    from sw_hooks.models import calibration_text, tokenize

    recorded = json.loads(
        (Path(__file__).parents[2] / "benchmarks" / "results" / "gguf.json").read_text()
    )
    out = tmp_path / "smollm2.Q4_0.gguf"
    export_gguf(default_model_path(), out, quant_type="Q4_0", super_weights=[SUPER])
    model, tokenizer = load_model(out, cache=False)
    ids = tokenize(tokenizer, calibration_text(), max_tokens=recorded["tokens"])
    measured = perplexity(model, ids, window=512, stride=256)
    assert measured == pytest.approx(
        recorded["results"]["Q4_0"]["keep f16"]["perplexity"], rel=1e-5
    )
