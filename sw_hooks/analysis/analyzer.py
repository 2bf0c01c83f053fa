"""``TransformerAnalyzer``: one object over a model, for notebooks and quick looks.

A thin facade: every method calls the functional API (magnitude, record, impact, detect).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.candidates import layer_peaks_of
from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.impact import Comparison, impact
from sw_hooks.analysis.magnitude import find_by_magnitude
from sw_hooks.analysis.options import PROMPT_TOKENS
from sw_hooks.core.locate import find_down_projections, layer_index
from sw_hooks.core.record import record
from sw_hooks.core.results import DetectionResult, LayerPeak, SuperWeight
from sw_hooks.models import calibration_text, load_model, tokenize


class TransformerAnalyzer:
    """Find, measure and inspect super weights of one model.

    Args:
        model_or_id: an ``nn.Module`` (then pass ``tokenizer`` for text methods) or
            anything :func:`~sw_hooks.models.load_model` accepts (``None``: the default).
        tokenizer: the tokenizer, when a model object is given.

    Example:
        >>> analyzer = TransformerAnalyzer(None)  # doctest: +SKIP
        >>> analyzer.detect().verified  # doctest: +SKIP
    """

    def __init__(
        self,
        model_or_id: nn.Module | str | None = None,
        tokenizer: Any = None,
        *,
        max_tokens: int = 512,
    ):
        if isinstance(model_or_id, nn.Module):
            self.model, self.tokenizer = model_or_id, tokenizer
            self.name = type(model_or_id).__name__
        else:
            self.model, self.tokenizer = load_model(model_or_id)
            self.name = str(model_or_id or "default")
        self.max_tokens = max_tokens

    def _ids(self, text: str | torch.Tensor | None) -> torch.Tensor:
        if isinstance(text, torch.Tensor):
            return text
        if self.tokenizer is None:
            raise ValueError("this analyzer has no tokenizer: pass token ids, or a tokenizer")
        return tokenize(
            self.tokenizer, calibration_text() if text is None else text, max_tokens=self.max_tokens
        )

    def find_superweights(
        self,
        threshold: float,
        weight_type: str = "down_proj",
        criterion: str = "percentage",
        layers: Iterable[int] | None = None,
    ) -> list[SuperWeight]:
        """Weights that stand out by magnitude (unverified candidates); see
        :func:`~sw_hooks.analysis.magnitude.find_by_magnitude`."""
        found = find_by_magnitude(
            self.model, threshold, weight_type=weight_type, criterion=criterion, layers=layers
        )
        return [
            SuperWeight(name, layer_index(name), row, col, value) for name, row, col, value in found
        ]

    def evaluate_impact(
        self, text: str | torch.Tensor | None, superweights: Sequence[SuperWeight]
    ) -> Comparison:
        """Perplexity, KL and top-1 agreement with the given weights zeroed."""
        return impact(self.model, self._ids(text), list(superweights))

    def analyze_activations(
        self, text: str | torch.Tensor | None = None, layer_indices: Iterable[int] | None = None
    ) -> list[LayerPeak]:
        """Per-layer max/argmax summaries of the down-projections (never raw tensors)."""
        wanted = None if layer_indices is None else set(layer_indices)
        modules = {
            n: m
            for n, m in find_down_projections(self.model).items()
            if wanted is None or layer_index(n) in wanted
        }
        if not modules:
            raise ValueError(f"no down-projection in layers {sorted(wanted or [])}")
        with record(self.model, modules) as recorder, torch.no_grad():
            self.model(self._ids(text))
        return list(layer_peaks_of(recorder.stats))

    def detect(self, text: str | torch.Tensor | None = None, **options: Any) -> DetectionResult:
        """Activation-based detection with causal verification (:func:`~sw_hooks.analysis.detect.run_detection`)."""
        ids = self._ids(text)
        return run_detection(
            self.model, ids[:, :PROMPT_TOKENS], calibration=ids, model_name=self.name, **options
        )
