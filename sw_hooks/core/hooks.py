"""One hook-lifetime helper for every owner of hooks.

Every hook an owner registers goes into its :class:`HookSet`, which removes them together,
newest first (the order PyTorch ran them in is the reverse of how they are undone), and
at most once. In the spirit of baukit's ``nethook``: hooks are taken back in ``finally``,
and a registration that fails halfway takes back what it had already registered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from torch import nn


class Removable(Protocol):
    """What registering a hook returns: :class:`torch.utils.hooks.RemovableHandle`."""

    def remove(self) -> None: ...


class HookSet:
    """The hooks one owner registered, removed together, newest first.

    Module hooks go through :meth:`forward` and :meth:`pre`; any other handle (an
    optimizer's step hook) through :meth:`add`. Leaving ``with HookSet() as hooks:``
    removes them all, even after an error.

    Example:
        >>> linear = nn.Linear(2, 2)
        >>> with HookSet() as hooks:
        ...     _ = hooks.forward(linear, lambda module, args, output: None)
        ...     len(linear._forward_hooks)
        1
        >>> len(linear._forward_hooks)
        0
    """

    def __init__(self) -> None:
        self._handles: list[Removable] = []

    def add(self, handle: Removable) -> Removable:
        """Keep ``handle`` so that :meth:`remove` removes it; returns it."""
        self._handles.append(handle)
        return handle

    def forward(self, module: nn.Module, hook: Callable[..., Any], **options: Any) -> Removable:
        """``module.register_forward_hook(hook, **options)``, kept."""
        return self.add(module.register_forward_hook(hook, **options))

    def pre(self, module: nn.Module, hook: Callable[..., Any], **options: Any) -> Removable:
        """``module.register_forward_pre_hook(hook, **options)``, kept."""
        return self.add(module.register_forward_pre_hook(hook, **options))

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Remove every kept hook, newest first. Safe to call twice."""
        self._remove_down_to(0)

    @contextmanager
    def registering(self) -> Iterator[HookSet]:
        """Register inside this block; if the block raises, remove what it registered.

        Hooks kept before the block stay: a second registration that fails does not undo
        a first one that succeeded.
        """
        kept_before = len(self._handles)
        try:
            yield self
        except BaseException:
            self._remove_down_to(kept_before)
            raise

    def _remove_down_to(self, count: int) -> None:
        while len(self._handles) > count:
            self._handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
