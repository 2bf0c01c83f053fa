"""How much a model gets worse: the losses verification measures a candidate with.

A loss is ``loss_fn(model, batch) -> torch.Tensor``: one scalar over the whole batch, lower
is better. A batch is token ids ``[batch, tokens]`` or a dict of model inputs
(``pixel_values``, ``input_features``, ``attention_mask``, ...). Verification runs the loss
on the unablated model (the baseline) and with each candidate removed, and turns the two
numbers into an **impact** that reads the same way for every loss: ``1`` when the weight
changes nothing, and ``impact >= min_impact`` when it matters.

==========================  =====================  ===========================================
loss                        models                 impact (``min_impact=2`` means)
==========================  =====================  ===========================================
:class:`Perplexity`         causal LMs             perplexity ratio (perplexity doubles)
:class:`PseudoPerplexity`   masked LMs             pseudo-perplexity ratio (it doubles)
:class:`OutputKL`           classifiers, seq2seq   ``exp(KL)``: the perplexity ratio of the
                                                   ablated model on labels drawn from the
                                                   unablated one (KL >= ln 2 nats)
:class:`EmbeddingCosine`    encoders, embedders    baseline over ablated mean cosine
                                                   similarity (cosine to the unablated
                                                   embeddings <= 0.5, i.e. turned >= 60 deg)
a plain callable            anything               loss ratio (the loss doubles)
==========================  =====================  ===========================================

:class:`OutputKL` and :class:`EmbeddingCosine` compare with the unablated model's outputs:
:meth:`Loss.bind` computes that reference once, on the unablated model, and returns the loss
that compares against it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sw_hooks.core.devices import execution_device

Batch = torch.Tensor | Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

MIN_COSINE = 1e-3
"""Cosine similarities are floored here, so an embedding turned 90 degrees or more has an
impact of 1000 rather than an infinite or negative one."""


class Loss(ABC):
    """A loss with the transform that makes its impact read like a perplexity ratio.

    Subclasses implement :meth:`__call__`; those that compare with the unablated model
    override :meth:`bind`.
    """

    name = "loss"
    forwards_per_call = 1
    """Forward passes one call runs (for counting verification's cost)."""

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The loss of ``model`` on ``batch``: one scalar, lower is better."""

    def bind(self, model: nn.Module, batch: Batch) -> LossFn:
        """The loss to measure ``batch`` with; called on the unablated model, before any
        candidate is removed. Losses without a reference return themselves."""
        return self

    def impact(self, ablated: float, baseline: float) -> float:
        """How much worse ``ablated`` is than ``baseline``: ``1`` for no change."""
        return math.exp(ablated - baseline)

    def baseline_value(self, baseline: float) -> float | None:
        """What a result reports as the unablated model's perplexity (``None``: no such thing)."""
        return math.exp(baseline)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Perplexity(Loss):
    """Mean next-token negative log-likelihood of a causal LM; impact is the perplexity ratio.

    Verification measures it over sliding windows with prefix reuse and screening
    (:mod:`sw_hooks.analysis.verify`); calling it runs one plain forward.
    """

    name = "perplexity"

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids = _ids(batch)
        logits = _logits(_forward(model, batch))[:, :-1]
        targets = ids[:, 1:].to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class PseudoPerplexity(Loss):
    """Masked-LM pseudo-perplexity: mean negative log-likelihood of tokens hidden one group
    at a time (Salazar et al., 2020, with groups instead of one token per forward).

    Round ``r`` of ``rounds`` replaces the positions ``p`` with ``p % rounds == r`` by
    ``mask_token_id`` and scores the true tokens there; every position outside ``skip_ids``
    (special tokens) and the attention mask is scored exactly once. The masking is
    deterministic, so the baseline and an ablated run see the same masks.
    """

    name = "pseudo-perplexity"

    def __init__(self, mask_token_id: int, *, rounds: int = 8, skip_ids: tuple[int, ...] = ()):
        if not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a token id (int >= 0), got {mask_token_id!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        self.mask_token_id, self.rounds, self.skip_ids = mask_token_id, rounds, tuple(skip_ids)
        self.forwards_per_call = rounds

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids = _ids(batch)
        scored = _scoreable(ids, batch, self.skip_ids)
        positions = torch.arange(ids.shape[1], device=ids.device) % self.rounds
        total, count = torch.zeros(()), 0
        for round_ in range(self.rounds):
            hidden = scored & (positions == round_)
            if not hidden.any():
                continue
            masked = ids.masked_fill(hidden, self.mask_token_id)
            logits = _logits(_forward(model, _with_ids(batch, masked)))
            chosen = hidden.to(logits.device)
            nll = F.cross_entropy(
                logits[chosen].float(), ids.to(logits.device)[chosen], reduction="sum"
            )
            total, count = total.to(nll.device) + nll, count + int(hidden.sum())
        if count == 0:
            raise ValueError("no token to score: every position is special or padding")
        return total / count

    def __repr__(self) -> str:
        return f"PseudoPerplexity(mask_token_id={self.mask_token_id}, rounds={self.rounds})"


class OutputKL(Loss):
    """Mean KL divergence of the output distribution from the unablated model's.

    ``KL(p_unablated || p_ablated)`` over the last dimension of the logits, averaged over
    every other position (one per item for a classifier, one per decoder token for seq2seq).
    The impact ``exp(KL_ablated - KL_baseline)`` (the baseline's is 0) is the perplexity
    ratio of the ablated model on labels drawn from the unablated model.
    """

    name = "kl"

    def __init__(self, reference: torch.Tensor | None = None):
        self.reference = reference
        """Log-probabilities of the unablated model (set by :meth:`bind`)."""

    def bind(self, model: nn.Module, batch: Batch) -> OutputKL:
        return OutputKL(_logits(_forward(model, batch)).log_softmax(-1))

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        reference = _bound(self.reference, self)
        log_probs = _logits(_forward(model, batch)).log_softmax(-1)
        reference = reference.to(log_probs.device)
        return (reference.exp() * (reference - log_probs)).sum(-1).mean()

    def baseline_value(self, baseline: float) -> float | None:
        return None


class EmbeddingCosine(Loss):
    """Mean cosine distance of each item's embedding from the unablated model's.

    An item's embedding is the mean over positions (masked by ``attention_mask`` when the
    batch has one) of ``last_hidden_state``, else ``pooler_output``, ``text_embeds`` or
    ``image_embeds``, else of the tensor the model returns. For an encoder-decoder the
    encoder's and the decoder's embeddings are each compared and their distances averaged.
    The impact is the mean cosine similarity of the baseline (1) over the ablated one,
    floored at :data:`MIN_COSINE`: ``2`` when the embeddings turned 60 degrees.
    """

    name = "cosine"

    def __init__(self, reference: list[torch.Tensor] | None = None):
        self.reference = reference
        """Embeddings of the unablated model, one ``[items, width]`` tensor per part."""

    def bind(self, model: nn.Module, batch: Batch) -> EmbeddingCosine:
        return EmbeddingCosine(embeddings(_forward(model, batch), batch))

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        reference = _bound(self.reference, self)
        current = embeddings(_forward(model, batch), batch)
        distances = [
            1 - F.cosine_similarity(now.float(), ref.to(now.device).float(), dim=-1).mean()
            for now, ref in zip(current, reference, strict=True)
        ]
        return torch.stack(distances).mean()

    def impact(self, ablated: float, baseline: float) -> float:
        return (1 - baseline) / max(1 - ablated, MIN_COSINE)

    def baseline_value(self, baseline: float) -> float | None:
        return None


class LossRatio(Loss):
    """Any ``loss_fn(model, batch) -> scalar``; the impact is the ratio ablated / baseline."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self.name = getattr(loss_fn, "__name__", type(loss_fn).__name__)

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_fn(model, batch)

    def impact(self, ablated: float, baseline: float) -> float:
        if not baseline > 0:
            raise ValueError(
                f"loss {self.name!r} is {baseline} on the unablated model: a loss ratio needs "
                "a positive baseline (give a Loss subclass with its own impact)"
            )
        return ablated / baseline

    def baseline_value(self, baseline: float) -> float | None:
        return None

    def __repr__(self) -> str:
        return f"LossRatio({self.name})"


def embeddings(output: Any, batch: Batch) -> list[torch.Tensor]:
    """The ``[items, width]`` embeddings :class:`EmbeddingCosine` compares, one per part."""
    parts = [getattr(output, "encoder_last_hidden_state", None)]
    for name in ("last_hidden_state", "pooler_output", "text_embeds", "image_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            parts.append(value)
            break
    if isinstance(output, torch.Tensor):
        parts.append(output)
    found = [p for p in parts if isinstance(p, torch.Tensor)]
    if not found:
        raise ValueError(
            f"no embedding in a {type(output).__name__} output (looked for last_hidden_state, "
            "pooler_output, text_embeds, image_embeds); pass loss_fn="
        )
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return [_pooled(p, mask) for p in found]


def _pooled(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the positions of ``[items, positions, width]`` (as is for ``[items, width]``)."""
    states = states.float()
    if states.dim() == 2:
        return states
    states = states.reshape(states.shape[0], -1, states.shape[-1])
    if mask is not None and mask.shape == states.shape[:2]:
        weights = mask.to(states.device, states.dtype)[..., None]
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1)
    return states.mean(1)


def _bound(reference: Any, loss: Loss) -> Any:
    if reference is None:
        raise ValueError(
            f"{type(loss).__name__} compares with the unablated model: call "
            ".bind(model, batch) on it first and measure with what that returns"
        )
    return reference


def _forward(model: nn.Module, batch: Batch) -> Any:
    device = execution_device(model)
    if isinstance(batch, Mapping):
        sent = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model(**sent)
    return model(batch.to(device))


def _logits(output: Any) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"the model returned no logits ({type(output).__name__}); pass loss_fn=")
    return logits.float()


def _ids(batch: Batch) -> torch.Tensor:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
        raise TypeError("this loss needs token ids [batch, tokens] (or a dict with input_ids)")
    return ids


def _with_ids(batch: Batch, ids: torch.Tensor) -> Batch:
    return {**batch, "input_ids": ids} if isinstance(batch, Mapping) else ids


def _scoreable(ids: torch.Tensor, batch: Batch, skip_ids: tuple[int, ...]) -> torch.Tensor:
    keep = torch.ones_like(ids, dtype=torch.bool)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor):
        keep &= mask.to(ids.device).bool()
    for token in skip_ids:
        keep &= ids != token
    return keep


def _class_names(mapping: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, mapping, {}).values()
    return {n for value in names for n in ((value,) if isinstance(value, str) else value)}


_KL_MAPPINGS = (
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
)
_EMBEDDER_MAPPINGS = ("MODEL_MAPPING_NAMES", "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile`` or distributed wrapper."""
    while True:
        inner = model.__dict__.get("_modules", {}).get("_orig_mod") or (
            model.module
            if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel)
            else None
        )
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def loss_for(model: nn.Module, *, mask_token_id: int | None = None) -> Loss:
    """The loss that suits ``model``, from its Hugging Face class.

    Causal LMs get :class:`Perplexity`; masked LMs :class:`PseudoPerplexity` (the mask token
    from ``mask_token_id`` or the config); sequence, token, image and audio classifiers and
    seq2seq LMs :class:`OutputKL`; base models (encoders, vision towers, embedders, a seq2seq
    model without its head) :class:`EmbeddingCosine`.

    Raises:
        ValueError: the model has no Hugging Face config or a class none of these covers
            (the message says to pass ``loss_fn=``), or a masked LM's mask token is unknown.

    Example:
        >>> from sw_hooks.testing import tiny_family
        >>> loss_for(tiny_family("bert", num_layers=1))
        EmbeddingCosine()
    """
    inner = _unwrapped(model)
    config, kind = getattr(inner, "config", None), type(inner).__name__
    if config is None or not hasattr(config, "model_type"):
        raise ValueError(
            f"cannot choose a loss for {kind}: it has no Hugging Face config; pass loss_fn= "
            "(a Loss from sw_hooks.analysis.losses or any loss_fn(model, batch) -> scalar)"
        )
    if kind in _class_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return Perplexity()
    if kind in _class_names("MODEL_FOR_MASKED_LM_MAPPING_NAMES"):
        return _pseudo_perplexity(config, kind, mask_token_id)
    if any(kind in _class_names(m) for m in _KL_MAPPINGS):
        return OutputKL()
    if any(kind in _class_names(m) for m in _EMBEDDER_MAPPINGS):
        return EmbeddingCosine()
    raise ValueError(
        f"cannot choose a loss for {kind}: not a causal LM, masked LM, classifier, seq2seq "
        "model or base encoder; pass loss_fn="
    )


def _pseudo_perplexity(config: Any, kind: str, mask_token_id: int | None) -> PseudoPerplexity:
    mask = mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None)
    if mask is None:
        raise ValueError(
            f"{kind} is a masked LM but its config names no mask token: pass "
            "mask_token_id= (the tokenizer's mask_token_id)"
        )
    names = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")
    skip = tuple(
        sorted({v for v in (getattr(config, n, None) for n in names) if isinstance(v, int)})
    )
    return PseudoPerplexity(mask, skip_ids=skip)


def as_loss(model: nn.Module, loss_fn: Loss | LossFn | None, *, tokenizer: Any = None) -> Loss:
    """The loss to verify ``model`` with: ``loss_fn`` (a plain callable is measured by its
    ratio), else :func:`loss_for` the model, a masked LM taking its mask token from
    ``tokenizer``. A model without a Hugging Face config is measured as a causal LM, as
    detection always has.
    """
    if isinstance(loss_fn, Loss):
        return loss_fn
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        return LossRatio(loss_fn)
    if getattr(_unwrapped(model), "config", None) is None:
        return Perplexity()
    return loss_for(model, mask_token_id=getattr(tokenizer, "mask_token_id", None))


def is_causal(loss: Loss) -> bool:
    """Whether ``loss`` is measured by the windowed perplexity path."""
    return type(loss) is Perplexity
