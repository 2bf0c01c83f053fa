"""What a report says, in order, as blocks of text, tables and figures, before any format.

:func:`report_blocks` turns :class:`~sw_hooks.analysis.report_data.ReportData` into
:data:`Block` objects; :mod:`sw_hooks.outputs.report_render` writes the same blocks as
Markdown and as HTML, so the two files never say different things.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sw_hooks.analysis.report_data import ReportData
from sw_hooks.core.results import DetectionResult
from sw_hooks.outputs.tables import (
    Code,
    Table,
    measured_on,
    screened_note,
    super_experts_table,
    weights_table,
)


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class FigureBlock:
    """A figure file (``spikes.png``) and the caption that says what it shows."""

    name: str
    caption: str


Block = Heading | Paragraph | Table | FigureBlock

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
    "spike_profiles.png": "Max |output| of each layer's down-projection in the original and the "
    "candidate model on the same tokens (log scale); the layer that changed most is circled.",
}


def report_blocks(data: ReportData, figures: Sequence[str]) -> list[Block]:
    """The report's content in order: tables of the numbers, each figure with its caption."""
    result = data.result
    prompt = min(data.tokens, int(data.options.get("prompt_tokens", data.tokens)))
    loss = _own_loss(result)
    blocks: list[Block | None] = [Heading(f"Super weights of {data.model}")]
    if loss is None:
        blocks.append(
            Paragraph(
                f"{data.tokens} tokens of text: detection records spikes on the first "
                f"{prompt}; perplexity is measured on all of them."
            )
        )
    else:
        blocks += _non_causal_intro(data, loss)
    if result.baseline_perplexity:
        blocks.append(Paragraph(f"Baseline perplexity {result.baseline_perplexity:.2f}."))
    said = [line for line in (measured_on(result), screened_note(result)) if line]
    if said:
        blocks.append(Paragraph(" ".join(line[0].upper() + line[1:] + "." for line in said)))
    blocks.append(weights_table(result, loss))
    if result.super_experts:
        blocks += _super_experts_table(result)
    shown = set(figures)
    for name in ("spikes.png", "residual.png"):
        if name in shown:
            blocks.append(FigureBlock(name, FIGURES[name]))
    if "residual.png" in shown:
        blocks.append(_trace_summary(data))
    if "weights.png" in shown:
        blocks.append(FigureBlock("weights.png", FIGURES["weights.png"]))
    if data.impact:
        blocks += [_figure_if("impact.png", shown), _impact_table(data.impact)]
    if data.quantization.get("runs"):
        blocks += [_figure_if("quantization.png", shown), *_quantization(data.quantization)]
    if data.comparison:
        blocks += _comparison(data.comparison, shown)
    if "history.png" in shown:
        blocks.append(FigureBlock("history.png", FIGURES["history.png"]))
    if data.timings:
        total = sum(data.timings.values())
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in data.timings.items())
        blocks.append(Paragraph(f"Measured in {total:.0f} s ({stages})."))
    return [block for block in blocks if block is not None]


def _figure_if(name: str, shown: set[str]) -> FigureBlock | None:
    return FigureBlock(name, FIGURES[name]) if name in shown else None


LEFT_OUT_FOR_NON_CAUSAL = (
    "Table 1 and the quantization sweep are left out: they measure perplexity and "
    "next-token probabilities, which only a causal LM has."
)


def _own_loss(result: DetectionResult) -> str | None:
    """The loss detection verified with when it is not a causal LM's perplexity."""
    loss = result.options.get("loss")
    return str(loss) if loss is not None else None


def _non_causal_intro(data: ReportData, loss: str) -> list[Block]:
    inputs = f"{data.tokens} tokens of input" if data.tokens else "the inputs given"
    return [
        Paragraph(
            f"Detection records spikes on {inputs} and measures each candidate's impact with "
            f"the model's own loss, {loss} (1: the weight changes nothing)."
        ),
        Paragraph(LEFT_OUT_FOR_NON_CAUSAL),
    ]


def _super_experts_table(result: DetectionResult) -> list[Block]:
    """Whole experts whose output is massive, each verified by pruning its routing."""
    return [
        Heading("Super experts"),
        Paragraph(
            "Whole experts whose down-projection output stands above the others' (arXiv "
            "2507.23279), each measured with its routing pruned."
        ),
        super_experts_table(result),
    ]


def _trace_summary(data: ReportData) -> Paragraph:
    first = data.traces[0]
    original, ablated = first["original"], first["ablated"]
    layer = first["super_weight"]["layer"]
    at = original["layers"].index(layer) if layer in original["layers"] else 0
    return Paragraph(
        f"Channel {original['channel']} at token {original['token']}: after layer "
        f"{original['layers'][at]} {original['magnitudes'][at]:.1f} as is, "
        f"{ablated['magnitudes'][at]:.1f} with the super weight zeroed; after the last layer "
        f"{original['magnitudes'][-1]:.1f} and {ablated['magnitudes'][-1]:.1f}."
    )


def _impact_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    header = ("condition", "perplexity", "ratio", "KL", "top-1 agreement")
    body = tuple(
        (
            r["condition"],
            f"{r['perplexity']:.2f}",
            f"x{r['ratio']:.2f}",
            f"{r['kl_divergence']:.3f}",
            f"{r['top1_agreement']:.3f}",
            f"{r['stopword_mass']:.3f}" if r["stopword_mass"] is not None else "-",
            str(r["weights_changed"]),
        )
        for r in rows
    )
    numeric = (False, True, True, True, True, True, True)
    return Table((*header, "stopword probability", "weights changed"), numeric, body)


def _quantization(sweep: Mapping[str, Any]) -> list[Block]:
    pairs: dict[tuple[int, int, str], dict[bool, float]] = {}
    for r in sweep["runs"]:
        key = (r["bits"], r["block_size"], r["clip"])
        pairs.setdefault(key, {})[r["holdout"]] = r["perplexity"]
    rows = tuple(
        (str(bits), str(size), str(clip), f"{value[False]:.2f}", f"{value[True]:.2f}")
        for (bits, size, clip), value in pairs.items()
    )
    header = ("bits", "block", "clip", "no holdout", "super weights held out")
    return [
        Paragraph(f"Unquantized perplexity {sweep['baseline_perplexity']:.2f}."),
        Table(header, (True, True, False, True, True), rows),
    ]


def _comparison(comparison: Mapping[str, Any], shown: set[str]) -> list[Block | None]:
    perplexity = comparison["perplexity"]
    rows = tuple(
        (
            Code(s["super_weight"]["module"]),
            f"[{s['super_weight']['row']}, {s['super_weight']['col']}]",
            str(s["token"]),
            f"{s['original']:.2f}",
            f"{s['candidate']:.2f}",
            f"{s['ratio']:.3f}" if s["ratio"] is not None else "-",
        )
        for s in comparison["super_activations"]
    )
    header = ("module", "[row, col]", "token", "original", "candidate", "ratio")
    return [
        Heading(f"Against the candidate {comparison['candidate']}"),
        Paragraph(
            f"Perplexity {perplexity['original']:.2f} (original) and "
            f"{perplexity['candidate']:.2f} (candidate); mean KL(original || candidate) "
            f"{comparison['kl_divergence']:.4f} nats; top-1 agreement "
            f"{comparison['top1_agreement']:.3f}."
        ),
        _figure_if("spike_profiles.png", shown),
        Table(header, (False, False, True, True, True, True), rows) if rows else None,
    ]
