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
  ``min_impact``. Models that are not causal LMs are measured with the loss that suits them
  (:mod:`sw_hooks.analysis.losses`; ``loss_fn=`` chooses another).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.candidates import (  # noqa: F401  (the detection vocabulary, here too)
    check_finite,
    layer_peaks_of,
    spike_candidates,
    spiking_layers,
)
from sw_hooks.analysis.losses import Batch, Loss, LossFn, as_loss, is_causal
from sw_hooks.analysis.options import DetectionOptions, resolve_options
from sw_hooks.analysis.super_experts import prune_super_experts, super_expert_candidates
from sw_hooks.analysis.verify import VerifySettings, measure_impacts
from sw_hooks.core.devices import forward_on_device, ids_of  # noqa: F401
from sw_hooks.core.masks import ablate
from sw_hooks.core.progress import Progress
from sw_hooks.core.record import (
    ExpertSelection,
    ModuleSelection,
    Recorder,
    record,
    select_units,
)
from sw_hooks.core.results import DetectionResult, LayerPeak, SuperExpert, SuperWeight


@dataclass(frozen=True)
class CandidateSearch:
    """What the record-and-ablate loop found, and the first (unablated) pass's peaks.

    Attributes:
        candidates: spike pairs in discovery order (unverified).
        passes: record-and-ablate passes run.
        layer_peaks: :func:`layer_peaks_of` the first pass, kept for the result's readers.
        super_experts: whole experts the first pass flagged (unverified).
    """

    candidates: list[SuperWeight]
    passes: int
    layer_peaks: tuple[LayerPeak, ...] = ()
    super_experts: tuple[SuperExpert, ...] = ()


def search_candidates(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    options: DetectionOptions | None = None,
    *,
    modules: ModuleSelection = None,
    experts: ExpertSelection = None,
    progress: Progress | None = None,
) -> CandidateSearch:
    """Iterate record -> candidates -> ablate until no unit shows a new spike pair.

    A unit's spike pairs are all taken in the pass that first finds it; later passes
    (with everything found so far zeroed) only look at units not yet explained, so a
    unit whose input keeps spiking cannot feed the loop row after row. ``modules`` and
    ``experts`` choose the units as :func:`~sw_hooks.core.record.record` does: by default
    every dense down-projection and every expert.
    """
    options = options or DetectionOptions()
    modules, experts = select_units(model, modules, experts)
    found: list[SuperWeight] = []
    peaks: tuple[LayerPeak, ...] = ()
    flagged: list[SuperExpert] = []
    passes = 0
    started = time.perf_counter()
    for passes in range(1, options.max_passes + 1):
        with ablate(model, found), record(model, modules, experts=experts) as recorder:
            forward_on_device(model, inputs)
        units = recorder.units
        if passes == 1:
            peaks = layer_peaks_of(units)
            flagged = _flag_super_experts(recorder, options)
        explained = {(w.module, w.expert) for w in found}
        new = [
            c
            for c in spike_candidates(model, units, options)
            if (c.module, c.expert) not in explained
        ]
        if progress:
            # Passes stop when one finds nothing new: the estimate is an upper bound.
            left = (options.max_passes - passes) * (time.perf_counter() - started) / passes
            more = f"; at most {left:.0f} s left" if new and passes < options.max_passes else ""
            progress(f"pass {passes}: {len(new)} new candidate(s){more}")
        if not new:
            break
        found += new
    return CandidateSearch(found, passes, peaks, tuple(flagged))


def _flag_super_experts(recorder: Recorder, options: DetectionOptions) -> list[SuperExpert]:
    stats = recorder.expert_stats
    if not stats:
        return []
    return super_expert_candidates(stats, options.expert_percentile, options.expert_min_fraction)


def find_candidates(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    options: DetectionOptions | None = None,
    *,
    modules: ModuleSelection = None,
    experts: ExpertSelection = None,
    progress: Progress | None = None,
) -> tuple[list[SuperWeight], int]:
    """:func:`search_candidates` without the peaks.

    Returns ``(candidates in discovery order, passes run)``.
    """
    search = search_candidates(
        model, inputs, options, modules=modules, experts=experts, progress=progress
    )
    return search.candidates, search.passes


def verify(
    model: nn.Module,
    candidates: Sequence[SuperWeight],
    calibration: Batch,
    options: DetectionOptions | None = None,
    *,
    loss_fn: Loss | LossFn | None = None,
    progress: Progress | None = None,
) -> tuple[list[SuperWeight], float | None, float | None]:
    """Measure each candidate: perplexity (or ``loss_fn``) with it zeroed over the baseline.

    The measurement (prefix reuse, screening) is :func:`sw_hooks.analysis.verify.measure_impacts`;
    ``loss_fn`` defaults to the loss chosen for the model (:func:`~sw_hooks.analysis.losses.as_loss`).

    Returns ``(candidates with impact and verdict, baseline perplexity or None, joint impact)``.
    """
    measured = measure_impacts(
        model, candidates, calibration, _settings(options), loss_fn=loss_fn, progress=progress
    )
    return measured.weights, measured.baseline_perplexity, measured.joint_ratio


def verify_super_experts(
    model: nn.Module,
    experts: Sequence[SuperExpert],
    calibration: Batch,
    options: DetectionOptions | None = None,
    *,
    loss_fn: Loss | LossFn | None = None,
    progress: Progress | None = None,
) -> list[SuperExpert]:
    """Measure each flagged expert: perplexity with its routing pruned over the baseline.

    The same measurement as :func:`verify`, told to prune experts instead of zeroing weights.
    """
    measured = measure_impacts(
        model,
        experts,
        calibration,
        _settings(options),
        ablation=prune_super_experts,
        loss_fn=loss_fn,
        progress=progress,
    )
    return measured.weights


def _settings(options: DetectionOptions | None) -> VerifySettings:
    options = options or DetectionOptions()
    return VerifySettings(
        min_impact=options.min_impact,
        window=options.window,
        stride=options.stride,
        reuse_prefix=options.reuse_prefix,
        screen_exponent=options.screen_exponent,
    )


def run_detection(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    calibration: Batch | None = None,
    verify_impact: bool = True,
    options: DetectionOptions | None = None,
    model_name: str | None = None,
    prepend_bos: bool = False,
    modules: ModuleSelection = None,
    experts: ExpertSelection = None,
    loss_fn: Loss | LossFn | None = None,
    progress: Progress | None = None,
    calibration_name: str | None = None,
    **overrides: Any,
) -> DetectionResult:
    """Detect and (by default) verify super weights; everything :func:`detect` knows.

    Dense down-projections and the experts of mixture-of-experts layers go through the
    same steps (each routed expert is one unit); weights inside experts carry ``expert``.

    Args:
        model: any model whose MLP output projections the locator finds.
        inputs: the prompt as token ids ``[batch, tokens]`` (or a dict of model inputs:
            ``pixel_values``, ``input_features``, ...).
        calibration: what verification measures: token ids for a causal LM's perplexity
            (default: the prompt's ids); for other losses token ids or a dict of model
            inputs (default: ``inputs`` as given).
        verify_impact: measure each candidate's impact (else ``impact`` stays ``None``).
        options: thresholds; or pass them as keyword arguments (``min_impact=3.0``).
        model_name: a name for the result; prepend_bos: recorded with the result.
        modules, experts: which units to search, as :func:`~sw_hooks.core.record.record`
            takes them (default: every down-projection and every expert).
        loss_fn: what verification measures (default: chosen from the model's class by
            :func:`~sw_hooks.analysis.losses.as_loss`; a causal LM keeps its perplexity).
            Chosen before any slow work, so an unknown model fails at once.
        progress: called with a line of text after each slow step.
        calibration_name: the calibration text's name (a file, ``pydoc_data.topics``), kept
            in ``result.calibration`` with the tokens' digest: what the impacts hold for.
    """
    options = resolve_options(options, overrides)
    loss = as_loss(model, loss_fn) if verify_impact else None
    search = search_candidates(
        model, inputs, options, modules=modules, experts=experts, progress=progress
    )
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
        super_experts=search.super_experts,
        loss_fn=loss,
        calibration_name=calibration_name,
    )


def finish_detection(
    model: nn.Module,
    candidates: Sequence[SuperWeight],
    passes: int,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    calibration: Batch | None,
    verify_impact: bool,
    options: DetectionOptions,
    model_name: str | None,
    prepend_bos: bool = False,
    progress: Progress | None = None,
    layer_peaks: Sequence[LayerPeak] = (),
    super_experts: Sequence[SuperExpert] = (),
    loss_fn: Loss | LossFn | None = None,
    calibration_name: str | None = None,
) -> DetectionResult:
    """Order the candidates, verify them (unless told not to) and package the result.

    Shared by dense and mixture-of-experts detection, which differ only in how they find
    candidates. ``layer_peaks`` (the first pass's, from :func:`search_candidates`) travel
    with the result so its readers never record the model again. A result verified with a
    loss other than a causal LM's perplexity names it in ``options["loss"]``.
    """
    ordered = ordered_candidates(candidates)
    baseline = joint = scored_on = None
    recorded = asdict(options)
    if verify_impact:
        loss = as_loss(model, loss_fn)
        batch = _verification_batch(inputs, calibration, loss)
        measured = measure_impacts(
            model, ordered, batch, _settings(options), loss_fn=loss, progress=progress
        )
        ordered, baseline, joint = (
            measured.weights, measured.baseline_perplexity, measured.joint_ratio
        )  # fmt: skip
        if measured.calibration is not None:
            scored_on = replace(measured.calibration, name=calibration_name)
        if super_experts:
            super_experts = verify_super_experts(
                model, super_experts, batch, options, loss_fn=loss, progress=progress
            )
        if not is_causal(loss):
            recorded["loss"] = loss.name
    return DetectionResult(
        model=model_name or type(model).__name__,
        candidates=tuple(ordered),
        baseline_perplexity=baseline,
        joint_ablation_ratio=joint,
        prepend_bos=prepend_bos,
        passes=passes,
        options=recorded,
        layer_peaks=tuple(layer_peaks),
        super_experts=tuple(super_experts),
        calibration=scored_on,
    )


def ordered_candidates(candidates: Sequence[SuperWeight]) -> list[SuperWeight]:
    """Candidates in the order a result lists them: by layer, expert, row, column."""
    return sorted(
        candidates,
        key=lambda c: (
            c.layer if c.layer is not None else -1,
            c.expert if c.expert is not None else -1,
            c.row,
            c.col,
        ),
    )


def _verification_batch(
    inputs: torch.Tensor | Mapping[str, torch.Tensor], calibration: Batch | None, loss: Loss
) -> Batch:
    """``calibration`` when given; else the prompt's ids for a causal LM, the inputs as
    given for any other loss."""
    if calibration is not None:
        return calibration
    return ids_of(inputs) if is_causal(loss) else inputs


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
    return list(run_detection(model, inputs, **options).candidates)


def detect_expert_weights(
    model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor], **options: Any
) -> DetectionResult:
    """:func:`run_detection` over the experts only (no dense down-projections).

    Example:
        >>> from sw_hooks.testing import planted_moe
        >>> planted = planted_moe("mixtral")
        >>> result = detect_expert_weights(
        ...     planted.model, planted.prompt(), calibration=planted.calibration_ids()
        ... )
        >>> [(w.layer, w.expert, w.row, w.col, w.verdict) for w in result.candidates]
        [(1, 3, 5, 17, 'super')]
    """
    return run_detection(model, inputs, modules=[], experts=True, **options)
