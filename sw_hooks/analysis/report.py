"""A super-weight report's measurements: detection, impact, a quantization sweep, a comparison.

:func:`collect_report` runs the measurements and returns
:class:`~sw_hooks.analysis.report_data.ReportData` (plain JSON all the way down);
:func:`sw_hooks.outputs.report.write_report` draws and writes it. Given a detection result
(``sw-hooks detect --json``), the report reads its super weights from it instead of
detecting again. Given a candidate model (a quantized or fine-tuned copy), the report also
compares the two (:mod:`sw_hooks.analysis.model_comparison`). The CLI's ``sw-hooks report``
is these two calls.

Example:
    >>> data = collect_report(model, tokenizer, ids, model_name="my-model")  # doctest: +SKIP
    >>> write_report(data, "out/")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.losses import Loss, LossFn, as_loss, is_causal
from sw_hooks.analysis.report_data import ReportData, ReportOptions, shown_weights
from sw_hooks.core.progress import Progress, silent
from sw_hooks.core.results import DetectionResult, SuperWeight


class _Timer:
    """Times named stages and reports each start and end through ``progress``."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress or silent
        self.timings: dict[str, float] = {}

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        self.progress(f"{name} ...")
        start = time.perf_counter()
        value = work()
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.progress(f"{name}: done in {self.timings[name]:.1f} s")
        return value


def collect_report(
    model: nn.Module,
    tokenizer: Any,
    ids: torch.Tensor | Mapping[str, Any],
    *,
    model_name: str | None = None,
    options: ReportOptions | None = None,
    progress: Progress | None = None,
    candidate: nn.Module | None = None,
    candidate_name: str | None = None,
    loss_fn: Loss | LossFn | None = None,
    detection: DetectionResult | None = None,
) -> ReportData:
    """Detect, measure impact and sweep quantization: every number a report needs.

    A model other than a causal LM (an encoder, a vision or audio model, an
    encoder-decoder) is verified with its own loss (:func:`~sw_hooks.analysis.losses.loss_for`),
    and gets detection, traces and heat maps only: Table 1 and the quantization sweep
    measure perplexity, which it does not have (the report says so).

    Args:
        model: any model whose down-projections the locator finds; it is left as it was
            found (every mask is restored).
        tokenizer: used for the stopword ids and a masked LM's mask token; ``None`` skips
            the stopword shift.
        ids: token ids ``[1, tokens]``: the prompt is their start, the rest is for perplexity.
            A model other than a causal LM may take a dict of model inputs instead
            (``pixel_values``, ``input_features``, ...).
        model_name: the name shown; options: see :class:`ReportOptions`.
        progress: called with a line of text as each stage starts and ends.
        candidate: a changed copy of ``model`` (quantized, fine-tuned) to compare with it on
            the same tokens (:func:`~sw_hooks.analysis.model_comparison.compare_models`), following the
            report's super weights; checked against ``model`` before any measurement.
        candidate_name: the candidate's name shown.
        loss_fn: what verification measures (default: chosen from the model's class; a
            model without a Hugging Face config is measured as a causal LM).
        detection: a detection result of ``model`` (``sw-hooks detect --json``): the report
            reads its super weights from it and does not detect again.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> data = collect_report(planted.model, None, planted.calibration_ids())  # doctest: +SKIP
    """
    from sw_hooks.analysis.model_comparison import check_comparable

    options = options or ReportOptions()
    loss = as_loss(model, loss_fn, tokenizer=tokenizer)
    if not is_causal(loss):
        return _collect_non_causal(
            model, ids, loss, model_name, options, progress, candidate, detection
        )
    ids = _check_causal_ids(ids)
    if candidate is not None:
        check_comparable(model, candidate, ())
    shown_weights(detection, options)  # a given result that cannot answer fails first
    timer = _Timer(progress)
    result = detection or timer.run(
        "detection", lambda: _detect(model, ids, model_name, options, progress)
    )
    data = ReportData(
        model=result.model,
        tokens=int(ids.shape[1]),
        detection=result.to_dict(),
        options=options.to_dict(),
    )
    shown = shown_weights(result, options)
    if shown:
        prompt = ids[:, : options.prompt_tokens]
        timer.run("residual-stream traces", lambda: _traces(model, prompt, shown, options, data))
        data.impact = timer.run(
            "impact (Table 1)", lambda: _impact(model, tokenizer, ids, shown, options, progress)
        )
    if options.quantization:
        data.quantization = timer.run(
            "quantization sweep", lambda: _sweep(model, ids, shown, options, progress)
        )
    if candidate is not None:
        names = (result.model, candidate_name or type(candidate).__name__)
        data.comparison = timer.run(
            "candidate comparison",
            lambda: _comparison(model, candidate, ids, shown, names, options, progress),
        )
    data.timings = timer.timings
    return data


def _check_causal_ids(ids: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"a causal LM's report needs token ids [1, tokens], got {type(ids)}")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(
            f"need token ids [1, tokens] with at least 2 tokens, got {tuple(ids.shape)}"
        )
    return ids


def _detect(
    model: nn.Module,
    ids: torch.Tensor,
    model_name: str | None,
    options: ReportOptions,
    progress: Progress | None,
) -> DetectionResult:
    """Detection on the prompt (the first ``prompt_tokens``), verified on all of ``ids``."""
    from sw_hooks.analysis.detect import run_detection

    return run_detection(
        model,
        ids[:, : options.prompt_tokens],
        calibration=ids,
        model_name=model_name,
        window=options.window,
        stride=options.stride,
        progress=progress,
    )


def _collect_non_causal(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, Any],
    loss: Loss,
    model_name: str | None,
    options: ReportOptions,
    progress: Progress | None,
    candidate: nn.Module | None,
    detection: DetectionResult | None,
) -> ReportData:
    """Detection with the model's own loss, traces and heat maps; nothing perplexity-based."""
    from sw_hooks.analysis.detect import run_detection

    if candidate is not None:
        raise ValueError(
            f"comparing with a candidate needs a causal LM (it measures perplexity and "
            f"next-token KL); {type(model).__name__} is verified with the {loss.name} loss"
        )
    tokens = _check_inputs(inputs)
    prompt = inputs[:, : options.prompt_tokens] if isinstance(inputs, torch.Tensor) else inputs
    shown_weights(detection, options)  # a given result that cannot answer fails first
    timer = _Timer(progress)
    result = detection or timer.run(
        "detection",
        lambda: run_detection(
            model,
            prompt,
            calibration=inputs if isinstance(inputs, torch.Tensor) else None,
            model_name=model_name,
            loss_fn=loss,
            window=options.window,
            progress=progress,
        ),
    )
    data = ReportData(result.model, tokens, result.to_dict(), options=options.to_dict())
    shown = shown_weights(result, options)
    if shown:
        timer.run("residual-stream traces", lambda: _traces(model, prompt, shown, options, data))
    data.timings = timer.timings
    return data


def _check_inputs(inputs: Any) -> int:
    """The number of tokens of ``inputs`` (0 when they are not token ids), or a clear error."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2 or inputs.shape[1] < 2:
            raise ValueError(
                f"need token ids [1, tokens] with at least 2 tokens, got {tuple(inputs.shape)}"
            )
        return int(inputs.shape[1])
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(
            f"need token ids [1, tokens] or a dict of model inputs, got {type(inputs).__name__}"
        )
    ids = inputs.get("input_ids")
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 0


def _traces(
    model: nn.Module,
    prompt: torch.Tensor | Mapping[str, Any],
    shown: Sequence[SuperWeight],
    options: ReportOptions,
    data: ReportData,
) -> None:
    from sw_hooks.analysis.trace import super_activation_trace, weight_patch

    for weight in shown[: options.max_traced]:
        original, ablated = super_activation_trace(model, prompt, weight)
        data.traces.append(
            {
                "super_weight": weight.to_dict(),
                "original": original.to_dict(),
                "ablated": ablated.to_dict(),
            }
        )
        data.patches.append(weight_patch(model, weight, options.radius).to_dict())


def _impact(
    model: nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    shown: Sequence[SuperWeight],
    options: ReportOptions,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    from sw_hooks.analysis.impact import stopword_ids, table1

    stopwords = stopword_ids(tokenizer) if tokenizer is not None else None
    rows = table1(
        model,
        ids,
        shown,
        stopwords=stopwords,
        window=options.window,
        stride=options.stride,
        progress=progress,
    )
    return [row.to_dict() for row in rows]


def _sweep(
    model: nn.Module,
    ids: torch.Tensor,
    shown: Sequence[SuperWeight],
    options: ReportOptions,
    progress: Progress | None,
) -> dict[str, Any]:
    from sw_hooks.analysis.impact import perplexity
    from sw_hooks.quant.sweep import holdout_sweep

    def measure() -> float:
        return perplexity(model, ids, window=options.window, stride=options.stride)

    runs = holdout_sweep(model, options.quantization, shown, measure, progress=progress)
    return {"baseline_perplexity": measure(), "runs": [run.to_dict() for run in runs]}


def _comparison(
    model: nn.Module,
    candidate: nn.Module,
    ids: torch.Tensor,
    shown: Sequence[SuperWeight],
    names: tuple[str, str],
    options: ReportOptions,
    progress: Progress | None,
) -> dict[str, Any]:
    from sw_hooks.analysis.model_comparison import compare_models

    comparison = compare_models(
        model,
        candidate,
        ids,
        shown,
        names=names,
        prompt_tokens=options.prompt_tokens,
        window=options.window,
        stride=options.stride,
        progress=progress,
    )
    return comparison.to_dict()
