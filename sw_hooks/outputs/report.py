"""A super-weight report: detection, impact and a small quantization sweep, as figures.

:func:`collect_report` runs the measurements and returns :class:`ReportData` (plain JSON
all the way down); :func:`write_report` draws every figure from that data and writes
``report.md``, the PNGs beside it, and ``report.json`` with every number shown. The CLI's
``sw-hooks report`` is these two calls.

Example:
    >>> data = collect_report(model, tokenizer, ids, model_name="my-model")  # doctest: +SKIP
    >>> write_report(data, "out/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.quant.config import QuantConfig, ZScoreClip, quant_grid

Progress = Callable[[str], None]
REPORT_SCHEMA_VERSION = 2
"""2: the layer peaks live in ``detection`` (version 1 kept a copy beside it; still read)."""


REPORT_BLOCK_SIZES = (128, 1024, 4096)
REPORT_CLIP = ZScoreClip(6.0)


@dataclass(frozen=True)
class ReportOptions:
    """What a report measures; the defaults finish on SmolLM2-135M in minutes on 2 cores.

    Attributes:
        prompt_tokens: tokens recorded for detection (the start of the text).
        quantization: the sweep's settings, each run with and without the super weights
            held out; ``()``: no sweep. Default: 4 bits at block sizes 128, 1024 and 4096
            with ``zscore:6`` clipping (build others with :func:`~sw_hooks.quant.config.quant_grid`).
        radius: the weight heat map shows ``2 * radius + 1`` rows and columns.
        window, stride: perplexity windows.
        max_traced: at most this many super weights get a residual-stream trace and a heat map.

    Example:
        >>> from sw_hooks.quant.config import quant_grid
        >>> options = ReportOptions(quantization=quant_grid([3], [64, 1024], ["zscore:6"]))
        >>> [config.block_size for config in options.quantization]
        [64, 1024]
    """

    prompt_tokens: int = 128
    quantization: tuple[QuantConfig, ...] = quant_grid([4], REPORT_BLOCK_SIZES, [REPORT_CLIP])
    radius: int = 8
    window: int = 512
    stride: int = 256
    max_traced: int = 3

    def __post_init__(self) -> None:
        if self.prompt_tokens < 2 or self.radius < 0 or self.max_traced < 1:
            raise ValueError("prompt_tokens >= 2, radius >= 0 and max_traced >= 1 are required")
        configs = tuple(self.quantization)
        if not all(isinstance(config, QuantConfig) for config in configs):
            raise ValueError("quantization takes QuantConfig objects, e.g. quant_grid(...)")
        object.__setattr__(self, "quantization", configs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: each quantization config as :meth:`QuantConfig.to_dict`."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**fields, "quantization": [config.to_dict() for config in self.quantization]}


@dataclass
class ReportData:
    """Every number a report shows, in plain JSON-ready form.

    Attributes:
        model: the model's display name; tokens: tokens of text measured.
        detection: :meth:`DetectionResult.to_dict`, with the layer peaks the spikes figure
            draws (read them as :attr:`layer_peaks`).
        traces: per traced super weight, ``{"super_weight", "original", "ablated"}``.
        patches: :func:`sw_hooks.analysis.trace.weight_patch` windows as dicts.
        impact: :func:`sw_hooks.analysis.impact.table1` rows as dicts (empty with no super weight).
        quantization: ``{"baseline_perplexity", "runs"}``.
        history: optional monitoring rows (``{name: value}``, with ``step``).
        options: the :class:`ReportOptions` used, as a dict.
        timings: seconds per stage.
    """

    model: str
    tokens: int
    detection: dict[str, Any]
    traces: list[dict[str, Any]] = field(default_factory=list)
    patches: list[dict[str, Any]] = field(default_factory=list)
    impact: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> ReportData:
        """Read :meth:`to_dict` output (or a version 1 report) back, with a clear error."""
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        if version not in (1, REPORT_SCHEMA_VERSION):
            raise ValueError(
                f"not a sw_hooks report of schema_version 1 or {REPORT_SCHEMA_VERSION}"
            )
        required = {"model", "tokens", "detection"} | ({"layer_peaks"} if version == 1 else set())
        missing = required - set(data)
        if missing:
            raise ValueError(f"report JSON lacks {sorted(missing)}")
        detection = dict(data["detection"]) if isinstance(data["detection"], Mapping) else None
        if version == 1 and detection is not None:
            detection.setdefault("layer_peaks", data["layer_peaks"])
        DetectionResult.from_dict(detection)  # checks the detection part
        names = set(cls.__dataclass_fields__)
        return cls(**{**{k: v for k, v in data.items() if k in names}, "detection": detection})

    @property
    def result(self) -> DetectionResult:
        return DetectionResult.from_dict(self.detection)

    @property
    def layer_peaks(self) -> list[dict[str, Any]]:
        """Detection's first-pass peaks per down-projection, as JSON rows."""
        return [peak.to_dict() for peak in self.result.layer_peaks]


def _shown(result: DetectionResult) -> list[SuperWeight]:
    """The weights the report is about: the verified ones, else every candidate."""
    return list(result.verified or result.super_weights)


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
    ids: torch.Tensor,
    *,
    model_name: str | None = None,
    options: ReportOptions | None = None,
    progress: Progress | None = None,
) -> ReportData:
    """Detect, measure impact and sweep quantization: every number a report needs.

    Args:
        model: a causal LM; it is left as it was found (every mask is restored).
        tokenizer: used for the stopword ids; ``None`` skips the stopword shift.
        ids: token ids ``[1, tokens]``: the prompt is their start, the rest is for perplexity.
        model_name: the name shown; options: see :class:`ReportOptions`.
        progress: called with a line of text as each stage starts and ends.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> data = collect_report(planted.model, None, planted.calibration_ids())  # doctest: +SKIP
    """
    from sw_hooks.analysis.detect import run_detection

    options = options or ReportOptions()
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(
            f"need token ids [1, tokens] with at least 2 tokens, got {tuple(ids.shape)}"
        )
    timer = _Timer(progress)
    prompt = ids[:, : options.prompt_tokens]
    result = timer.run(
        "detection",
        lambda: run_detection(
            model,
            prompt,
            calibration=ids,
            model_name=model_name,
            window=options.window,
            stride=options.stride,
            progress=progress,
        ),
    )
    data = ReportData(
        model=result.model,
        tokens=int(ids.shape[1]),
        detection=result.to_dict(),
        options=options.to_dict(),
    )
    shown = _shown(result)
    if shown:
        timer.run("residual-stream traces", lambda: _traces(model, prompt, shown, options, data))
        data.impact = timer.run(
            "impact (Table 1)", lambda: _impact(model, tokenizer, ids, result, options, progress)
        )
    if options.quantization:
        data.quantization = timer.run(
            "quantization sweep", lambda: _sweep(model, ids, shown, options, progress)
        )
    data.timings = timer.timings
    return data


def _traces(
    model: nn.Module,
    prompt: torch.Tensor,
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
        _shown(result),
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
    from sw_hooks.quant.quantize import holdout_sweep

    def measure() -> float:
        return perplexity(model, ids, window=options.window, stride=options.stride)

    runs = holdout_sweep(model, options.quantization, shown, measure, progress=progress)
    return {"baseline_perplexity": measure(), "runs": [run.to_dict() for run in runs]}


# --------------------------------------------------------------------------- writing


FIGURES = {
    "spikes.png": "Max |input| and |output| of each layer's down-projection (log scale), "
    "the paper's Figure 2. Verified super weights are marked red with their channel, "
    "unverified candidates grey.",
    "residual.png": "The super activation's channel, at its token, after every layer: as is, "
    "and with the super weight zeroed.",
    "weights.png": "|w| of the down-projection around each super weight (log colour), the "
    "super weight boxed in red, with its value and how far it stands above the median |w| "
    "of the window.",
    "impact.png": "Perplexity and mean next-token probability on stopwords under the paper's "
    "Table 1 conditions: the original model; the super weights zeroed (red); as many of the "
    "largest other weights zeroed per matrix; the super weights zeroed with the super "
    "activation written back.",
    "quantization.png": "Perplexity after 1-D block round-to-nearest weight quantization against "
    "block size, with and without the super weights held out in full precision.",
    "history.png": "The super activation and the super weight's value over training steps, as "
    "logged by the Lightning SuperWeightMonitor.",
}


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
    if data.history:
        figures["history.png"] = plots.monitoring_history(data.history)
    return figures


def write_report(data: ReportData, out: str | Path) -> Path:
    """Write ``report.md``, ``report.json`` and the figures as PNGs into ``out``.

    Returns:
        The path of ``report.md``.
    """
    from sw_hooks.outputs.plots import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = render_figures(data)
    for name, figure in figures.items():
        save_figure(figure, out / name)
    (out / "report.json").write_text(json.dumps(data.to_dict(), indent=2) + "\n")
    path = out / "report.md"
    path.write_text(markdown(data, list(figures)))
    return path


def markdown(data: ReportData, figures: Sequence[str]) -> str:
    """The report's Markdown: tables of the numbers and the figures with what each shows."""
    result = data.result
    lines = [f"# Super weights of {data.model}", ""]
    prompt = min(data.tokens, int(data.options.get("prompt_tokens", data.tokens)))
    lines += [
        f"{data.tokens} tokens of text: detection records spikes on the first {prompt}; "
        "perplexity is measured on all of them.",
        "",
    ]
    lines += _weights_table(result)
    if "spikes.png" in figures:
        lines += _figure("spikes.png")
    if "residual.png" in figures:
        lines += _figure("residual.png")
        lines += _trace_table(data)
    if "weights.png" in figures:
        lines += _figure("weights.png")
    if data.impact:
        lines += _figure("impact.png") + _impact_table(data.impact)
    if data.quantization.get("runs"):
        lines += _figure("quantization.png") + _quantization_table(data.quantization)
    if "history.png" in figures:
        lines += _figure("history.png")
    if data.timings:
        total = sum(data.timings.values())
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in data.timings.items())
        lines += [f"Measured in {total:.0f} s ({stages}).", ""]
    return "\n".join(lines)


def _figure(name: str) -> list[str]:
    return [f"![{name[:-4]}]({name})", "", FIGURES[name], ""]


def _weights_table(result: DetectionResult) -> list[str]:
    lines = [
        f"Baseline perplexity {result.baseline_perplexity:.2f}."
        if result.baseline_perplexity
        else "",
        "",
        "| layer | module | [row, col] | weight | input act. | output act. | token | impact | verdict |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for w in result.super_weights:
        impact = f"x{w.impact:.2f}" if w.impact is not None else "-"
        lines.append(
            f"| {w.layer} | `{w.module}` | [{w.row}, {w.col}] | {w.value:.4g} | "
            f"{w.input_activation:.1f} | {w.output_activation:.1f} | {w.token_position} | {impact} | {w.verdict} |"
        )
    if not result.super_weights:
        lines.append("| - | no spike pairs found | | | | | | | |")
    return lines + [""]


def _trace_table(data: ReportData) -> list[str]:
    first = data.traces[0]
    original, ablated = first["original"], first["ablated"]
    layer = first["super_weight"]["layer"]
    at = original["layers"].index(layer) if layer in original["layers"] else 0
    return [
        f"Channel {original['channel']} at token {original['token']}: after layer "
        f"{original['layers'][at]} {original['magnitudes'][at]:.1f} as is, "
        f"{ablated['magnitudes'][at]:.1f} with the super weight zeroed; after the last layer "
        f"{original['magnitudes'][-1]:.1f} and {ablated['magnitudes'][-1]:.1f}.",
        "",
    ]


def _impact_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| condition | perplexity | ratio | KL | top-1 agreement | stopword probability | weights changed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        stop = f"{r['stopword_mass']:.3f}" if r["stopword_mass"] is not None else "-"
        lines.append(
            f"| {r['condition']} | {r['perplexity']:.2f} | x{r['ratio']:.2f} | {r['kl_divergence']:.3f} | "
            f"{r['top1_agreement']:.3f} | {stop} | {r['weights_changed']} |"
        )
    return lines + [""]


def _quantization_table(sweep: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Unquantized perplexity {sweep['baseline_perplexity']:.2f}.",
        "",
        "| bits | block | clip | no holdout | super weights held out |",
        "| ---: | ---: | --- | ---: | ---: |",
    ]
    pairs: dict[tuple[int, int, str], dict[bool, float]] = {}
    for r in sweep["runs"]:
        pairs.setdefault((r["bits"], r["block_size"], r["clip"]), {})[r["holdout"]] = r[
            "perplexity"
        ]
    for (bits, size, clip), value in pairs.items():
        lines.append(f"| {bits} | {size} | {clip} | {value[False]:.2f} | {value[True]:.2f} |")
    return lines + [""]
