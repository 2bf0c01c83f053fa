"""The holdout sweep: score a model quantized with each config, with and without super weights held out.

This is the paper's comparison (arXiv 2411.07191, section 4) as one loop: each
:class:`~sw_hooks.quant.config.QuantConfig` is applied twice with
:func:`~sw_hooks.quant.quantize.quantize_model`, first plain and then holding the super
weights out, and the caller's ``measure`` scores the quantized model each time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from sw_hooks.core.access import CoordinateLike
from sw_hooks.quant.config import QuantConfig, require_config
from sw_hooks.quant.quantize import quantize_model
from sw_hooks.quant.targets import resolve_holdout

__all__ = ["SweepRun", "holdout_sweep"]


@dataclass(frozen=True)
class SweepRun:
    """One quantization setting's score, with or without the super weights held out.

    ``to_dict`` flattens the config beside ``"holdout"`` (the same boolean, under the key
    the report, ``sw-hooks quantize --json`` and the plots read) and ``"perplexity"``.
    """

    config: QuantConfig
    super_weights_held_out: bool
    perplexity: float

    def to_dict(self) -> dict[str, object]:
        return {
            **self.config.to_dict(),
            "holdout": self.super_weights_held_out,
            "perplexity": self.perplexity,
        }


def holdout_sweep(
    model: nn.Module,
    configs: Iterable[QuantConfig],
    super_weights: Iterable[CoordinateLike],
    measure: Callable[[], float],
    *,
    progress: Callable[[str], None] | None = None,
) -> list[SweepRun]:
    """Score the model quantized with each config, without and then with ``super_weights`` held out.

    The model is quantized in place for each run and restored bit for bit before the next
    one (and after an exception). ``measure`` scores the quantized model; the sweep is
    blind to what it measures, so callers pass perplexity on their own tokens. The configs
    and coordinates are all checked before the first run.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> sw = [("model.layers.0.mlp.down_proj", 3, 5)]
        >>> runs = holdout_sweep(model, [QuantConfig(4, 64, clip="zscore:6")], sw, lambda: 1.0)
        >>> [(r.config.block_size, r.super_weights_held_out) for r in runs]
        [(64, False), (64, True)]
    """
    configs = [require_config(config) for config in configs]
    weights = list(super_weights)
    resolve_holdout(model, weights)
    runs = []
    for config in configs:
        for held_out in (False, True):
            with quantize_model(model, config, holdout=weights if held_out else None):
                value = measure()
            if progress:
                progress(f"{config}, super weights held out: {held_out}: {value:.2f}")
            runs.append(SweepRun(config, held_out, value))
    return runs
