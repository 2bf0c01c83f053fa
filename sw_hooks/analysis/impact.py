"""What a mask does to a model: perplexity, KL, top-1 agreement, stopword shift, Table 1.

Perplexity uses torchmetrics' ``Perplexity`` over sliding windows: each window scores
only the tokens the previous one did not, with up to ``window - stride`` tokens of
context before them.

Inputs go to the model's execution device (:func:`sw_hooks.core.devices.execution_device`, right
for accelerate-offloaded models too) and every metric lives on the logits' device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchmetrics.text import Perplexity

from sw_hooks.analysis.losses import Batch, Loss, LossFn, as_loss, is_causal
from sw_hooks.analysis.magnitude import largest_weights
from sw_hooks.core.devices import execution_device
from sw_hooks.core.masks import ablate, restore_activation
from sw_hooks.core.results import SuperWeight

IGNORE_INDEX = -100
STOPWORDS: tuple[str, ...] = (" the", ".", ",", " a", " and", " of", " to", "\n", " is", " in")

MaskFactory = Callable[[], AbstractContextManager]


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


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, *, window: int = 512, stride: int = 256
) -> float:
    """Perplexity of ``model`` on token ids ``[batch, tokens]``, over sliding windows.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> round(perplexity(planted.model, planted.calibration_ids()), 1)  # doctest: +SKIP
        72.8
    """
    ids = _check_ids(ids)
    device = execution_device(model)
    metric: Perplexity | None = None
    for chunk, targets in _window_batches(ids, window, stride):
        logits = _logits(model, chunk, device)
        metric = metric if metric is not None else perplexity_metric(logits)
        metric.update(logits, targets.to(logits.device, torch.long))
    assert metric is not None  # _check_ids guarantees at least one window
    return float(metric.compute())


@dataclass(frozen=True)
class Comparison:
    """The model with and without a mask, on the same tokens."""

    perplexity: float
    masked_perplexity: float
    kl_divergence: float
    top1_agreement: float
    stopword_mass: float | None
    masked_stopword_mass: float | None

    @property
    def ratio(self) -> float:
        return self.masked_perplexity / self.perplexity

    def to_dict(self) -> dict[str, float | None]:
        return {**asdict(self), "ratio": self.ratio}


class _Accumulator:
    """Running sums for the comparison metrics (pure tensor updates, no model calls).

    The perplexity metrics are made at the first update, on the logits' device.
    """

    def __init__(self, stopword_ids: Sequence[int] | None):
        self._base: Perplexity | None = None
        self._masked: Perplexity | None = None
        self.stopword_ids = torch.tensor(list(stopword_ids)) if stopword_ids else None
        self.tokens = 0
        self.kl = self.agree = self.stop_base = self.stop_masked = 0.0

    @property
    def base(self) -> Perplexity:
        if self._base is None:
            raise ValueError("no logits were added to this comparison")
        return self._base

    @property
    def masked(self) -> Perplexity:
        if self._masked is None:
            raise ValueError("no logits were added to this comparison")
        return self._masked

    def update(self, base: torch.Tensor, masked: torch.Tensor, targets: torch.Tensor) -> None:
        if self._base is None or self._masked is None:
            self._base, self._masked = perplexity_metric(base), perplexity_metric(masked)
            if self.stopword_ids is not None:
                self.stopword_ids = self.stopword_ids.to(base.device)
        self.base.update(base, targets)
        self.masked.update(masked, targets)
        scored = targets != IGNORE_INDEX
        base_logp, masked_logp = base.log_softmax(-1)[scored], masked.log_softmax(-1)[scored]
        self.tokens += int(scored.sum())
        self.kl += float((base_logp.exp() * (base_logp - masked_logp)).sum())
        self.agree += float((base_logp.argmax(-1) == masked_logp.argmax(-1)).sum())
        if self.stopword_ids is not None:
            self.stop_base += float(base_logp.exp()[:, self.stopword_ids].sum())
            self.stop_masked += float(masked_logp.exp()[:, self.stopword_ids].sum())

    def result(self) -> Comparison:
        n = max(self.tokens, 1)
        has_stop = self.stopword_ids is not None
        return Comparison(
            float(self.base.compute()),
            float(self.masked.compute()),
            self.kl / n,
            self.agree / n,
            self.stop_base / n if has_stop else None,
            self.stop_masked / n if has_stop else None,
        )


def _enter(masks: Sequence[MaskFactory]) -> ExitStack:
    stack = ExitStack()
    for factory in masks:
        stack.enter_context(factory())
    return stack


def _as_list(masks: MaskFactory | Sequence[MaskFactory]) -> list[MaskFactory]:
    return [masks] if callable(masks) else list(masks)


@torch.no_grad()
def compare_many(
    model: nn.Module,
    ids: torch.Tensor,
    conditions: dict[str, MaskFactory | Sequence[MaskFactory]],
    *,
    stopword_ids: Sequence[int] | None = None,
    window: int = 512,
    stride: int = 256,
) -> dict[str, Comparison]:
    """:func:`compare` for several conditions, running the unmasked model once per window.

    A condition with no masks is the unmasked model itself (no second forward pass).
    """
    ids = _check_ids(ids)
    masks = {name: _as_list(m) for name, m in conditions.items()}
    totals = {name: _Accumulator(stopword_ids) for name in conditions}
    device = execution_device(model)
    for chunk, targets in _window_batches(ids, window, stride):
        base = _logits(model, chunk, device)
        targets = targets.to(base.device)
        for name, factories in masks.items():
            if not factories:
                totals[name].update(base, base, targets)
                continue
            with _enter(factories):
                masked = _logits(model, chunk, device)
            totals[name].update(base, masked, targets)
    return {name: total.result() for name, total in totals.items()}


def compare(
    model: nn.Module,
    ids: torch.Tensor,
    masks: MaskFactory | Sequence[MaskFactory],
    *,
    stopword_ids: Sequence[int] | None = None,
    window: int = 512,
    stride: int = 256,
) -> Comparison:
    """Run each window with and without the mask(s) and compare the next-token predictions.

    ``masks`` are factories of context managers (``lambda: ablate(model, weights)``) so a
    mask is entered and left around every window: the model is whole between windows and
    after the call, even if it raises.

    Example:
        >>> result = compare(model, ids, lambda: ablate(model, weights))  # doctest: +SKIP
        >>> result.ratio, result.kl_divergence, result.top1_agreement  # doctest: +SKIP
    """
    return compare_many(
        model, ids, {"masked": masks}, stopword_ids=stopword_ids, window=window, stride=stride
    )["masked"]


def stopword_ids(tokenizer: object, words: Sequence[str] = STOPWORDS) -> list[int]:
    """Token ids of common stopwords that encode to a single token with this tokenizer."""
    ids = []
    for word in words:
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if len(encoded) == 1:
            ids.append(int(encoded[0]))
    return sorted(set(ids))


@dataclass(frozen=True)
class ImpactRow:
    """One row of the paper's Table 1."""

    condition: str
    perplexity: float
    ratio: float
    kl_divergence: float
    top1_agreement: float
    stopword_mass: float | None
    weights_changed: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def table1(
    model: nn.Module,
    ids: torch.Tensor,
    super_weights: Sequence[SuperWeight],
    *,
    outliers_per_matrix: int = 1,
    stopwords: Sequence[int] | None = None,
    window: int = 512,
    stride: int = 256,
    progress: Callable[[str], None] | None = None,
) -> list[ImpactRow]:
    """The paper's Table 1 on any model: original; super weights pruned; the same number of
    the largest *other* weights per matrix pruned; super weights pruned with the super
    activation restored (left out for weights inside experts, where
    :func:`~sw_hooks.core.masks.restore_activation` cannot act).

    ``outliers_per_matrix`` is how many of the largest non-super weights to zero in every
    decoder linear weight (the paper's code zeroes the top 1e-6 of each matrix).
    """
    if not super_weights:
        raise ValueError("table1() needs at least one super weight")
    outliers = largest_weights(model, outliers_per_matrix, exclude=super_weights)
    conditions: list[tuple[str, Sequence[MaskFactory], int]] = [
        ("original", [], 0),
        ("super weights pruned", [lambda: ablate(model, super_weights)], len(super_weights)),
        ("non-super outliers pruned", [lambda: ablate(model, outliers)], len(outliers)),
    ]
    # An expert's output is mixed with the others' before any module returns it, so a
    # super activation inside experts cannot be written back: that row is left out.
    if all(w.expert is None for w in super_weights):
        conditions.append(
            (
                "super weights pruned, super activation restored",
                [
                    lambda: ablate(model, super_weights),
                    lambda: restore_activation(model, super_weights),
                ],
                len(super_weights),
            )
        )
    if progress:
        progress(f"impact: {len(conditions)} conditions over {ids.shape[-1]} tokens")
    results = compare_many(
        model,
        ids,
        {name: masks for name, masks, _ in conditions},
        stopword_ids=stopwords,
        window=window,
        stride=stride,
    )
    rows = []
    for name, _, changed in conditions:
        r = results[name]
        rows.append(
            ImpactRow(
                name,
                r.masked_perplexity,
                r.ratio,
                r.kl_divergence,
                r.top1_agreement,
                r.masked_stopword_mass,
                changed,
            )
        )
    return rows


@dataclass(frozen=True)
class LossComparison:
    """The model with and without a mask under a loss that is not a causal LM's perplexity."""

    loss: str
    baseline: float
    masked: float
    impact: float
    """The loss's own transform of the two (:mod:`sw_hooks.analysis.losses`): 1 for no change."""

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def impact(
    model: nn.Module,
    ids: Batch,
    super_weights: Sequence[SuperWeight],
    *,
    loss_fn: Loss | LossFn | None = None,
    **options: object,
) -> Comparison | LossComparison:
    """Shorthand: :func:`compare` with the given super weights ablated.

    ``loss_fn`` defaults to the loss chosen for the model
    (:func:`~sw_hooks.analysis.losses.as_loss`): a causal LM gets :func:`compare`'s
    :class:`Comparison`; any other loss a :class:`LossComparison` on ``ids`` (token ids or a
    dict of model inputs).
    """
    loss = as_loss(model, loss_fn)
    if is_causal(loss):
        return compare(model, ids, lambda: ablate(model, super_weights), **options)  # type: ignore[arg-type]
    return _loss_comparison(model, ids, super_weights, loss)


@torch.no_grad()
def _loss_comparison(
    model: nn.Module, batch: Batch, super_weights: Sequence[SuperWeight], loss: Loss
) -> LossComparison:
    bound = loss.bind(model, batch)
    baseline = float(bound(model, batch))
    with ablate(model, super_weights):
        masked = float(bound(model, batch))
    return LossComparison(loss.name, baseline, masked, loss.impact(masked, baseline))
