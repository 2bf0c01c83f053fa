"""The importance matrix: sums of squared linear inputs, merged, checkpointed, written as GGUF."""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

from sw_hooks.export.imatrix import ImportanceMatrix, input_square_sums
from sw_hooks.testing import planted_llama

SUPER = "model.layers.1.mlp.down_proj"  # the planted super weight is [5, 17]: input channel 17
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def planted():
    return planted_llama()


def captured_inputs(model: nn.Module, name: str, *calls: dict) -> list[torch.Tensor]:
    """What ``name`` received in each call, captured by a plain pre-hook."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            for call in calls:
                model(**call)
    finally:
        handle.remove()
    return seen


def squares(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().square().sum(0, dtype=torch.float64)


def recorded(model: nn.Module, *calls: dict) -> ImportanceMatrix:
    with ImportanceMatrix(model) as imatrix, torch.no_grad():
        for call in calls:
            model(**call)
    return imatrix


def test_square_sums_leave_padding_out() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    sums, tokens = input_square_sums(x, torch.tensor([[True, True, False]]))
    assert (sums.tolist(), tokens) == ([10.0, 20.0], 2)
    assert sums.dtype == torch.float64


def test_every_linear_but_the_head_sums_its_inputs(planted) -> None:
    prompt = {"input_ids": planted.prompt()}
    imatrix = recorded(planted.model, prompt)
    assert len(imatrix.module_names) == 4 * LINEARS_PER_LAYER
    assert "lm_head" not in imatrix.module_names
    (seen,) = captured_inputs(planted.model, SUPER, prompt)
    assert torch.equal(imatrix.in_sum2[SUPER], squares(seen))
    assert int(imatrix.counts[SUPER]) == planted.prompt().numel() == 6
    assert int(imatrix.in_sum2[SUPER].argmax()) == 17  # the super weight's input channel


def test_hooks_are_gone_after_the_block(planted) -> None:
    imatrix = recorded(planted.model, {"input_ids": planted.prompt()})
    before = imatrix.state_dict()
    with torch.no_grad():
        planted.model(planted.prompt())
    assert all(torch.equal(before[k], v) for k, v in imatrix.state_dict().items())


def test_padded_tokens_are_left_out(planted) -> None:
    prompt = planted.prompt()
    short = prompt[:, :4]
    padded = torch.cat([prompt, torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    batch = recorded(planted.model, {"input_ids": padded, "attention_mask": mask})
    apart = recorded(planted.model, {"input_ids": prompt}, {"input_ids": short})
    assert int(batch.counts[SUPER]) == int(apart.counts[SUPER]) == 10
    # the same tokens, batched apart: equal up to float32 rounding in attention
    torch.testing.assert_close(batch.in_sum2[SUPER], apart.in_sum2[SUPER], rtol=1e-5, atol=0)
    unmasked = recorded(planted.model, {"input_ids": padded})
    assert int(unmasked.counts[SUPER]) == 12


def test_merging_two_recordings_equals_one_of_both(planted) -> None:
    first, second = planted.calibration_ids(32, seed=1), planted.calibration_ids(32, seed=2)
    both = recorded(planted.model, {"input_ids": first}, {"input_ids": second})
    merged = recorded(planted.model, {"input_ids": first})
    merged.merge(recorded(planted.model, {"input_ids": second}))
    for key, value in both.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    assert int(merged.counts[SUPER]) == 64


def test_state_dict_survives_a_checkpoint(planted, tmp_path) -> None:
    source = recorded(planted.model, {"input_ids": planted.prompt()})
    torch.save(source.state_dict(), tmp_path / "imatrix.pt")
    restored = recorded(planted.model)
    restored.load_state_dict(torch.load(tmp_path / "imatrix.pt"))
    assert torch.equal(restored.in_sum2[SUPER], source.in_sum2[SUPER])
    assert int(restored.counts[SUPER]) == 6


def test_states_of_other_modules_are_refused(planted) -> None:
    imatrix = recorded(planted.model)
    only_down = ImportanceMatrix(planted.model, "down_proj")
    only_down.remove()
    assert len(only_down.module_names) == 4
    with pytest.raises(ValueError, match="merge: the modules differ"):
        imatrix.merge(only_down)
    with pytest.raises(ValueError, match="not an ImportanceMatrix state_dict"):
        imatrix.load_state_dict({f"{SUPER}.counts": torch.tensor(1)})
    state = imatrix.state_dict()
    state[f"{SUPER}.in_sum2"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"\(3,\) channel sums, expected \(128,\)"):
        imatrix.load_state_dict(state)
    assert torch.equal(imatrix.in_sum2[SUPER], torch.zeros(128, dtype=torch.float64))


def test_gguf_file_reads_back_as_llama_imatrix_writes_it(planted, tmp_path) -> None:
    prompt = {"input_ids": planted.prompt()}
    imatrix = recorded(planted.model, prompt)
    (seen,) = captured_inputs(planted.model, SUPER, prompt)
    path = imatrix.write_gguf(tmp_path / "imatrix.gguf", datasets=["calibration.txt"])
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.datasets"] == ["calibration.txt"]
    # 6 tokens are 0 chunks of 512 to the nearest, as llama-imatrix counts them
    assert (fields["imatrix.chunk_count"], fields["imatrix.chunk_size"]) == (0, 512)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 4 * LINEARS_PER_LAYER
    assert "output.weight.in_sum2" not in tensors
    sums, counts = tensors["blk.1.ffn_down.weight.in_sum2"], tensors["blk.1.ffn_down.weight.counts"]
    assert (sums.tensor_type, sums.shape.tolist(), counts.shape.tolist()) == (
        gguf.GGMLQuantizationType.F32,
        [128, 1],
        [1, 1],
    )
    assert torch.equal(torch.from_numpy(sums.data.copy()), squares(seen).float()[None])
    assert counts.data.tolist() == [[6.0]]
    assert "blk.0.attn_q.weight.in_sum2" in tensors and "blk.3.ffn_gate.weight.counts" in tensors


def test_metadata_llama_quantize_requires_is_always_written(planted, tmp_path) -> None:
    """llama-quantize refuses an imatrix GGUF without all three keys; llama-imatrix writes no
    general.architecture and counts chunks to the nearest: 64 tokens of 48 are 1 chunk."""
    imatrix = recorded(planted.model, {"input_ids": planted.calibration_ids(64)})
    path = imatrix.write_gguf(tmp_path / "imatrix.gguf", chunk_size=48)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["imatrix.datasets"] == []
    assert (fields["imatrix.chunk_count"], fields["imatrix.chunk_size"]) == (1, 48)
    assert "general.architecture" not in fields
    assert fields["general.type"] == "imatrix"
    imatrix.write_gguf(path, chunk_size=42)  # 64 tokens: 1.52 chunks
    assert gguf.GGUFReader(path).fields["imatrix.chunk_count"].contents() == 2


def test_writing_refuses_what_llama_cpp_could_not_use(planted, tmp_path) -> None:
    empty = recorded(planted.model)
    with pytest.raises(ValueError, match="empty: run the model"):
        empty.write_gguf(tmp_path / "imatrix.gguf")
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        empty.write_gguf(tmp_path / "imatrix.gguf", chunk_size=0)
    wrapped = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs the architecture"):
        recorded(wrapped).write_gguf(tmp_path / "imatrix.gguf")
    assert not (tmp_path / "imatrix.gguf").exists()


def test_only_linears_are_taken(planted) -> None:
    with pytest.raises(ValueError, match="linears only; not linear: \\['model.norm'\\]"):
        ImportanceMatrix(planted.model, ["model.norm"])
    with pytest.raises(ValueError, match="no linear module chosen"):
        ImportanceMatrix(planted.model, "no_such_name")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_get_one_row_and_one_count_per_expert(arch, tmp_path) -> None:
    """Fused 3-D experts are entries with per-expert sums and counts, as llama-imatrix writes
    ffn_*_exps; the same weights as a list of expert MLPs (each linear hooked on its own
    routed inputs) give the same sums, and every (token, expert) pair is counted once."""
    from sw_hooks.testing import tiny_moe_model
    from sw_hooks.testing.moe import to_expert_list

    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    fused = recorded(tiny_moe_model(arch, num_layers=2), {"input_ids": ids})
    listed = recorded(to_expert_list(tiny_moe_model(arch, num_layers=2)), {"input_ids": ids})
    down = "model.layers.1.mlp.experts.down_proj"
    assert fused.in_sum2[down].shape == (8, 64) and fused.counts[down].shape == (8,)
    assert int(fused.counts[down].sum()) == ids.numel() * 2  # top-2 routing
    assert sorted(fused.module_names) == sorted(listed.module_names)
    for name in fused.module_names:
        assert torch.equal(fused.counts[name], listed.counts[name]), name
        torch.testing.assert_close(fused.in_sum2[name], listed.in_sum2[name], rtol=1e-6, atol=0)
    gate, up = (f"model.layers.1.mlp.experts.{leaf}" for leaf in ("gate_proj", "up_proj"))
    assert torch.equal(fused.in_sum2[gate], fused.in_sum2[up])  # both read the hidden states

    reader = gguf.GGUFReader(fused.write_gguf(tmp_path / "moe.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = (
        tensors["blk.1.ffn_down_exps.weight.in_sum2"],
        tensors["blk.1.ffn_down_exps.weight.counts"],
    )
    assert (sums.shape.tolist(), counts.shape.tolist()) == ([64, 8], [1, 8])
    assert counts.data.reshape(-1).tolist() == fused.counts[down].float().tolist()
    assert torch.equal(torch.from_numpy(sums.data.copy()), fused.in_sum2[down].float())
    assert {"blk.1.ffn_gate_exps.weight.counts", "blk.1.ffn_up_exps.weight.counts"} <= set(tensors)
    assert "blk.1.ffn_gate_inp.weight.in_sum2" in tensors  # the router, a plain linear


def test_expert_state_merges_and_checkpoints(tmp_path) -> None:
    from sw_hooks.testing import tiny_moe_model

    model = tiny_moe_model("mixtral", num_layers=1)
    first, second = (
        torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(seed))
        for seed in (1, 2)
    )
    both = recorded(model, {"input_ids": first}, {"input_ids": second})
    merged = recorded(model, {"input_ids": first})
    merged.merge(recorded(model, {"input_ids": second}))
    restored = recorded(model)
    torch.save(merged.state_dict(), tmp_path / "imatrix.pt")
    restored.load_state_dict(torch.load(tmp_path / "imatrix.pt"))
    down = "model.layers.0.mlp.experts.down_proj"
    for result in (merged, restored):
        assert torch.equal(result.counts[down], both.counts[down])
        torch.testing.assert_close(result.in_sum2[down], both.in_sum2[down], rtol=1e-12, atol=0)
    state = merged.state_dict()
    state[f"{down}.counts"] = torch.tensor(3)
    with pytest.raises(ValueError, match=r"\(\) counts, expected \(8,\)"):
        restored.load_state_dict(state)
