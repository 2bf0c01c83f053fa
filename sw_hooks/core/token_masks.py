"""Which tokens are real, for hooks deep inside a forward call (padding left out)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from sw_hooks.core.hooks import HookSet


class TokenMasks:
    """Which tokens are real in the forward call in progress, for hooks deep inside it.

    A training wrapper (a ``LightningModule``'s ``training_step``, a module that takes the
    whole batch) passes ``attention_mask=`` to the model it holds, not to the module that
    was handed to :func:`record`. So every module on the way from that one down to the
    recorded modules, and able to take ``attention_mask=``, gets a pair of hooks: on entry
    its call pushes the 2-D mask it was given, or the one already in force if it was given
    none (decoder layers get a 4-D one), and on exit it pops it. The innermost mask wins, an
    inner call never clears an outer one, and nothing outlives the outermost call.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, torch.Tensor | None]] = []

    @property
    def current(self) -> torch.Tensor | None:
        """``[batch, seq]`` bool, true for real tokens; ``None`` when no mask is in force."""
        return self._stack[-1][1] if self._stack else None

    def attach(
        self,
        model: nn.Module,
        recorded: Iterable[nn.Module],
        hooks: HookSet,
    ) -> list[nn.Module]:
        """Hook the mask receivers of ``model`` on the way to ``recorded``, into ``hooks``;
        returns them."""
        # Eager under torch.compile, like the recorder's own bookkeeping.
        enter, leave = torch.compiler.disable(self.enter), torch.compiler.disable(self._leave)
        receivers = mask_receivers(model, recorded)
        for module in receivers:
            hooks.pre(module, enter, with_kwargs=True)
            hooks.forward(module, leave, with_kwargs=True, always_call=True)
        return receivers

    def clear(self) -> None:
        self._stack.clear()

    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Push the mask of ``module``'s call (the entry hook; or by hand, for a call already
        under way when the hooks were added)."""
        given = token_mask(args, kwargs)
        self._stack.append((id(module), given if given is not None else self.current))

    def _leave(self, module: nn.Module, args: Any, kwargs: Any, output: Any = None) -> None:
        # always_call runs this even when an earlier pre-hook failed and enter never did.
        if self._stack and self._stack[-1][0] == id(module):
            self._stack.pop()


def token_mask(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The call's ``attention_mask=`` as a ``[batch, seq]`` bool mask, if it is one.

    Only a 2-D mask shaped like the call's tokens counts: a decoder layer's 4-D mask is
    not one, nor is a cached generation step's mask, which also covers past tokens.
    """
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    tokens = _call_tokens(args, kwargs)
    if tokens is not None and tokens.dim() >= 2 and tuple(tokens.shape[:2]) != tuple(mask.shape):
        return None
    return mask.bool()


def _call_tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds", "hidden_states"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def mask_receivers(model: nn.Module, recorded: Iterable[nn.Module]) -> list[nn.Module]:
    """``model`` and the modules inside it that hold a recorded module and can be called
    with ``attention_mask=``: where a padding mask can enter on its way to the recorded ones.

    Only these are hooked, so the cost grows with the depth of the recorded modules, not
    with the size of the model.
    """
    targets = {id(module) for module in recorded}
    holds_target: dict[int, bool] = {}
    receivers: list[nn.Module] = []

    def visit(module: nn.Module) -> bool:
        if id(module) not in holds_target:
            # Every child is visited (no short cut): a target may hold further targets.
            below = [visit(child) or id(child) in targets for child in module.children()]
            holds_target[id(module)] = any(below)
            if (any(below) or module is model) and _takes_attention_mask(module):
                receivers.append(module)
        return holds_target[id(module)]

    visit(model)
    return receivers


def _takes_attention_mask(module: nn.Module) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: assume it may
        return True
    return any(p.name == "attention_mask" or p.kind is p.VAR_KEYWORD for p in parameters)
