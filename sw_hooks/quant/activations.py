"""Per-token fake quantization of linear inputs, with the super activation held out.

The paper's activation recipe (arXiv 2411.07191, section 4): before a token is quantized,
the super activation's channel is replaced by the token's median (so it no longer sets the
token's scale), and after, its value is written back unchanged: REPLACE, Q, Q^-1, RESTORE.
:func:`quantize_activations` applies it to the inputs of a model's linear modules through
forward pre-hooks, removed on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from sw_hooks.core.access import CoordinateLike, oriented_shape
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import layer_index
from sw_hooks.quant.config import check_bits
from sw_hooks.quant.primitives import choose_qparams, fake_quantize
from sw_hooks.quant.targets import ModuleSelection, WeightTarget, held_elements, select_modules

__all__ = ["quantize_activation_tokens", "quantize_activations"]


def quantize_activation_tokens(
    x: torch.Tensor, bits: int = 8, *, holdout_channels: Sequence[int] = ()
) -> torch.Tensor:
    """Per-token symmetric fake quantization of ``x [..., channels]``, channels held out.

    Each held-out channel is first replaced by its token's median (so it no longer sets the
    token's scale), the token is quantized, and the held-out values are written back
    unchanged: the paper's REPLACE, Q, Q^-1, RESTORE.

    Example:
        >>> x = torch.tensor([[0.1, -0.2, 0.3, 50.0]])
        >>> quantize_activation_tokens(x, 8, holdout_channels=[3])[0, 3].item()
        50.0
    """
    bits = check_bits(bits)
    work = x.detach().float()
    channels = list(holdout_channels)
    if channels:
        median = work.median(dim=-1, keepdim=True).values
        work = work.clone()
        work[..., channels] = median.expand(*median.shape[:-1], len(channels))
    params = choose_qparams(work.reshape(-1, work.shape[-1]), bits, symmetric=True)
    result = fake_quantize(work.reshape(-1, work.shape[-1]), params).reshape(x.shape)
    if channels:
        result[..., channels] = x.detach().float()[..., channels]
    return result.to(x.dtype)


def _activation_holdout(
    model: nn.Module, chosen: dict[str, nn.Module], holdout: Iterable[CoordinateLike] | None
) -> dict[str, list[int]]:
    """Input channels to hold out, per module.

    A super weight ``(module, row, col)`` multiplies the input spike at channel ``col`` of its
    own module and writes the super activation into residual channel ``row``; the residual
    stream then carries it into the later layers. So ``col`` is held out at ``module``'s
    input, and ``row`` at the input of every module of hidden width in a later layer (an
    attention output projection of hidden width is included: widths cannot tell it apart).
    Inside a fused expert parameter the ``col`` spike is internal to the experts module,
    which has no linear input to hook, so only ``row`` is held out, in the later layers.
    """
    channels: dict[str, set[int]] = {}
    for element in held_elements(model, holdout):
        hidden = WeightTarget.of_element(element).shape[-2]
        source_layer = layer_index(element.module_name)
        if not element.is_fused_expert:
            channels.setdefault(element.module_name, set()).add(element.col)
        for other, module in chosen.items():
            if oriented_shape(module)[1] == hidden and (
                source_layer is None or (layer_index(other) or -1) > source_layer
            ):
                channels.setdefault(other, set()).add(element.row)
    return {name: sorted(found) for name, found in channels.items() if name in chosen}


@contextmanager
def quantize_activations(
    model: nn.Module,
    bits: int = 8,
    *,
    modules: ModuleSelection = None,
    holdout: Iterable[CoordinateLike] | None = None,
) -> Iterator[dict[str, list[int]]]:
    """Fake-quantize the inputs of the chosen linear modules per token (W8A8 style).

    With ``holdout`` (super weights), the super activation's channels are replaced by the
    median before quantizing and restored after; see :func:`_activation_holdout` for which
    channels. Hooks are removed on exit, even after an exception.

    Yields:
        ``{module: held-out input channels}``.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> with quantize_activations(model, 8):
        ...     logits = model(torch.tensor([[1, 2, 3]])).logits
    """
    bits = check_bits(bits)
    chosen = select_modules(model, modules)
    held = _activation_holdout(model, chosen, holdout)

    def hook_for(name: str) -> Callable[[nn.Module, tuple], tuple]:
        channels = held.get(name, [])

        def quantize_input(module: nn.Module, args: tuple) -> tuple:
            return (quantize_activation_tokens(args[0], bits, holdout_channels=channels), *args[1:])

        return quantize_input

    with HookSet() as hooks:
        for name, module in chosen.items():
            hooks.pre(module, hook_for(name))
        yield held
