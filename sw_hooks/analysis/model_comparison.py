"""Compare a model with a changed copy of it (quantized, fine-tuned, pruned) on the same tokens.

:func:`compare_models` records both models on the same prompt and measures both on the same
text, and returns a :class:`ModelComparison`: per layer, the down-projections' peaks side by
side; per super weight, whether its super activation survived in the candidate (its value
at the same channel and token, and the ratio); and the perplexity of both, the mean
KL(original || candidate) of the next-token distributions and their top-1 agreement.
``sw-hooks compare ORIGINAL CANDIDATE`` is this call.

Example:
    >>> comparison = compare_models(model, quantized, ids, result.verified)  # doctest: +SKIP
    >>> [round(s.ratio, 2) for s in comparison.super_activations]  # doctest: +SKIP
    [0.97]
    >>> comparison.lost(0.5)  # doctest: +SKIP
    ()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.next_token import (
    NextTokenAccumulator,
    NextTokenAgreement,
    _logits,
    _window_batches,
)
from sw_hooks.analysis.options import PROMPT_TOKENS
from sw_hooks.core.devices import execution_device
from sw_hooks.core.progress import Progress, silent
from sw_hooks.core.results import LayerPeak, SuperWeight

COMPARE_SCHEMA_VERSION = 1
DEFAULT_LOST_FRACTION = 0.5
"""A super activation below half of the original's is reported lost."""


@dataclass(frozen=True)
class LayerPair:
    """One down-projection's peaks in the original and in the candidate."""

    original: LayerPeak
    candidate: LayerPeak

    def to_dict(self) -> dict[str, Any]:
        return {"original": self.original.to_dict(), "candidate": self.candidate.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> LayerPair:
        if not isinstance(data, Mapping) or not {"original", "candidate"} <= set(data):
            raise ValueError("a layer pair is a JSON object with 'original' and 'candidate'")
        return cls(LayerPeak.from_dict(data["original"]), LayerPeak.from_dict(data["candidate"]))


@dataclass(frozen=True)
class SuperActivation:
    """A super weight's super activation in both models, at the original's channel and token.

    Attributes:
        super_weight: the weight whose output channel (``row``) carries the activation.
        token: the prompt position where the original's ``|output[row]|`` peaks.
        original, candidate: the signed down-projection output there in each model.
    """

    super_weight: SuperWeight
    token: int
    original: float
    candidate: float

    @property
    def ratio(self) -> float:
        """``candidate / original``: 1.0 kept as is, 0.0 gone, negative flipped; NaN if 0/0."""
        return self.candidate / self.original if self.original != 0 else math.nan

    def lost(self, fraction: float = DEFAULT_LOST_FRACTION) -> bool:
        """The candidate kept less than ``fraction`` of it (NaN counts as lost)."""
        return not self.ratio >= fraction

    def to_dict(self) -> dict[str, Any]:
        return {
            "super_weight": self.super_weight.to_dict(),
            "token": self.token,
            "original": self.original,
            "candidate": self.candidate,
            "ratio": None if math.isnan(self.ratio) else self.ratio,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SuperActivation:
        names = ("super_weight", "token", "original", "candidate")
        if not isinstance(data, Mapping) or not set(names) <= set(data):
            raise ValueError(f"a super activation is a JSON object with {list(names)}")
        weight = SuperWeight.from_dict(dict(data["super_weight"]))
        return cls(weight, int(data["token"]), float(data["original"]), float(data["candidate"]))


@dataclass(frozen=True)
class ModelComparison:
    """Everything :func:`compare_models` measured, in JSON under ``schema_version`` 1.

    Attributes:
        original, candidate: the models' display names.
        tokens: tokens of text measured; prompt_tokens: the first ones, recorded.
        layers: per down-projection, both models' peaks.
        super_activations: per super weight followed, its activation in both models.
        original_perplexity, candidate_perplexity: on the same ``tokens``.
        kl_divergence: mean KL(original || candidate) of next-token distributions, in nats.
        top1_agreement: the share of positions where both predict the same next token.
    """

    original: str
    candidate: str
    tokens: int
    prompt_tokens: int
    layers: tuple[LayerPair, ...]
    super_activations: tuple[SuperActivation, ...]
    original_perplexity: float
    candidate_perplexity: float
    kl_divergence: float
    top1_agreement: float

    def lost(self, fraction: float = DEFAULT_LOST_FRACTION) -> tuple[SuperActivation, ...]:
        """The super activations the candidate kept less than ``fraction`` of."""
        return tuple(s for s in self.super_activations if s.lost(fraction))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": COMPARE_SCHEMA_VERSION,
            "original": self.original,
            "candidate": self.candidate,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "perplexity": {
                "original": self.original_perplexity,
                "candidate": self.candidate_perplexity,
            },
            "kl_divergence": self.kl_divergence,
            "top1_agreement": self.top1_agreement,
            "layers": [pair.to_dict() for pair in self.layers],
            "super_activations": [s.to_dict() for s in self.super_activations],
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelComparison:
        """Read :meth:`to_dict` output back, with an error that names what is wrong."""
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        if version != COMPARE_SCHEMA_VERSION:
            raise ValueError(
                f"not a sw_hooks comparison of schema_version {COMPARE_SCHEMA_VERSION}"
            )
        required = {"original", "candidate", "tokens", "prompt_tokens", "perplexity"}
        missing = sorted((required | {"kl_divergence", "top1_agreement", "layers"}) - set(data))
        if missing:
            raise ValueError(f"comparison JSON lacks {missing}")
        return cls(
            original=str(data["original"]),
            candidate=str(data["candidate"]),
            tokens=int(data["tokens"]),
            prompt_tokens=int(data["prompt_tokens"]),
            layers=tuple(LayerPair.from_dict(pair) for pair in data["layers"]),
            super_activations=tuple(
                SuperActivation.from_dict(s) for s in data.get("super_activations", ())
            ),
            original_perplexity=float(data["perplexity"]["original"]),
            candidate_perplexity=float(data["perplexity"]["candidate"]),
            kl_divergence=float(data["kl_divergence"]),
            top1_agreement=float(data["top1_agreement"]),
        )


# --------------------------------------------------------------------------- checks


def _vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0))


def check_comparable(
    original: nn.Module, candidate: nn.Module, super_weights: Sequence[SuperWeight]
) -> dict[str, nn.Module]:
    """Refuse models that cannot be compared, before any forward; the down-projections.

    The two must share their vocabulary and their down-projections (the same layer
    count, under the same names), and every super weight must lie inside the original.
    """
    from sw_hooks.core.access import oriented_shape
    from sw_hooks.core.locate import find_down_projections

    vocabularies = _vocabulary_size(original), _vocabulary_size(candidate)
    if vocabularies[0] != vocabularies[1]:
        raise ValueError(
            f"the models have different vocabularies ({vocabularies[0]} and "
            f"{vocabularies[1]} tokens): compare needs a candidate made from the original"
        )
    modules = find_down_projections(original)
    others = find_down_projections(candidate)
    if list(modules) != list(others):
        raise ValueError(
            f"the models have different layers ({len(modules)} and {len(others)} "
            "down-projections): compare needs a candidate made from the original"
        )
    for weight in super_weights:
        if weight.expert is not None:
            raise ValueError(f"compare follows dense super weights; {weight.module} is an expert's")
        if weight.module not in modules:
            raise ValueError(f"super weight module {weight.module!r} is not a down-projection")
        rows, cols = oriented_shape(modules[weight.module])
        if weight.row >= rows or weight.col >= cols:
            raise ValueError(
                f"super weight [{weight.row}, {weight.col}] lies outside "
                f"{weight.module}, a [{rows}, {cols}] matrix"
            )
    return modules


# --------------------------------------------------------------------------- recording


@contextmanager
def _output_channels(
    modules: Mapping[str, nn.Module], super_weights: Sequence[SuperWeight]
) -> Iterator[dict[str, torch.Tensor]]:
    """Keep each super weight's output channel over every token of the first sequence."""
    from sw_hooks.core.hooks import HookSet

    kept: dict[str, torch.Tensor] = {}
    rows: dict[str, list[int]] = {}
    for weight in super_weights:
        rows.setdefault(weight.module, []).append(weight.row)

    def keep(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            flat = hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() == 2 else hidden[0]
            kept[name] = flat[:, rows[name]].detach().float().cpu()

        return hook

    with HookSet() as hooks:
        for name in rows:
            hooks.forward(modules[name], keep(name))
        yield kept


def _record_prompt(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    prompt: torch.Tensor,
    super_weights: Sequence[SuperWeight],
) -> tuple[tuple[LayerPeak, ...], dict[str, torch.Tensor]]:
    """One forward on the prompt: every down-projection's peaks and the followed channels."""
    from sw_hooks.analysis.detect import forward_on_device, layer_peaks_of
    from sw_hooks.core.record import record

    with record(model, dict(modules)) as recorder, _output_channels(modules, super_weights) as kept:
        forward_on_device(model, prompt)
    return layer_peaks_of(recorder.stats), kept


def _super_activations(
    super_weights: Sequence[SuperWeight],
    original: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
) -> tuple[SuperActivation, ...]:
    """Each weight's activation at the token where the original's channel peaks."""
    found = []
    seen: dict[str, int] = {}
    for weight in super_weights:
        index = seen.get(weight.module, 0)
        seen[weight.module] = index + 1
        before, after = original[weight.module][:, index], candidate[weight.module][:, index]
        token = int(before.abs().argmax())
        found.append(SuperActivation(weight, token, float(before[token]), float(after[token])))
    return tuple(found)


# --------------------------------------------------------------------------- next tokens


@torch.no_grad()
def next_token_agreement(
    original: nn.Module,
    candidate: nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 512,
    stride: int = 256,
) -> NextTokenAgreement:
    """Perplexity of both and mean KL(original || candidate) and top-1 agreement, per token.

    The windows are those of :func:`sw_hooks.analysis.impact.perplexity`: every token is
    scored once, so each perplexity equals what that function gives for its model alone.
    """
    devices = execution_device(original), execution_device(candidate)
    totals = NextTokenAccumulator()
    for chunk, targets in _window_batches(ids, window, stride):
        base, other = (
            _logits(m, chunk, d) for m, d in zip((original, candidate), devices, strict=True)
        )
        totals.update(base, other.to(base.device), targets.to(base.device, torch.long))
    return totals.result()


# --------------------------------------------------------------------------- the comparison


def compare_models(
    original: nn.Module,
    candidate: nn.Module,
    ids: torch.Tensor,
    super_weights: Sequence[SuperWeight],
    *,
    names: tuple[str, str] | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    window: int = 512,
    stride: int = 256,
    progress: Progress | None = None,
) -> ModelComparison:
    """Record and measure both models on the same tokens; neither model is changed.

    Args:
        original, candidate: causal LMs with the same vocabulary and down-projections.
        ids: token ids ``[1, tokens]``: the first ``prompt_tokens`` are recorded (the
            prompt the super weights' activations are looked for in), all are measured.
        super_weights: the weights to follow (detected on ``original``).
        names: display names of both models (default: their class names).
        window, stride: perplexity windows, as :func:`sw_hooks.analysis.impact.perplexity`.
        progress: called with a line of text as each slow step starts and ends.

    Raises:
        ValueError: for models that differ in vocabulary or layers, a super weight outside
            the original, or fewer than 2 tokens; raised before any forward.
    """
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(
            f"need token ids [1, tokens] with at least 2 tokens, got {tuple(ids.shape)}"
        )
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be at least 1, got {prompt_tokens}")
    say = progress or silent
    modules = check_comparable(original, candidate, super_weights)
    candidate_modules = check_comparable(candidate, candidate, ())
    prompt = ids[:, :prompt_tokens]
    say("recording both models ...")
    original_peaks, original_kept = _record_prompt(original, modules, prompt, super_weights)
    candidate_peaks, candidate_kept = _record_prompt(
        candidate, candidate_modules, prompt, super_weights
    )
    say(f"measuring both models on {ids.shape[1]} tokens ...")
    agreement = next_token_agreement(original, candidate, ids, window=window, stride=stride)
    say("measuring: done")
    original_name, candidate_name = names or (type(original).__name__, type(candidate).__name__)
    return ModelComparison(
        original=original_name,
        candidate=candidate_name,
        tokens=int(ids.shape[1]),
        prompt_tokens=int(prompt.shape[1]),
        layers=tuple(LayerPair(a, b) for a, b in zip(original_peaks, candidate_peaks, strict=True)),
        super_activations=_super_activations(super_weights, original_kept, candidate_kept),
        original_perplexity=agreement.perplexity,
        candidate_perplexity=agreement.other_perplexity,
        kl_divergence=agreement.kl_divergence,
        top1_agreement=agreement.top1_agreement,
    )
