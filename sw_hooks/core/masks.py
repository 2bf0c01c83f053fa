"""Ablate, scale and preserve single weights; put super activations back.

Every mask is a context manager that restores what it touched **bit for bit** on exit,
even when the body raised or an interrupt landed between two writes. Masks can also be
driven by hand: :meth:`WeightMask.apply` and :meth:`WeightMask.restore`.

Nested and overlapping masks compose, and they may be released in any order. Every
active mask's hold on a weight element is kept in one registry, oldest first:

* releasing the newest hold writes back the value it found on entry;
* releasing an older one takes its effect out from under the later ones: each later
  mask's remembered value is recomputed as if the released mask had never been applied
  (``preserve`` passes the value through), and the weight gets what the remaining masks
  make of it. Edits made by hand to a weight a later mask holds are dropped at that
  moment, as that mask's exit would drop them.

So when the last mask leaves, every weight holds bit for bit what it held before the
first one came.

:func:`restore_activation` writes a recorded super activation back at its absolute token
position in the sequence, also during ``model.generate`` with a KV cache.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from sw_hooks.core.access import CoordinateLike, WeightElement, coordinates_of
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.results import SuperWeight

Transform = Callable[[torch.Tensor], torch.Tensor]


class _Hold:
    """One mask's hold on one weight element: the value beneath it and what it makes of it."""

    __slots__ = ("element", "original", "transform")

    def __init__(
        self, element: WeightElement, original: torch.Tensor | None, transform: Transform | None
    ):
        self.element = element
        self.original = original
        self.transform = transform

    def applied_to(self, beneath: torch.Tensor | None) -> torch.Tensor | None:
        """The value this mask leaves on top of ``beneath`` (a preserve leaves it as is)."""
        if self.transform is None or beneath is None:
            return beneath
        return self.transform(beneath)


class _ActiveHolds:
    """Per weight element, the holds of the masks active on it, oldest first.

    The one place that knows how overlapping masks stack, so any of them can leave first.
    """

    def __init__(self) -> None:
        self._stacks: dict[WeightElement, list[_Hold]] = {}
        self._lock = threading.Lock()

    def push(self, hold: _Hold) -> None:
        with self._lock:
            self._stacks.setdefault(hold.element, []).append(hold)

    def release(self, hold: _Hold) -> None:
        """Write what the holds above ``hold`` make of its original, then forget ``hold``.

        Nothing changes if the write fails, so releasing again finishes the job. A hold
        that is not registered (it never took effect, or it was released already) is a no-op.
        """
        with self._lock:
            stack = self._stacks.get(hold.element, [])
            index = next((i for i, held in enumerate(stack) if held is hold), None)
            if index is None:
                return
            above = stack[index + 1 :]
            rebased, value = _replay(hold.original, above)
            hold.element.write(value)
            for held, original in zip(above, rebased, strict=True):
                held.original = original
            del stack[index]
            if not stack:
                del self._stacks[hold.element]

    def forget(self, hold: _Hold) -> None:
        """Drop ``hold`` without writing: for a hold that writes nothing (``preserve``).

        The holds above it found the value it left unchanged, so their originals stand.
        """
        with self._lock:
            stack = self._stacks.get(hold.element, [])
            stack[:] = [held for held in stack if held is not hold]
            if not stack:
                self._stacks.pop(hold.element, None)


def _replay(
    base: torch.Tensor | None, holds: Sequence[_Hold]
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Each hold's new original when ``base`` lies beneath them all, and the value on top."""
    originals = []
    value = base
    for hold in holds:
        originals.append(value)
        value = hold.applied_to(value)
    return originals, value


_ACTIVE = _ActiveHolds()


class WeightMask:
    """Writes ``transform(original)`` into each listed weight and restores it later.

    All coordinates are checked before any weight is touched, so a bad coordinate raises
    with the model unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: Iterable[CoordinateLike] | CoordinateLike,
        transform: Transform | None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self._elements = [WeightElement.resolve(model, w) for w in coordinates_of(weights)]
        self._transform = transform
        self._saved: list[_Hold] = []

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def apply(self) -> WeightMask:
        """Remember each weight's value, then write the transformed value."""
        if self._saved:
            raise RuntimeError("this mask is already applied; restore() it first")
        try:
            for element in self._elements:
                hold = _Hold(element, element.read(), self._transform)
                self._saved.append(hold)
                _ACTIVE.push(hold)
                if self._transform is not None and hold.original is not None:
                    element.write(self._transform(hold.original))
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Release every weight, newest first (idempotent).

        A weight no later mask holds gets its remembered value back; under a later
        overlapping mask it gets what the remaining masks make of that value.
        """
        while self._saved:
            _ACTIVE.release(self._saved[-1])
            self._saved.pop()

    def forget(self) -> None:
        """End a mask that writes nothing, leaving every weight as it is now (idempotent).

        ``restore`` would write the remembered values back; a guard that stops guarding
        leaves the weights alone but must not stay registered as holding them.
        """
        if self._transform is not None:
            raise RuntimeError("only a mask that writes nothing (preserve) can be forgotten")
        while self._saved:
            _ACTIVE.forget(self._saved.pop())

    def write_back(self) -> None:
        """Rewrite the remembered originals without ending the mask (undo edits made inside)."""
        for hold in self._saved:
            hold.element.write(hold.original)

    def __enter__(self) -> WeightMask:
        return self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def _zero(original: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(original)


def ablate(model: nn.Module, weights: Iterable[CoordinateLike] | CoordinateLike) -> WeightMask:
    """Zero the listed weights inside the context.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> w = ("model.layers.0.mlp.down_proj", 3, 5)
        >>> with ablate(model, [w]):
        ...     float(model.model.layers[0].mlp.down_proj.weight[3, 5])
        0.0
    """
    return WeightMask(model, weights, _zero)


def scale(
    model: nn.Module, weights: Iterable[CoordinateLike] | CoordinateLike, factor: float
) -> WeightMask:
    """Multiply the listed weights by ``factor`` inside the context (computed in float32)."""
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not math.isfinite(factor):
        raise ValueError(f"scale factor must be a finite number, got {factor!r}")

    def multiply(original: torch.Tensor) -> torch.Tensor:
        return (original.float() * factor).to(original.dtype)

    return WeightMask(model, weights, multiply)


def preserve(model: nn.Module, weights: Iterable[CoordinateLike] | CoordinateLike) -> WeightMask:
    """Remember the listed weights and write them back on exit, whatever happened inside.

    Call :meth:`WeightMask.write_back` to put them back early (e.g. after each optimizer step).
    """
    return WeightMask(model, weights, None)


class _CallPositions:
    """Where the tokens of the model call now running sit in their sequence.

    Pre-hooks on the down-projections' ancestors fill it: the outermost call that starts
    resets it (the tokens before it: the length of a cache passed in), and every ancestor
    called with ``position_ids`` or ``cache_position`` sets the positions exactly. With a
    KV cache each decode call holds only the new tokens, so positions within the call are
    not positions in the sequence.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.offset = 0
        self.explicit: torch.Tensor | None = None

    def enter(self, kwargs: dict[str, Any]) -> None:
        if self.depth == 0:
            self.offset, self.explicit = _cached_length(kwargs), None
        self.depth += 1
        explicit = _explicit_positions(kwargs)
        if explicit is not None:
            self.explicit = explicit

    def leave(self) -> None:
        self.depth = max(self.depth - 1, 0)

    def of(self, output: torch.Tensor, module_name: str) -> torch.Tensor:
        """The position of every token of ``output`` (shape ``output.shape[:-1]``)."""
        tokens_shape = output.shape[:-1]
        if self.explicit is None:
            if output.dim() < 2:
                raise ValueError(f"{module_name} returned no token axis: shape {output.shape}")
            counted = torch.arange(output.shape[-2], device=output.device) + self.offset
            return counted.expand(tokens_shape)
        positions = self.explicit.to(output.device)
        if positions.numel() == tokens_shape.numel():
            return positions.reshape(tokens_shape)
        try:
            return positions.expand(tokens_shape)
        except RuntimeError:
            raise ValueError(
                f"cannot line up the model's position ids {tuple(positions.shape)} with the "
                f"tokens of {module_name}'s output {tuple(output.shape)}"
            ) from None


def _explicit_positions(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``position_ids`` (``[batch, tokens]``, padding-aware) or else ``cache_position``."""
    for key in ("position_ids", "cache_position"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() in (1, 2):
            return value.detach()
    return None


def _cached_length(kwargs: dict[str, Any]) -> int:
    """How many tokens a KV cache passed to the call already holds (0 without one)."""
    for key in ("cache", "past_key_values"):
        get_length = getattr(kwargs.get(key), "get_seq_length", None)
        if callable(get_length):
            return int(get_length())
    return 0


class ActivationRestorer:
    """Forward hooks that write recorded super activations back into down-projection outputs.

    Each activation is written only at its absolute token position in the sequence, so a
    super activation recorded at token 0 goes to token 0 whether the model runs the whole
    sequence at once or one token per call with a KV cache (``model.generate``). Positions
    come from the ``position_ids`` (or ``cache_position``) the model passes to the layers
    holding the down-projection; without them, from the length of the cache passed in.
    With left padding, ``position_ids`` count from each row's first real token.

    Like the masks, it acts on :meth:`apply` / ``__enter__`` and undoes on
    :meth:`restore` / ``__exit__``; every weight is checked when it is built.
    """

    def __init__(self, model: nn.Module, weights: Sequence[SuperWeight]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self._targets: dict[str, list[SuperWeight]] = {}
        for weight in weights:
            _check_restorable(weight)
            self._targets.setdefault(weight.module, []).append(weight)
        self._modules = {name: _submodule(model, name) for name in self._targets}
        self._ancestors = _ancestors(model, self._targets)
        self._positions = _CallPositions()
        self._hooks = HookSet()

    @property
    def active(self) -> bool:
        return len(self._hooks) > 0

    def apply(self) -> ActivationRestorer:
        """Register the hooks: from now on every forward pass gets the activations back."""
        if self.active:
            raise RuntimeError("this restorer is already applied; restore() it first")
        self._positions = _CallPositions()
        with self._hooks.registering():
            for ancestor in self._ancestors:
                self._hooks.pre(ancestor, self._enter_call, with_kwargs=True)
                self._hooks.forward(ancestor, self._leave_call, always_call=True)
            for name, module in self._modules.items():
                self._hooks.forward(module, self._writer(name))
        return self

    def restore(self) -> None:
        """Remove every hook, newest first (idempotent)."""
        self._hooks.remove()

    def _enter_call(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._positions.enter(kwargs)

    def _leave_call(self, module: nn.Module, args: Any, output: Any) -> None:
        self._positions.leave()

    def _writer(self, name: str):
        weights = self._targets[name]

        def write(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            positions = self._positions.of(output, name)
            patched = output.clone()
            for w in weights:
                at_token = positions == w.token_position
                patched[..., w.row].masked_fill_(at_token, w.output_activation)
            return patched

        return write

    def __enter__(self) -> ActivationRestorer:
        return self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def _check_restorable(weight: object) -> None:
    if not isinstance(weight, SuperWeight):
        raise TypeError(
            "restore_activation() needs SuperWeight objects (they carry the activation)"
        )
    if weight.expert is not None:
        raise ValueError(
            f"restore_activation() cannot restore inside expert {weight.expert} of "
            f"{weight.module}: an expert's output is mixed with others' before any "
            "module returns it"
        )
    position = weight.token_position
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise ValueError(
            f"restore_activation(): {weight.module} [{weight.row}, {weight.col}] has token "
            f"position {position!r}, so where to write its activation is unknown; record "
            "with locations (the default keeps them for the largest channels, spikes "
            "included; locations=True for every channel)"
        )


def _ancestors(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """``model`` and every module between it and each named module, each once."""
    found: dict[int, nn.Module] = {}
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts)):
            module = model.get_submodule(".".join(parts[:depth]))
            found.setdefault(id(module), module)
    return list(found.values())


def restore_activation(model: nn.Module, weights: Sequence[SuperWeight]) -> ActivationRestorer:
    """Put each super weight's recorded output activation back at its channel and token.

    The paper's experiment: prune the super weights, restore the super activation, and
    see how much of the quality comes back. ``token_position`` is the absolute position
    in the sequence (what :func:`~sw_hooks.core.record.record` and detection report), so this
    also holds during ``model.generate`` with a KV cache.

    Example:
        >>> with ablate(model, weights), restore_activation(model, weights):  # doctest: +SKIP
        ...     logits = model(ids).logits
    """
    return ActivationRestorer(model, list(weights))


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"no module named {name!r} in {type(model).__name__}") from None
