"""Fused experts that report their down-projection while they compute it.

transformers 5 picks a fused experts module's kernel at run time through its registry
of experts implementations (``ALL_EXPERTS_FUNCTIONS``: ``grouped_mm`` by default,
``batched_mm``, hub kernels) or the class's own ``eager`` loop. The two registry kernels
written in plain torch are done again here with transformers' own grouped and batched
linear helpers and the same operations in the same order, so that the model's output is
bit for bit what the kernel gives; the one addition is that the down-projection's input
and output are handed to an observer, with the expert and the token of every row. Recording then costs
a read of tensors the model computes anyway instead of a second expert pass.

:func:`observed_kernel` says whether a module's current kernel is one of these; for any
other (``eager``, hub kernels, expert parallelism, a kernel registered under a known name
by someone else) it returns ``None`` and the recorder recomputes instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn


class DownProjectionObserver(Protocol):
    """Receives one experts call's down-projection, one row per (token, expert) pair.

    ``inner`` ``[S, intermediate]`` and ``out`` ``[S, hidden]`` are the down-projection's
    input and output (bias included, before any post-expert norm); ``expert`` and
    ``token`` ``[S]`` name each row's expert and its flat token index.
    """

    def __call__(
        self, inner: torch.Tensor, out: torch.Tensor, expert: torch.Tensor, token: torch.Tensor
    ) -> None: ...


ObservedKernel = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, DownProjectionObserver], torch.Tensor
]


def _activated(experts: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    return experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)


def _up_parameters(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if experts.has_gate:
        return experts.gate_up_proj, experts.gate_up_proj_bias if experts.has_bias else None
    return experts.up_proj, experts.up_proj_bias if experts.has_bias else None


def _down_bias(experts: nn.Module) -> torch.Tensor | None:
    return experts.down_proj_bias if experts.has_bias else None


def _rows_of(bias: torch.Tensor | None, experts_of_rows: torch.Tensor) -> torch.Tensor | None:
    """Each row's expert's bias (``None`` without biases)."""
    return None if bias is None else bias[experts_of_rows]


def _after_down(experts: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return experts.post_expert_norm(out) if experts.has_post_expert_norm else out


def _per_token_sum(rows: torch.Tensor, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows in (token, slot) order summed over each token's ``top_k`` slots."""
    return rows.view(hidden.size(0), top_k, hidden.size(-1)).sum(dim=1).to(hidden.dtype)


def _expert_counts(sorted_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    # histc counts floats on CPU and MPS and integers elsewhere.
    on_host = sorted_experts.device.type in ("cpu", "mps")
    values = sorted_experts.float() if on_host else sorted_experts.int()
    return torch.histc(values, bins=num_experts, min=0, max=num_experts - 1)


def observed_grouped_mm(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    observe: DownProjectionObserver,
) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts kernel (no expert parallelism), observed.

    Every (token, slot) pair is one row; rows are sorted by expert so that each expert's
    rows are contiguous for the grouped linear helper, then put back in (token, slot)
    order and summed per token. Same helpers, same operations in the same order as the
    kernel, so the result is the kernel's bit for bit.
    """
    from transformers.integrations.moe import _grouped_linear

    top_k = top_k_index.size(-1)
    sorted_experts, order = torch.sort(top_k_index.reshape(-1))
    tokens = order // top_k
    group_ends = torch.cumsum(
        _expert_counts(sorted_experts, experts.num_experts), dim=0, dtype=torch.int32
    )
    transposed = experts.is_transposed
    up_weight, up_bias = _up_parameters(experts)
    up = _grouped_linear(
        hidden[tokens],
        up_weight,
        group_ends,
        bias=_rows_of(up_bias, sorted_experts),
        is_transposed=transposed,
    )
    inner = _activated(experts, up)
    bias = _rows_of(_down_bias(experts), sorted_experts)
    out = _grouped_linear(inner, experts.down_proj, group_ends, bias=bias, is_transposed=transposed)
    observe(inner, out, sorted_experts, tokens)
    weighted = _after_down(experts, out) * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.size(0), device=order.device)
    return _per_token_sum(weighted[back], hidden, top_k)


def observed_batched_mm(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    observe: DownProjectionObserver,
) -> torch.Tensor:
    """transformers' ``batched_mm`` experts kernel (no expert parallelism), observed.

    Every (token, slot) pair is one row, multiplied by its own expert's weights; the same
    helpers and operations as the kernel, so the result is the kernel's bit for bit.
    """
    from transformers.integrations.moe import _batched_linear

    top_k = top_k_index.size(-1)
    row_experts = top_k_index.reshape(-1)
    transposed = experts.is_transposed
    up_weight, up_bias = _up_parameters(experts)
    up = _batched_linear(
        hidden.repeat_interleave(top_k, dim=0),
        up_weight[row_experts],
        bias=_rows_of(up_bias, row_experts),
        is_transposed=transposed,
    )
    inner = _activated(experts, up)
    out = _batched_linear(
        inner,
        experts.down_proj[row_experts],
        bias=_rows_of(_down_bias(experts), row_experts),
        is_transposed=transposed,
    )
    tokens = torch.arange(row_experts.numel(), device=row_experts.device) // top_k
    observe(inner, out, row_experts, tokens)
    weighted = _after_down(experts, out) * top_k_weights.reshape(-1).unsqueeze(-1)
    return _per_token_sum(weighted, hidden, top_k)


def _mirrored_kernels() -> dict[Callable, ObservedKernel]:
    try:
        from transformers.integrations import moe
    except ImportError:
        return {}
    return {
        moe.grouped_mm_experts_forward: observed_grouped_mm,
        moe.batched_mm_experts_forward: observed_batched_mm,
    }


_MIRRORS: dict[Callable, ObservedKernel] | None = None
_KERNEL_FLAGS = ("has_gate", "has_bias", "has_post_expert_norm", "is_transposed")


def observed_kernel(experts: nn.Module) -> ObservedKernel | None:
    """The observed twin of the kernel ``experts`` runs now, or ``None`` if there is none.

    Looked up at each call: ``set_experts_implementation`` may switch kernels between
    forwards. The registry's entry itself is compared, so a kernel registered by someone
    else under ``"grouped_mm"`` is not mistaken for transformers' own.
    """
    global _MIRRORS
    if _MIRRORS is None:
        _MIRRORS = _mirrored_kernels()
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if (
        not _MIRRORS
        or implementation is None
        or getattr(experts, "_is_expert_parallel", True) is not False
    ):
        return None
    if not all(isinstance(getattr(experts, flag, None), bool) for flag in _KERNEL_FLAGS):
        return None
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    registered = ALL_EXPERTS_FUNCTIONS.get(implementation)
    return _MIRRORS.get(registered) if registered is not None else None
