"""Where inputs and metrics go: the model's execution device, and the logits' device.

The CPU is the only real device here, so an accelerator is named by a hook (accelerate
only moves tensors there at forward time) and ``meta`` stands for "not the CPU" where a
tensor must live on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sw_hooks.analysis.impact import perplexity_metric
from sw_hooks.core.devices import execution_device
from sw_hooks.testing import tiny_model

CPU, META, CUDA0 = torch.device("cpu"), torch.device("meta"), torch.device("cuda", 0)


def test_a_model_in_memory_runs_where_its_parameters_are() -> None:
    assert execution_device(tiny_model("llama", num_layers=1)) == CPU


def test_a_disk_offloaded_model_runs_on_its_hooks_device(tmp_path: Path) -> None:
    from accelerate import disk_offload

    model = tiny_model("llama", num_layers=1)
    disk_offload(model, offload_dir=tmp_path, execution_device="cpu")
    assert next(model.parameters()).device == META
    assert model._hf_hook.execution_device is None  # the top hook only moves outputs back
    assert execution_device(model) == CPU


def test_an_offloaded_embedding_runs_where_its_hook_says() -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama", num_layers=1)
    add_hook_to_module(
        model.get_input_embeddings(), AlignDevicesHook(execution_device="cuda:0", offload=True)
    )
    assert next(model.parameters()).device == META
    assert execution_device(model) == CUDA0


def test_the_models_own_hook_comes_first_even_inside_a_sequential_hook(tmp_path: Path) -> None:
    from accelerate import disk_offload
    from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module

    model = tiny_model("llama", num_layers=1)
    disk_offload(model, offload_dir=tmp_path, execution_device="cpu")
    add_hook_to_module(model, AlignDevicesHook(execution_device=0), append=True)
    assert isinstance(model._hf_hook, SequentialHook)
    assert execution_device(model) == CUDA0


def test_a_meta_first_parameter_is_skipped() -> None:
    model = tiny_model("llama", num_layers=1)
    model.get_input_embeddings().to(META)
    assert next(model.parameters()).device == META
    assert execution_device(model) == CPU


def test_a_model_with_nothing_real_runs_on_the_cpu() -> None:
    assert execution_device(nn.Linear(4, 4, device=META)) == CPU
    assert execution_device(nn.ReLU()) == CPU


@pytest.mark.parametrize("device", [CPU, META])
def test_the_perplexity_metric_lives_on_the_logits_device(device: torch.device) -> None:
    metric = perplexity_metric(torch.empty(1, 3, 8, device=device))
    assert metric.device == device
    assert {metric.total_log_probs.device, metric.count.device} == {device}
