"""Ablate, scale and preserve single weights; put super activations back.

Every mask is a context manager that restores what it touched **bit for bit** on exit,
even when the body raised or an interrupt landed between two writes. Masks can also be
driven by hand: :meth:`WeightMask.apply` and :meth:`WeightMask.restore`.

Nested and overlapping masks compose: each remembers the values it found on entry and
puts them back on exit, so leaving masks in reverse order restores the original model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sw_hooks.access import Coordinate, WeightElement
from sw_hooks.results import SuperWeight

Transform = Callable[[torch.Tensor], torch.Tensor]


class WeightMask:
    """Writes ``transform(original)`` into each listed weight and restores it later.

    All coordinates are checked before any weight is touched, so a bad coordinate raises
    with the model unchanged.
    """

    def __init__(
        self, model: nn.Module, weights: Iterable[Coordinate], transform: Transform | None
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if _looks_like_one_coordinate(weights):
            weights = [weights]
        self._elements = [WeightElement.resolve(model, w) for w in weights]
        self._transform = transform
        self._saved: list[tuple[WeightElement, torch.Tensor | None]] = []

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def apply(self) -> WeightMask:
        """Remember each weight's value, then write the transformed value."""
        if self._saved:
            raise RuntimeError("this mask is already applied; restore() it first")
        try:
            for element in self._elements:
                original = element.read()
                self._saved.append((element, original))
                if self._transform is not None and original is not None:
                    element.write(self._transform(original))
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Write back every remembered value, newest first (idempotent)."""
        while self._saved:
            element, original = self._saved[-1]
            element.write(original)
            self._saved.pop()

    def write_back(self) -> None:
        """Rewrite the remembered originals without ending the mask (undo edits made inside)."""
        for element, original in self._saved:
            element.write(original)

    def __enter__(self) -> WeightMask:
        return self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def _looks_like_one_coordinate(weights: Any) -> bool:
    # (module, row, col) or, inside a mixture-of-experts layer, (module, expert, row, col).
    return isinstance(weights, SuperWeight) or (
        isinstance(weights, tuple) and len(weights) in (3, 4) and isinstance(weights[0], str)
    )


def _zero(original: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(original)


def ablate(model: nn.Module, weights: Iterable[Coordinate] | Coordinate) -> WeightMask:
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
    model: nn.Module, weights: Iterable[Coordinate] | Coordinate, factor: float
) -> WeightMask:
    """Multiply the listed weights by ``factor`` inside the context (computed in float32)."""
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not math.isfinite(factor):
        raise ValueError(f"scale factor must be a finite number, got {factor!r}")

    def multiply(original: torch.Tensor) -> torch.Tensor:
        return (original.float() * factor).to(original.dtype)

    return WeightMask(model, weights, multiply)


def preserve(model: nn.Module, weights: Iterable[Coordinate] | Coordinate) -> WeightMask:
    """Remember the listed weights and write them back on exit, whatever happened inside.

    Call :meth:`WeightMask.write_back` to put them back early (e.g. after each optimizer step).
    """
    return WeightMask(model, weights, None)


class ActivationRestorer:
    """Forward hooks that write recorded super activations back into down-projection outputs."""

    def __init__(self, model: nn.Module, weights: Sequence[SuperWeight]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self._targets: dict[str, list[SuperWeight]] = {}
        for weight in weights:
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
            self._targets.setdefault(weight.module, []).append(weight)
        self._modules = {name: _submodule(model, name) for name in self._targets}
        self._handles: list[RemovableHandle] = []

    def _hook(self, name: str):
        weights = self._targets[name]

        def write(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            patched = output.clone()
            for w in weights:
                if w.token_position < patched.shape[-2]:
                    patched[..., w.token_position, w.row] = w.output_activation
            return patched

        return write

    def __enter__(self) -> ActivationRestorer:
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._handles:
            self._handles.pop().remove()


def restore_activation(model: nn.Module, weights: Sequence[SuperWeight]) -> ActivationRestorer:
    """Put each super weight's recorded output activation back at its channel and token.

    The paper's experiment: prune the super weights, restore the super activation, and
    see how much of the quality comes back.

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
