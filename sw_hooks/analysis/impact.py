"""What a mask does to a model: perplexity, KL, top-1 agreement, stopword shift, Table 1.

Perplexity uses torchmetrics' ``Perplexity`` over sliding windows: each window scores
only the tokens the previous one did not, with up to ``window - stride`` tokens of
context before them.

Inputs go to the model's execution device (:func:`sw_hooks.core.devices.execution_device`, right
for accelerate-offloaded models too) and every metric lives on the logits' device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchmetrics.text import Perplexity

from sw_hooks.analysis.losses import Batch, Loss, LossFn, as_loss, is_causal
from sw_hooks.analysis.magnitude import largest_weights
from sw_hooks.analysis.next_token import (  # noqa: F401 (verify and prefix import these here)
    IGNORE_INDEX,
    NextTokenAccumulator,
    NextTokenAgreement,
    _check_ids,
    _logits,
    _window_batches,
    perplexity_metric,
    windows,
)
from sw_hooks.core.devices import execution_device
from sw_hooks.core.masks import ablate, restore_activation
from sw_hooks.core.progress import Progress
from sw_hooks.core.results import SuperWeight

STOPWORDS: tuple[str, ...] = (" the", ".", ",", " a", " and", " of", " to", "\n", " is", " in")

MaskFactory = Callable[[], AbstractContextManager]


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

    @classmethod
    def of(cls, agreement: NextTokenAgreement) -> Comparison:
        """The unmasked model is the reference, the masked one the other."""
        return cls(
            agreement.perplexity,
            agreement.other_perplexity,
            agreement.kl_divergence,
            agreement.top1_agreement,
            agreement.stopword_mass,
            agreement.other_stopword_mass,
        )


def _enter(masks: Sequence[MaskFactory]) -> ExitStack:
    stack = ExitStack()
    for factory in masks:
        stack.enter_context(factory())
    return stack


def _as_list(masks: MaskFactory | Sequence[MaskFactory]) -> list[MaskFactory]:
    return [masks] if callable(masks) else list(masks)


@torch.no_grad()
def compare_masked_many(
    model: nn.Module,
    ids: torch.Tensor,
    conditions: dict[str, MaskFactory | Sequence[MaskFactory]],
    *,
    stopword_ids: Sequence[int] | None = None,
    window: int = 512,
    stride: int = 256,
) -> dict[str, Comparison]:
    """:func:`compare_masked` for several conditions, running the unmasked model once per window.

    A condition with no masks is the unmasked model itself (no second forward pass).
    """
    ids = _check_ids(ids)
    masks = {name: _as_list(m) for name, m in conditions.items()}
    totals = {name: NextTokenAccumulator(stopword_ids) for name in conditions}
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
    return {name: Comparison.of(total.result()) for name, total in totals.items()}


def compare_masked(
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
    after the call, even if it raises. (Two different models are compared by
    :func:`sw_hooks.analysis.model_comparison.compare_models`, ``sw-hooks compare``.)

    Example:
        >>> result = compare_masked(model, ids, lambda: ablate(model, weights))  # doctest: +SKIP
        >>> result.ratio, result.kl_divergence, result.top1_agreement  # doctest: +SKIP
    """
    return compare_masked_many(
        model, ids, {"masked": masks}, stopword_ids=stopword_ids, window=window, stride=stride
    )["masked"]


def compare(*args: object, **kwargs: object) -> Comparison:
    """Deprecated name of :func:`compare_masked` (``sw-hooks compare`` compares two models)."""
    warnings.warn(
        "sw_hooks.compare is renamed compare_masked (sw-hooks compare compares two models)",
        DeprecationWarning,
        stacklevel=2,
    )
    return compare_masked(*args, **kwargs)  # type: ignore[arg-type]


def compare_many(*args: object, **kwargs: object) -> dict[str, Comparison]:
    """Deprecated name of :func:`compare_masked_many`."""
    warnings.warn("compare_many is renamed compare_masked_many", DeprecationWarning, stacklevel=2)
    return compare_masked_many(*args, **kwargs)  # type: ignore[arg-type]


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
    progress: Progress | None = None,
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
    results = compare_masked_many(
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
    """Shorthand: :func:`compare_masked` with the given super weights ablated.

    ``loss_fn`` defaults to the loss chosen for the model
    (:func:`~sw_hooks.analysis.losses.as_loss`): a causal LM gets :func:`compare_masked`'s
    :class:`Comparison`; any other loss a :class:`LossComparison` on ``ids`` (token ids or a
    dict of model inputs).
    """
    loss = as_loss(model, loss_fn)
    if is_causal(loss):
        return compare_masked(model, ids, lambda: ablate(model, super_weights), **options)  # type: ignore[arg-type]
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
