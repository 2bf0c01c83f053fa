"""A super-weight report: detection, impact and a small quantization sweep, as figures.

:func:`collect_report` runs the measurements and returns :class:`ReportData` (plain JSON
all the way down); :func:`write_report` draws every figure from that data and writes
``report.md`` with the PNGs beside it, ``report.html`` (one self-contained file, the
figures inside it) and ``report.json`` with every number shown. Given a candidate model
(a quantized or fine-tuned copy), the report also compares the two
(:mod:`sw_hooks.outputs.compare`) and draws both spike profiles. The CLI's
``sw-hooks report`` is these two calls.

Example:
    >>> data = collect_report(model, tokenizer, ids, model_name="my-model")  # doctest: +SKIP
    >>> write_report(data, "out/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.losses import Loss, LossFn, as_loss, is_causal
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.outputs.report_data import (
    REPORT_BLOCK_SIZES,
    REPORT_CLIP,
    REPORT_SCHEMA_VERSION,
    ReportData,
    ReportOptions,
    shown_weights,
)
from sw_hooks.outputs.report_render import render_html, render_markdown
from sw_hooks.outputs.report_sections import FIGURES, report_blocks

__all__ = [
    "FIGURES",
    "REPORT_BLOCK_SIZES",
    "REPORT_CLIP",
    "REPORT_SCHEMA_VERSION",
    "ReportData",
    "ReportOptions",
    "collect_report",
    "markdown",
    "render_figures",
    "write_report",
]

Progress = Callable[[str], None]


class _Timer:
    """Times named stages and reports each start and end through ``progress``."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress or (lambda line: None)
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
            the same tokens (:func:`~sw_hooks.outputs.compare.compare_models`), following the
            report's super weights; checked against ``model`` before any measurement.
        candidate_name: the candidate's name shown.
        loss_fn: what verification measures (default: chosen from the model's class; a
            model without a Hugging Face config is measured as a causal LM).

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> data = collect_report(planted.model, None, planted.calibration_ids())  # doctest: +SKIP
    """
    from sw_hooks.outputs.compare import check_comparable

    options = options or ReportOptions()
    loss = as_loss(model, loss_fn, tokenizer=tokenizer)
    if not is_causal(loss):
        return _collect_non_causal(model, ids, loss, model_name, options, progress, candidate)
    ids = _check_causal_ids(ids)
    if candidate is not None:
        check_comparable(model, candidate, ())
    timer = _Timer(progress)
    result = timer.run("detection", lambda: _detect(model, ids, model_name, options, progress))
    data = ReportData(
        model=result.model,
        tokens=int(ids.shape[1]),
        detection=result.to_dict(),
        options=options.to_dict(),
    )
    shown = shown_weights(result)
    if shown:
        prompt = ids[:, : options.prompt_tokens]
        timer.run("residual-stream traces", lambda: _traces(model, prompt, shown, options, data))
        data.impact = timer.run(
            "impact (Table 1)", lambda: _impact(model, tokenizer, ids, result, options, progress)
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
    timer = _Timer(progress)
    result = timer.run(
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
    shown = shown_weights(result)
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
    result: DetectionResult,
    options: ReportOptions,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    from sw_hooks.analysis.impact import stopword_ids, table1

    stopwords = stopword_ids(tokenizer) if tokenizer is not None else None
    rows = table1(
        model,
        ids,
        shown_weights(result),
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


# --------------------------------------------------------------------------- writing


def _comparison(
    model: nn.Module,
    candidate: nn.Module,
    ids: torch.Tensor,
    shown: Sequence[SuperWeight],
    names: tuple[str, str],
    options: ReportOptions,
    progress: Progress | None,
) -> dict[str, Any]:
    from sw_hooks.outputs.compare import compare_models

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


# --------------------------------------------------------------------------- writing


def render_figures(data: ReportData) -> dict[str, Any]:
    """``{file name: Figure}`` for every figure the data supports, in report order."""
    from sw_hooks.outputs import plots

    result = data.result
    figures: dict[str, Any] = {}
    if result.layer_peaks:
        figures["spikes.png"] = plots.activation_spikes(result.layer_peaks, result)
    if data.traces:
        first = data.traces[0]
        figures["residual.png"] = plots.residual_stream(
            first["original"], first["ablated"], first["super_weight"]
        )
        figures["weights.png"] = plots.weight_heatmaps(data.patches)
    if data.impact:
        figures["impact.png"] = plots.impact_bars(data.impact)
    if data.quantization.get("runs"):
        figures["quantization.png"] = plots.quantization_sweep(data.quantization)
    if data.comparison.get("layers"):
        pairs = data.comparison["layers"]
        figures["spike_profiles.png"] = plots.spike_profiles(
            [pair["original"] for pair in pairs],
            [pair["candidate"] for pair in pairs],
            (data.comparison["original"], data.comparison["candidate"]),
        )
    if data.history:
        figures["history.png"] = plots.monitoring_history(data.history)
    return figures


def write_report(data: ReportData, out: str | Path) -> Path:
    """Write ``report.md`` with the figures as PNGs, ``report.html`` and ``report.json`` into ``out``.

    ``report.html`` holds the same text as ``report.md`` and the PNGs themselves, so it is
    the one file to share.

    Returns:
        The path of ``report.md``.
    """
    from sw_hooks.outputs.plots import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, figure in render_figures(data).items():
        images[name] = save_figure(figure, out / name).read_bytes()
    (out / "report.json").write_text(json.dumps(data.to_dict(), indent=2) + "\n")
    blocks = report_blocks(data, list(images))
    (out / "report.html").write_text(render_html(blocks, images), encoding="utf-8")
    path = out / "report.md"
    path.write_text(render_markdown(blocks), encoding="utf-8")
    return path


def markdown(data: ReportData, figures: Sequence[str]) -> str:
    """The report's Markdown: tables of the numbers and the figures with what each shows."""
    return render_markdown(report_blocks(data, figures))
