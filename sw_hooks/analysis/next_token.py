"""Next-token measurements shared by every comparison: windows, perplexity, KL and top-1.

Perplexity uses torchmetrics' ``Perplexity`` over sliding windows: each window scores
only the tokens the previous one did not, with up to ``window - stride`` tokens of
context before them. :class:`NextTokenAccumulator` is the one place where two models'
(or one model's, masked and not) next-token predictions are compared: the masked
comparison of :mod:`sw_hooks.analysis.impact` and the two-model comparison of
:mod:`sw_hooks.analysis.model_comparison` both add their logits to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.text import Perplexity

IGNORE_INDEX = -100


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int, torch.int32):
        raise TypeError("token ids must be an integer tensor of shape [batch, tokens]")
    ids = ids if ids.dim() == 2 else ids.reshape(1, -1)
    if ids.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {ids.shape[1]}")
    return ids


def windows(length: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, scored_from)`` spans covering ``range(length)``, each token scored once."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got {window}, {stride}")
    scored_until = 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        yield begin, end, max(scored_until, begin + 1) - begin
        scored_until = end
        if end == length:
            return


def _window_batches(
    ids: torch.Tensor, window: int, stride: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, next-token targets with unscored positions ignored)`` per window."""
    for begin, end, scored_from in windows(ids.shape[1], window, stride):
        chunk = ids[:, begin:end]
        targets = chunk[:, 1:].clone()
        targets[:, : max(scored_from - 1, 0)] = IGNORE_INDEX
        yield chunk, targets


def _logits(model: nn.Module, chunk: torch.Tensor, device: torch.device) -> torch.Tensor:
    output = model(chunk.to(device))
    logits = output.logits if hasattr(output, "logits") else output
    return logits[:, :-1].float()


def perplexity_metric(logits: torch.Tensor) -> Perplexity:
    """A torchmetrics ``Perplexity`` that lives on the device of ``logits``.

    Its running sums are added to in place at every update, which fails when they sit on
    another device than the logits (a model on an accelerator, a metric on the CPU).
    """
    return Perplexity(ignore_index=IGNORE_INDEX).to(logits.device)


@dataclass(frozen=True)
class NextTokenAgreement:
    """A reference's and another's next-token predictions on the same tokens.

    Attributes:
        perplexity, other_perplexity: of the reference and of the other.
        kl_divergence: mean KL(reference || other) per scored token, in nats.
        top1_agreement: the share of scored tokens where both predict the same token.
        stopword_mass, other_stopword_mass: mean probability put on the stopword ids
            (``None`` when none were given).
    """

    perplexity: float
    other_perplexity: float
    kl_divergence: float
    top1_agreement: float
    stopword_mass: float | None = None
    other_stopword_mass: float | None = None


class NextTokenAccumulator:
    """Running sums comparing a reference's logits with another's (pure tensor updates).

    The perplexity metrics are made at the first update, on the logits' device.

    Example:
        >>> logits = torch.randn(1, 4, 10)
        >>> targets = torch.tensor([[1, 2, 3, 4]])
        >>> totals = NextTokenAccumulator()
        >>> totals.update(logits, logits, targets)
        >>> result = totals.result()
        >>> result.kl_divergence, result.top1_agreement
        (0.0, 1.0)
    """

    def __init__(self, stopword_ids: Sequence[int] | None = None):
        self._perplexities: tuple[Perplexity, Perplexity] | None = None
        self.stopword_ids = torch.tensor(list(stopword_ids)) if stopword_ids else None
        self.tokens = 0
        self.kl = self.agree = self.stop_reference = self.stop_other = 0.0

    def update(self, reference: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one window: logits ``[batch, tokens, vocab]`` of both, targets ``[batch, tokens]``."""
        if self._perplexities is None:
            self._perplexities = perplexity_metric(reference), perplexity_metric(other)
            if self.stopword_ids is not None:
                self.stopword_ids = self.stopword_ids.to(reference.device)
        self._perplexities[0].update(reference, targets)
        self._perplexities[1].update(other, targets)
        scored = targets != IGNORE_INDEX
        reference_logp = reference.log_softmax(-1)[scored]
        other_logp = other.log_softmax(-1)[scored]
        self.tokens += int(scored.sum())
        self.kl += float((reference_logp.exp() * (reference_logp - other_logp)).sum())
        self.agree += float((reference_logp.argmax(-1) == other_logp.argmax(-1)).sum())
        if self.stopword_ids is not None:
            self.stop_reference += float(reference_logp.exp()[:, self.stopword_ids].sum())
            self.stop_other += float(other_logp.exp()[:, self.stopword_ids].sum())

    def result(self) -> NextTokenAgreement:
        if self._perplexities is None:
            raise ValueError("no logits were added to this comparison")
        n = max(self.tokens, 1)
        has_stop = self.stopword_ids is not None
        return NextTokenAgreement(
            float(self._perplexities[0].compute()),
            float(self._perplexities[1].compute()),
            self.kl / n,
            self.agree / n,
            self.stop_reference / n if has_stop else None,
            self.stop_other / n if has_stop else None,
        )
