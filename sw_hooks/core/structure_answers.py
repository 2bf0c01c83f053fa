"""What :func:`~sw_hooks.core.structure.find_output_projections` keeps and says of its answer.

* **The key of a kept answer.** The data flow of one forward is traced on one example in one
  dtype; another example (a longer input taking another branch, other tokens routed
  elsewhere) or another dtype (a cast that is a no-op in float32 is an operation in
  bfloat16) is another trace, so both are part of the key, beside the modules themselves.
* **Blocks missed.** Repeated blocks name their modules alike (``blocks.0.mlp.fc2``,
  ``blocks.1.mlp.fc2``). When the trace finds the projection in some blocks and not in
  their siblings, the answer is incomplete or the siblings differ; the warning names the
  missed ones, so a super weight in them is not silently never looked for.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Collection, Hashable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


class MissedBlocksWarning(UserWarning):
    """Structure location found an output projection in some repeated blocks, not all."""


def _tensor_key(tensor: torch.Tensor) -> Hashable:
    head = (tuple(tensor.shape), str(tensor.dtype), tensor.device.type)
    if tensor.device.type == "meta":
        return head
    flat = tensor.detach().reshape(-1).cpu().contiguous()
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    return (*head, hashlib.blake2b(raw.numpy().tobytes(), digest_size=12).hexdigest())


def example_key(example: Any) -> Hashable:
    """What the trace depends on in an example: its layout, and each tensor's shape, dtype
    and values (a digest); other leaves by their ``repr``. ``None`` (the default example,
    built from the config) is its own key."""
    if example is None:
        return ("default",)
    leaves, spec = tree_flatten(example)
    keys = tuple(_tensor_key(v) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)
    return (str(spec), keys)


def dtype_key(model: nn.Module) -> tuple[str, ...]:
    """The floating dtypes of the model's parameters and buffers, sorted."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple(sorted({str(t.dtype) for t in tensors if t.is_floating_point()}))


def _pattern(name: str) -> str:
    return _INDEX.sub("#", name)


def missed_siblings(
    model: nn.Module, found: Sequence[str], called: Collection[str]
) -> dict[str, list[str]]:
    """Per pattern of a found name with block indices (``blocks.#.d``), the linear-like
    modules of that pattern and weight shape that ran in the trace and were not found (an
    expert no token was routed to did not run: nothing is known of it)."""
    from sw_hooks.core.structure import is_linear_like

    patterns: dict[str, set[tuple[int, ...]]] = {}
    for name in found:
        if _pattern(name) != name:
            shape = tuple(model.get_submodule(name).weight.shape)
            patterns.setdefault(_pattern(name), set()).add(shape)
    missed: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        pattern = _pattern(name)
        if name in found or name not in called or pattern not in patterns:
            continue
        if not is_linear_like(module):
            continue
        if tuple(module.weight.shape) in patterns[pattern]:
            missed.setdefault(pattern, []).append(name)
    return missed


def warn_missed_blocks(model: nn.Module, found: Sequence[str], called: Collection[str]) -> None:
    """Warn, naming them, about blocks whose sibling projection was found and theirs not."""
    for pattern, names in missed_siblings(model, found, called).items():
        hits = [n for n in found if _pattern(n) == pattern]
        warnings.warn(
            f"{type(model).__name__}: found by structure in {len(hits)} of "
            f"{len(hits) + len(names)} blocks ({pattern}), missed in {', '.join(names)}: their "
            "data flow does not match an MLP output projection's; name them with "
            "find_down_projections(model, pattern=...) if they are",
            MissedBlocksWarning,
            stacklevel=3,
        )
