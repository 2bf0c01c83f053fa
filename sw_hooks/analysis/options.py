"""The thresholds of detection, in one frozen, checked object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

PROMPT_TOKENS = 128
"""Tokens detection records spikes on (the start of the text), everywhere: the CLI's
commands, the report and the model comparison take this one value."""


@dataclass(frozen=True)
class DetectionOptions:
    """Thresholds of :func:`detect`, all documented, none buried in code.

    Attributes:
        spike_factor: a layer spikes when its max ``|input|`` and its max ``|output|`` are
            both at least this many times the (lower) median of those maxima over layers.
        channel_ratio: within a spiking layer, channels within this fraction of the
            layer's largest are spike channels (several super weights can share a row or
            a column).
        min_contribution: ``|w[row, col]| * input_max[col]`` must reach this fraction of
            ``output_max[row]``: the weight must be able to explain the spike.
        max_channels: at most this many spike channels per side and layer.
        max_passes: record-and-ablate passes (each finds spikes the previous hid).
        min_impact: perplexity ratio at which a candidate is called ``"super"``.
        window, stride: perplexity windows over the calibration tokens.
        reuse_prefix: measure a candidate by running only the blocks from its own on,
            reusing the baseline's output of the blocks before it (exact; checked).
        screen_exponent: after the first window, stop measuring a candidate whose ratio
            there is below ``min_impact ** screen_exponent``; ``None`` measures every
            candidate on every window. The rule and its error: :mod:`sw_hooks.analysis.verify`.
        expert_percentile, expert_min_fraction: a whole expert is a super expert candidate
            when its max ``|down_proj output|`` is above this percentile of all routed
            experts' maxima and this fraction of the largest (arXiv 2507.23279); it is
            verified by pruning it, with ``min_impact``.
    """

    spike_factor: float = 8.0
    channel_ratio: float = 0.5
    min_contribution: float = 0.25
    max_channels: int = 4
    max_passes: int = 4
    min_impact: float = 2.0
    window: int = 512
    stride: int = 256
    reuse_prefix: bool = True
    screen_exponent: float | None = 0.25
    expert_percentile: float = 99.5
    expert_min_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("spike_factor", "min_impact"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 1.0):
                raise ValueError(f"{name} must be a number >= 1, got {value!r}")
        for name in ("channel_ratio", "min_contribution"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        exponent = self.screen_exponent
        if exponent is not None and not (isinstance(exponent, int | float) and 0 < exponent < 1):
            raise ValueError(f"screen_exponent must be in (0, 1) or None, got {exponent!r}")
        if not isinstance(self.reuse_prefix, bool):
            raise ValueError(f"reuse_prefix must be True or False, got {self.reuse_prefix!r}")
        if not (
            isinstance(self.expert_percentile, int | float) and 0 <= self.expert_percentile <= 100
        ):
            raise ValueError(
                f"expert_percentile must be in [0, 100], got {self.expert_percentile!r}"
            )
        if not (
            isinstance(self.expert_min_fraction, int | float) and 0 <= self.expert_min_fraction <= 1
        ):
            raise ValueError(
                f"expert_min_fraction must be in [0, 1], got {self.expert_min_fraction!r}"
            )
        for name in ("max_channels", "max_passes", "window", "stride"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def resolve_options(
    options: DetectionOptions | None, overrides: Mapping[str, Any]
) -> DetectionOptions:
    base = options or DetectionOptions()
    return DetectionOptions(**{**asdict(base), **overrides}) if overrides else base
