"""Detect super weights from activation spikes, then prove each one by ablating it.

The published method (arXiv 2411.07191, section 3.1): record the down-projections'
max ``|input|`` and ``|output|``; where the output spikes at channel ``row`` and the input
at channel ``col``, ``weight[row, col]`` is a candidate; zero the candidates, record
again, and repeat until no new spike pair appears. This module adds what makes the answer
trustworthy:

* a spike is judged against the *population* of layers (every layer whose input and
  output both spike is considered, not only the global maximum, which is often a late
  layer's harmless spike);
* a weight is only a candidate if it can explain its row's spike
  (``|w| * input_max >= min_contribution * output_max``);
* every candidate's effect is **measured**: perplexity with that one weight zeroed over
  perplexity without (``impact``), and ``verdict="super"`` only when it reaches
  ``min_impact``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.verify import VerifySettings, measure_impacts
from sw_hooks.core.access import WeightElement
from sw_hooks.core.devices import execution_device
from sw_hooks.core.locate import find_down_projections, layer_index
from sw_hooks.core.masks import ablate
from sw_hooks.core.record import ChannelMaxima, ChannelStats, record
from sw_hooks.core.results import DetectionResult, LayerPeak, SuperWeight

Progress = Callable[[str], None]


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
        for name in ("max_channels", "max_passes", "window", "stride"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _layer_peaks(stats: Mapping[str, ChannelStats]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.stack([s.input.abs_max.max() for s in stats.values()])
    outputs = torch.stack([s.output.abs_max.max() for s in stats.values()])
    return inputs, outputs


def spiking_layers(stats: Mapping[str, ChannelStats], spike_factor: float) -> list[str]:
    """Modules whose max ``|input|`` and ``|output|`` both stand ``spike_factor`` above the rest.

    The reference is the *lower* median over layers, so spikes in up to half of the
    layers cannot raise their own bar.
    """
    usable = {n: s for n, s in stats.items() if s.input is not None and s.output is not None}
    if len(usable) < 2:
        return []
    inputs, outputs = _layer_peaks(usable)
    spiking = (inputs >= spike_factor * inputs.median()) & (
        outputs >= spike_factor * outputs.median()
    )
    return [name for name, hit in zip(usable, spiking.tolist(), strict=True) if hit]


def check_finite(stats: Mapping[str, ChannelStats]) -> None:
    """Refuse stats holding a NaN or infinite activation, naming where it first appeared.

    The recorder keeps non-finite maxima (a NaN is never overwritten), so a model that
    overflowed anywhere in the calibration pass cannot yield a spike ranking.
    """
    for name, module_stats in stats.items():
        for side in ("input", "output"):
            maxima: ChannelMaxima | None = getattr(module_stats, side)
            if maxima is None or bool(maxima.abs_max.isfinite().all()):
                continue
            channel = int((~maxima.abs_max.isfinite()).nonzero()[0, 0])
            raise ValueError(
                f"non-finite activation ({float(maxima.value[channel])}) in the {side} of "
                f"{name}, channel {channel}, token {int(maxima.token[channel])}: the model "
                "overflowed or holds NaN/inf weights; detection needs finite activations"
            )


def _spike_channels(maxima: ChannelMaxima, ratio: float, limit: int) -> list[int]:
    peak = maxima.abs_max.max()
    count = min(limit, int((maxima.abs_max >= ratio * peak).sum()))
    return maxima.abs_max.topk(count).indices.tolist()


def spike_candidates(
    model: nn.Module,
    stats: Mapping[str, ChannelStats],
    options: DetectionOptions | None = None,
    **overrides: Any,
) -> list[SuperWeight]:
    """Turn recorder stats into candidate super weights (unverified).

    Pure apart from reading the candidate weights' values. Each candidate is a spike pair
    (output channel ``row``, input channel ``col``) in a spiking layer whose weight can
    explain the output spike.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama(num_layers=6)
        >>> with record(planted.model) as rec, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> [(w.layer, w.row, w.col) for w in spike_candidates(planted.model, rec.stats)]
        [(1, 5, 17), (5, 9, 33)]
    """
    options = _options(options, overrides)
    check_finite(stats)
    found = []
    for name in spiking_layers(stats, options.spike_factor):
        found += _layer_candidates(model, name, stats[name], options)
    return found


def _layer_candidates(
    model: nn.Module, name: str, stats: ChannelStats, options: DetectionOptions
) -> list[SuperWeight]:
    inputs, outputs = stats.input, stats.output
    candidates = []
    for row in _spike_channels(outputs, options.channel_ratio, options.max_channels):
        for col in _spike_channels(inputs, options.channel_ratio, options.max_channels):
            value = WeightElement.resolve(model, (name, row, col)).read_float()
            explained = abs(value) * float(inputs.abs_max[col])
            if explained >= options.min_contribution * float(outputs.abs_max[row]):
                candidates.append(
                    SuperWeight(
                        module=name,
                        layer=layer_index(name),
                        row=row,
                        col=col,
                        value=value,
                        input_activation=float(inputs.value[col]),
                        output_activation=float(outputs.value[row]),
                        token_position=int(outputs.token[row]),
                    )
                )
    return candidates


def _options(options: DetectionOptions | None, overrides: Mapping[str, Any]) -> DetectionOptions:
    base = options or DetectionOptions()
    return DetectionOptions(**{**asdict(base), **overrides}) if overrides else base


def forward_on_device(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
    """One forward pass, with the inputs sent where the model runs."""
    device = execution_device(model)
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            model(**{key: _sent(value, device) for key, value in inputs.items()})
        else:
            model(inputs.to(device))


def _sent(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def layer_peaks_of(stats: Mapping[str, ChannelStats]) -> tuple[LayerPeak, ...]:
    """Per recorded module with both sides: its largest ``|input|`` and ``|output|`` and channels.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> with record(planted.model) as rec, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> peak = layer_peaks_of(rec.stats)[1]
        >>> (peak.layer, peak.output_channel, peak.input_channel)
        (1, 5, 17)
    """
    peaks = []
    for name, module_stats in stats.items():
        if module_stats.input is None or module_stats.output is None:
            continue
        input_channel, input_max = module_stats.input.top()
        output_channel, output_max = module_stats.output.top()
        peaks.append(
            LayerPeak(name, layer_index(name), input_max, input_channel, output_max, output_channel)
        )
    return tuple(peaks)


@dataclass(frozen=True)
class CandidateSearch:
    """What the record-and-ablate loop found, and the first (unablated) pass's peaks.

    Attributes:
        candidates: spike pairs in discovery order (unverified).
        passes: record-and-ablate passes run.
        layer_peaks: :func:`layer_peaks_of` the first pass, kept for the result's readers.
    """

    candidates: list[SuperWeight]
    passes: int
    layer_peaks: tuple[LayerPeak, ...] = ()


def search_candidates(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    options: DetectionOptions | None = None,
    *,
    progress: Progress | None = None,
) -> CandidateSearch:
    """Iterate record -> candidates -> ablate until no layer shows a new spike pair.

    A layer's spike pairs are all taken in the pass that first finds it; later passes
    (with everything found so far zeroed) only look at layers not yet explained, so a
    layer whose input keeps spiking cannot feed the loop row after row.
    """
    options = options or DetectionOptions()
    modules = find_down_projections(model)
    found: list[SuperWeight] = []
    peaks: tuple[LayerPeak, ...] = ()
    passes = 0
    started = time.perf_counter()
    for passes in range(1, options.max_passes + 1):
        with ablate(model, found), record(model, modules) as recorder:
            forward_on_device(model, inputs)
        if passes == 1:
            peaks = layer_peaks_of(recorder.stats)
        explained = {w.module for w in found}
        new = [
            c for c in spike_candidates(model, recorder.stats, options) if c.module not in explained
        ]
        if progress:
            # Passes stop when one finds nothing new: the estimate is an upper bound.
            left = (options.max_passes - passes) * (time.perf_counter() - started) / passes
            more = f"; at most {left:.0f} s left" if new and passes < options.max_passes else ""
            progress(f"pass {passes}: {len(new)} new candidate(s){more}")
        if not new:
            break
        found += new
    return CandidateSearch(found, passes, peaks)


def find_candidates(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    options: DetectionOptions | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[list[SuperWeight], int]:
    """:func:`search_candidates` without the peaks.

    Returns ``(candidates in discovery order, passes run)``.
    """
    search = search_candidates(model, inputs, options, progress=progress)
    return search.candidates, search.passes


def verify(
    model: nn.Module,
    candidates: Sequence[SuperWeight],
    calibration: torch.Tensor,
    options: DetectionOptions | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[list[SuperWeight], float, float | None]:
    """Measure each candidate: perplexity with it zeroed over the baseline.

    The measurement (prefix reuse, screening) is :func:`sw_hooks.analysis.verify.measure_impacts`.

    Returns ``(candidates with impact and verdict, baseline perplexity, joint ablation ratio)``.
    """
    options = options or DetectionOptions()
    settings = VerifySettings(
        min_impact=options.min_impact,
        window=options.window,
        stride=options.stride,
        reuse_prefix=options.reuse_prefix,
        screen_exponent=options.screen_exponent,
    )
    measured = measure_impacts(model, candidates, calibration, settings, progress=progress)
    return measured.weights, measured.baseline_perplexity, measured.joint_ratio


def run_detection(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    calibration: torch.Tensor | None = None,
    verify_impact: bool = True,
    options: DetectionOptions | None = None,
    model_name: str | None = None,
    prepend_bos: bool = False,
    progress: Progress | None = None,
    **overrides: Any,
) -> DetectionResult:
    """Detect and (by default) verify super weights; everything :func:`detect` knows.

    Args:
        model: any causal language model whose down-projections the locator finds.
        inputs: the prompt as token ids ``[batch, tokens]`` (or a dict of model inputs).
        calibration: token ids for perplexity (default: the prompt's ids).
        verify_impact: measure each candidate's impact (else ``impact`` stays ``None``).
        options: thresholds; or pass them as keyword arguments (``min_impact=3.0``).
        model_name: a name for the result; prepend_bos: recorded with the result.
        progress: called with a line of text after each slow step.
    """
    options = _options(options, overrides)
    search = search_candidates(model, inputs, options, progress=progress)
    return finish_detection(
        model,
        search.candidates,
        search.passes,
        inputs,
        calibration=calibration,
        verify_impact=verify_impact,
        options=options,
        model_name=model_name,
        prepend_bos=prepend_bos,
        progress=progress,
        layer_peaks=search.layer_peaks,
    )


def finish_detection(
    model: nn.Module,
    candidates: Sequence[SuperWeight],
    passes: int,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    calibration: torch.Tensor | None,
    verify_impact: bool,
    options: DetectionOptions,
    model_name: str | None,
    prepend_bos: bool = False,
    progress: Progress | None = None,
    layer_peaks: Sequence[LayerPeak] = (),
) -> DetectionResult:
    """Order the candidates, verify them (unless told not to) and package the result.

    Shared by dense and mixture-of-experts detection, which differ only in how they find
    candidates. ``layer_peaks`` (the first pass's, from :func:`search_candidates`) travel
    with the result so its readers never record the model again.
    """
    ordered = sorted(
        candidates,
        key=lambda c: (
            c.layer if c.layer is not None else -1,
            c.expert if c.expert is not None else -1,
            c.row,
            c.col,
        ),
    )
    baseline = joint = None
    if verify_impact:
        ids = calibration if calibration is not None else _ids_of(inputs)
        ordered, baseline, joint = verify(model, ordered, ids, options, progress=progress)
    return DetectionResult(
        model=model_name or type(model).__name__,
        super_weights=tuple(ordered),
        baseline_perplexity=baseline,
        joint_ablation_ratio=joint,
        prepend_bos=prepend_bos,
        passes=passes,
        options=asdict(options),
        layer_peaks=tuple(layer_peaks),
    )


def _ids_of(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    return inputs["input_ids"] if isinstance(inputs, Mapping) else inputs


def detect(
    model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor], **options: Any
) -> list[SuperWeight]:
    """Find the super weights of ``model`` and measure each one's impact.

    Keyword options are those of :func:`run_detection` and :class:`DetectionOptions`.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama(num_layers=6)
        >>> found = detect(planted.model, planted.prompt(), calibration=planted.calibration_ids())
        >>> [(w.layer, w.row, w.col, w.verdict) for w in found]
        [(1, 5, 17, 'super'), (5, 9, 33, 'candidate')]
    """
    return list(run_detection(model, inputs, **options).super_weights)
