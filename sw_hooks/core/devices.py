"""Where a model computes, which is not always where its parameters say they are.

A model dispatched by accelerate (``disk_offload``, ``cpu_offload``, ``dispatch_model``,
``from_pretrained(device_map=...)``) keeps offloaded weights as ``meta`` placeholders and
moves them in only for each forward pass, so ``next(model.parameters()).device`` may be
``meta``: inputs sent there can never be read back. The device the model runs on is the
one its accelerate hooks name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

META = torch.device("meta")


def _hooks(module: nn.Module) -> Iterator[object]:
    """The accelerate hooks on ``module``: its ``_hf_hook``, or each hook of a ``SequentialHook``."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        yield from getattr(hook, "hooks", None) or (hook,)


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The execution device named by the first accelerate hook on ``module`` that names one."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            # accelerate accepts an accelerator index (0) as well as a device or its name.
            return torch.device(device) if not isinstance(device, int) else _indexed(device)
    return None


def _indexed(index: int) -> torch.device:
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type if accelerator is not None else "cuda", index)


def _input_embedding_device(model: nn.Module) -> torch.device | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_embeddings):
        return None
    try:
        embedding = get_embeddings()
    except NotImplementedError:
        return None
    if not isinstance(embedding, nn.Module):
        return None
    device = hook_execution_device(embedding)
    if device is not None:
        return device
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device != META:
        return weight.device
    return None


def _first_real_parameter_device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters() if p.device != META), None)


def execution_device(model: nn.Module) -> torch.device:
    """The device to send a model's inputs to.

    In order: the execution device of an accelerate hook on the model itself; that of the
    input embedding's hook, else the embedding weight's device unless it is ``meta``; the
    device of the first parameter that is not ``meta``; the CPU.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> execution_device(tiny_model("llama", num_layers=1))
        device(type='cpu')
    """
    return (
        hook_execution_device(model)
        or _input_embedding_device(model)
        or _first_real_parameter_device(model)
        or torch.device("cpu")
    )


def forward_on_device(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
    """One forward pass, with the inputs sent where the model runs."""
    device = execution_device(model)
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            model(**{key: _sent(value, device) for key, value in inputs.items()})
        else:
            model(inputs.to(device))


def _sent(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def ids_of(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The token ids of model inputs given as a tensor or a dict."""
    return inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
