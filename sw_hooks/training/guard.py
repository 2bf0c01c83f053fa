"""Keep an optimizer from moving super weights while the rest of the model trains.

Two modes, both driven by the optimizer's own step hooks (so they work with gradient
accumulation, grad scalers and any training loop):

* ``"restore"`` (default): remember each guarded weight; after every ``optimizer.step()``
  write the remembered value back, bit for bit. Works with **every** optimizer: SGD,
  momentum, Adam/AdamW with weight decay, fused/foreach kernels. The optimizer's state for
  those elements still evolves; it is simply undone each step.
* ``"freeze"``: before every ``optimizer.step()`` zero the guarded elements of the gradient
  and of the optimizer's per-element state (momentum buffers, Adam moments), so the step
  computes a zero update for them. Exact for SGD (with or without momentum), Adam,
  AdamW, RMSprop, Adagrad **with ``weight_decay=0``** on the guarded parameters. Weight
  decay shrinks a weight without looking at its gradient, so ``freeze`` refuses a
  parameter group with ``weight_decay > 0``: use ``"restore"`` there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from sw_hooks.core.access import (
    Coordinate,
    CoordinateLike,
    WeightElement,
    _is_dtensor,
    _local_shard_target,
    coordinates_of,
)
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.masks import WeightMask, preserve

GUARD_MODES = ("restore", "freeze")


def zero_element(tensor: torch.Tensor, index: tuple[int, int]) -> None:
    """Set ``tensor[index]`` to zero in place; a ``DTensor`` shard that lacks it is left alone."""
    with torch.no_grad():
        if not _is_dtensor(tensor):
            tensor.data[index] = 0
            return
        target = _local_shard_target(tensor, index)
        if target is not None:
            local, local_index = target
            local[local_index] = 0


class WeightGuard:
    """Protects weight elements from an optimizer; see the module docstring for the modes.

    Making one only checks the weights; :meth:`attach` hooks the optimizers (and, in
    ``restore`` mode, remembers the values). ``__enter__`` adds nothing and leaving the
    ``with`` block detaches, so write ``with WeightGuard(...).attach(optimizer):``.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> model = planted_llama().model
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> w = ("model.layers.1.mlp.down_proj", 5, 17)
        >>> with WeightGuard(model, [w]).attach(optimizer):
        ...     model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        ...     optimizer.step()
        >>> float(model.model.layers[1].mlp.down_proj.weight[5, 17])
        8.0
    """

    def __init__(
        self,
        model: nn.Module,
        weights: Iterable[CoordinateLike] | CoordinateLike,
        mode: str = "restore",
    ) -> None:
        if mode not in GUARD_MODES:
            raise ValueError(f"guard mode must be one of {GUARD_MODES}, got {mode!r}")
        self.mode = mode
        self._model = model
        self._weights = coordinates_of(weights)
        self._elements = [WeightElement.resolve(model, w) for w in self._weights]
        self._saved: WeightMask | None = None
        self._hooks = HookSet()

    @property
    def coordinates(self) -> list[Coordinate]:
        """The guarded elements, each a :class:`Coordinate` (its expert included)."""
        return [e.coordinate for e in self._elements]

    def attach(self, *optimizers: Optimizer, freeze_before_step: bool = True) -> WeightGuard:
        """Check each optimizer, then hook its step; the weights' current values are kept.

        ``freeze_before_step=False`` leaves ``freeze`` mode's masking to the caller
        (:meth:`mask_gradients` after backward): needed when ``step(closure)`` computes the
        gradient inside the step, after any pre-step hook (Lightning, LBFGS).
        """
        for optimizer in optimizers:
            self.check(optimizer)
        remembering = self.mode == "restore" and self._saved is None
        if remembering:
            self._saved = preserve(self._model, self._weights).apply()
        try:
            self._hook_steps(optimizers, freeze_before_step)
        except BaseException:
            if remembering:  # hooks of an earlier attach stay, and so does its hold
                self._let_go()
            raise
        return self

    def _hook_steps(self, optimizers: tuple[Optimizer, ...], freeze_before_step: bool) -> None:
        with self._hooks.registering():
            for optimizer in optimizers:
                if self.mode == "restore":
                    self._hooks.add(optimizer.register_step_post_hook(lambda *_: self.write_back()))
                elif freeze_before_step:
                    self._hooks.add(
                        optimizer.register_step_pre_hook(lambda opt, *_: self.mask_gradients(opt))
                    )

    def check(self, optimizer: Optimizer) -> None:
        """Raise ``ValueError`` if ``freeze`` cannot hold against this optimizer."""
        if self.mode != "freeze":
            return
        guarded = {id(e.parameter): e.module_name for e in self._elements}
        for number, group in enumerate(optimizer.param_groups):
            decay = group.get("weight_decay", 0.0) or 0.0
            held = [guarded[id(p)] for p in group["params"] if id(p) in guarded]
            if held and decay > 0:
                raise ValueError(
                    f"guard mode 'freeze' masks the gradient, but weight_decay={decay} in "
                    f"parameter group {number} of {type(optimizer).__name__} would still move "
                    f"{held[0]}; use mode='restore', or put these weights in a group with "
                    "weight_decay=0"
                )

    def write_back(self) -> None:
        """Put the remembered values back now (``restore`` mode)."""
        if self._saved is not None:
            self._saved.write_back()

    def detach(self) -> None:
        """Remove the optimizer hooks (newest first); the weights are left as they are.

        ``restore`` mode also lets go of the values it remembered, so the model's weights
        are no longer held (masks applied later stack on a clean registry, the model can be
        freed) and attaching again remembers the values of that moment.
        """
        self._hooks.remove()
        self._let_go()

    def _let_go(self) -> None:
        if self._saved is not None:
            self._saved.forget()
            self._saved = None

    def __enter__(self) -> WeightGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def mask_gradients(self, optimizer: Optimizer) -> None:
        """Zero the guarded elements of the gradients and of ``optimizer``'s per-element state."""
        for element in self._elements:
            parameter = element.parameter  # a fused 3-D expert parameter too
            if parameter.grad is not None:
                zero_element(parameter.grad, element.storage_index)
            for state in _element_states(optimizer, parameter):
                zero_element(state, element.storage_index)


def _element_states(optimizer: Optimizer, parameter: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-element state tensors of ``parameter`` (moments, momentum buffers)."""
    state: dict[str, Any] = optimizer.state.get(parameter, {})
    return [
        value
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape
    ]


def guard(
    model: nn.Module,
    weights: Iterable[CoordinateLike] | CoordinateLike,
    *optimizers: Optimizer,
    mode: str = "restore",
) -> WeightGuard:
    """Guard ``weights`` against ``optimizers`` until :meth:`WeightGuard.detach` (or the ``with`` ends).

    Example:
        >>> with guard(model, super_weights, optimizer, mode="restore"):  # doctest: +SKIP
        ...     train(model, optimizer)
    """
    return WeightGuard(model, weights, mode).attach(*optimizers)
