"""Find the down-projections on the model's first forward call, from the caller's own input.

A hand-written ``nn.Module`` has no module names a table knows and no Hugging Face config
to build an example input from, so its down-projections can only be found by structure
(:mod:`sw_hooks.core.structure`), and the structural trace needs an input. The recorder
does not ask for one: it waits for the call the user makes anyway. A pre-hook on every
module that holds a linear-like module sees that call first, traces the called module on
the very same arguments (one extra forward, in eval mode, without gradients), and hands the
projections it finds to the recorder, which hooks them before the real forward goes on:
that first call is recorded too.

The first hook to fire is on the outermost module called: the model itself for
``model(x)``, or the wrapped network when a ``LightningModule``'s ``training_step`` calls
``self.net(x)``. A traced module's hooks come off (a nested module is never traced apart),
and so does every hook once the model itself has been traced. A module whose trace finds no
projection (an embedding called on its own) leaves the other modules waiting; the model
itself finding none is an error, raised from that first call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sw_hooks.core.hooks import HookSet, Removable
from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.structure import CallArguments, is_linear_like

Found = Callable[[dict[str, nn.Module], nn.Module, tuple[Any, ...], dict[str, Any]], None]
"""Called with the newly found ``{name: module}``, the module being called and its call's
arguments, while that call is under way."""


class FirstCallLocator:
    """Pre-hooks that locate ``model``'s MLP down-projections by structure on its first call.

    ``on_found`` receives each batch of newly found projections (names relative to
    ``model``); :attr:`found` holds all of them. :meth:`remove` takes every hook off.
    """

    def __init__(self, model: nn.Module, on_found: Found) -> None:
        self._model, self._on_found = model, on_found
        self.found: dict[str, nn.Module] = {}
        self._hooks = HookSet()
        self._waiting: dict[int, Removable] = {}
        self._tracing = False
        with self._hooks.registering():
            for name, module in _holders(model):
                hook = torch.compiler.disable(self._hook(name))
                self._waiting[id(module)] = self._hooks.pre(module, hook, with_kwargs=True)

    @property
    def waiting(self) -> bool:
        """Whether some module is still waiting for its first call."""
        return bool(self._waiting)

    def remove(self) -> None:
        """Take every hook off. Safe to call twice."""
        self._hooks.remove()
        self._waiting.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def locate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._tracing:  # the trace calls the module again: let that call through
                self._locate(name, module, args, kwargs)

        return locate

    def _locate(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._stop_waiting(module)
        try:
            with self._traced():
                found = find_down_projections(module, example_input=CallArguments(args, kwargs))
        except ValueError:
            if module is self._model and not self.found:
                self.remove()
                raise
            return  # a part of the model without projections: the rest keeps waiting
        prefix = f"{name}." if name else ""
        new = {prefix + n: m for n, m in found.items() if prefix + n not in self.found}
        self.found |= new
        if new:
            self._on_found(new, module, args, kwargs)

    @contextmanager
    def _traced(self) -> Iterator[None]:
        self._tracing = True
        try:
            yield
        finally:
            self._tracing = False

    def _stop_waiting(self, module: nn.Module) -> None:
        """The module and everything inside it are traced with it, never on their own."""
        for inner in module.modules():
            handle = self._waiting.pop(id(inner), None)
            if handle is not None:
                handle.remove()
        if module is self._model:
            self.remove()


def _holders(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model and every module inside it that holds a linear-like module below it."""
    for name, module in model.named_modules():
        if module is model or any(
            is_linear_like(inner) for inner in module.modules() if inner is not module
        ):
            yield name, module
