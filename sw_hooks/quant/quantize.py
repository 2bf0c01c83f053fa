"""The one verb: fake-quantize a model's weights in place, super weights held out, and undo it.

In torchao's shape, ``quantize_model(model, config, holdout=..., modules=...)`` takes one
frozen :class:`~sw_hooks.quant.config.QuantConfig` and a module filter; it quantizes every
chosen weight with :func:`~sw_hooks.quant.primitives.quantize_tensor` (dense weights whole,
fused expert parameters one expert at a time, see :mod:`sw_hooks.quant.targets`), keeps
the held-out super weights bit-exact, and returns a handle that puts every original back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sw_hooks.core.access import CoordinateLike
from sw_hooks.quant import primitives
from sw_hooks.quant.config import QuantConfig, require_config
from sw_hooks.quant.targets import ModuleSelection, WeightTarget, resolve_holdout, select_weights

__all__ = ["QuantizedModel", "quantize_model"]


class QuantizedModel:
    """Fake-quantizes a model's weights and puts the originals back, bit for bit.

    Made directly, it checks everything when made and changes nothing until ``__enter__``
    (or :meth:`apply`), like the weight masks: ``with QuantizedModel(model, config): ...``.
    :func:`quantize_model` is the verb (torchao's ``quantize_``): it makes one and applies
    it at once, so a plain call quantizes; entering the handle it returns keeps the weights
    as they are (they are already quantized) and leaving restores them.

    Args:
        model: the model (its weights are changed in place while applied).
        config: how to quantize (see :class:`QuantConfig`).
        holdout: the super weights to keep in full precision: ``SuperWeight`` objects or
            coordinates, ``(module, row, col)`` or ``(module, expert, row, col)`` (a
            ``DetectionResult`` stands for its ``super_weights``), or ``None``. Coordinates
            in weights that are not quantized are checked and then need nothing more.
        modules: which weights (see :func:`~sw_hooks.quant.targets.select_weights`);
            default: every linear weight but the embeddings and the LM head, and every
            fused expert parameter.

    Raises:
        TypeError: ``config`` is not a :class:`QuantConfig`.
        ValueError: a module is missing or not Linear-like, or a coordinate lies outside
            its weight (before any weight is touched).

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> quantized = QuantizedModel(model, QuantConfig(4, 64))
        >>> quantized.active
        False
        >>> with quantized:
        ...     quantized.active
        True
    """

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        *,
        holdout: Iterable[CoordinateLike] | None = None,
        modules: ModuleSelection = None,
    ) -> None:
        self.config = require_config(config)
        self._chosen = select_weights(model, modules)
        self._held = resolve_holdout(model, holdout)
        self.held_out = sum(len(self._held.get(name, ())) for name in self._chosen)
        self._originals: dict[str, tuple[WeightTarget, torch.Tensor]] = {}

    @property
    def modules(self) -> list[str]:
        """The names of the weights this quantizes (modules, and fused expert parameters)."""
        return list(self._chosen)

    @property
    def active(self) -> bool:
        """Whether the weights are quantized now (applied and not yet restored)."""
        return bool(self._originals)

    def apply(self) -> QuantizedModel:
        """Quantize every chosen weight in place, remembering the original first.

        An error midway restores every weight already changed before it propagates.
        """
        if self.active:
            raise RuntimeError("this model is already quantized; restore() it first")
        try:
            with torch.no_grad():
                for name, target in self._chosen.items():
                    self._originals[name] = (target, target.parameter.detach().clone())
                    self._quantize(target)
        except BaseException:
            self.restore()
            raise
        return self

    def _quantize(self, target: WeightTarget) -> None:
        """``target`` in place, each expert's matrix on its own, its held-out elements kept."""
        held = primitives.holdout_mask(target.shape, self._held.get(target.name, ()))
        quantize = primitives.quantize_matrices if target.is_fused else primitives.quantize_tensor
        view = target.oriented()
        view.copy_(quantize(view, self.config, holdout=held))

    def restore(self) -> None:
        """Put every original weight back (bit-exact), newest first (idempotent)."""
        with torch.no_grad():
            while self._originals:
                name = next(reversed(self._originals))
                target, original = self._originals.pop(name)
                target.parameter.copy_(original)

    def __enter__(self) -> QuantizedModel:
        return self if self.active else self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    *,
    holdout: Iterable[CoordinateLike] | None = None,
    modules: ModuleSelection = None,
) -> QuantizedModel:
    """Fake-quantize the chosen weights in place now; hold the super weights out.

    Blocks run along each weight in ``[out, in]`` order (GPT-2's transposed ``Conv1D``
    included), so block boundaries and holdout coordinates mean the same on every
    architecture. A fused ``[experts, out, in]`` parameter is quantized one expert at a
    time: no block mixes two experts. Every argument and coordinate is checked before
    any weight is touched.

    Args:
        model, config, holdout, modules: as for :class:`QuantizedModel`. ``holdout`` is
            the super weights to keep (coordinates or ``SuperWeight`` objects), or ``None``.

    Returns:
        The applied :class:`QuantizedModel`; ``.restore()`` or leaving its ``with`` block
        undoes everything without reloading.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> sw = ("model.layers.0.mlp.down_proj", 3, 5)
        >>> with quantize_model(model, QuantConfig(4, 64, clip="zscore:6"), holdout=[sw]) as q:
        ...     len(q.modules)
        7
    """
    return QuantizedModel(model, config, holdout=holdout, modules=modules).apply()
