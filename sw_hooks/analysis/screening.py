"""Screening: stop measuring the candidates the first window shows harmless, under a guard.

After the first window, the candidates whose ratio there is below ``min_impact **
screen_exponent`` are screened when there are at least two (one alone would cost its guard
what measuring it costs): their own passes stop, and one pass with all of them removed
together, the :class:`Guard`, runs on every later window. When the guard's ratio over the
tokens after the first window reaches the same bar, :mod:`sw_hooks.analysis.verify` measures
each screened candidate again alone on every window. The rule and what remains of its
error are stated in :mod:`sw_hooks.analysis.verify`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sw_hooks.analysis.impact import IGNORE_INDEX
from sw_hooks.analysis.prefix import Runner

Ablation = Callable[[nn.Module, Sequence[Any]], AbstractContextManager[Any]]
"""``ablation(model, items)``: a context inside which ``items`` are removed from ``model``."""


@dataclass
class WindowLoss:
    """Summed next-token negative log-likelihood and the number of tokens scored."""

    total: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        flat_targets = targets.reshape(-1).to(logits.device)
        self.total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                flat_targets,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        self.tokens += int((flat_targets != IGNORE_INDEX).sum())

    def ratio_over(self, baseline: WindowLoss) -> float:
        """Perplexity ratio against ``baseline`` on the same tokens."""
        return math.exp((self.total - baseline.total) / max(self.tokens, 1))


@dataclass
class CandidateState:
    """One candidate being measured: the item, the block its replay starts at, its loss."""

    weight: Any
    block: int | None
    loss: WindowLoss = field(default_factory=WindowLoss)
    screened: bool = False


@dataclass
class Guard:
    """The screened candidates removed together, measured on every window."""

    members: list[CandidateState] = field(default_factory=list)
    loss: WindowLoss = field(default_factory=WindowLoss)

    def measure(
        self,
        model: nn.Module,
        runner: Runner,
        chunk: torch.Tensor,
        targets: torch.Tensor,
        ablation: Ablation,
    ) -> None:
        if self.members:
            with ablation(model, [m.weight for m in self.members]):
                self.loss.add(runner.run(chunk, self.start), targets)

    @property
    def start(self) -> int | None:
        return first_block(self.members)

    def ratio(self, baseline: WindowLoss, first_window: WindowLoss) -> float | None:
        """The guard's impact over the tokens after the first window (``None``: no guard)."""
        if not self.members:
            return None
        rest = WindowLoss(
            baseline.total - first_window.total, baseline.tokens - first_window.tokens
        )
        return self.loss.ratio_over(rest)

    def moved(self, baseline: WindowLoss, first_window: WindowLoss, settings: Any) -> bool:
        """Whether the guard reached the screening bar: the screened must be measured again."""
        ratio = self.ratio(baseline, first_window)
        return ratio is not None and ratio >= screening_bar(settings)


def first_block(states: Sequence[CandidateState]) -> int | None:
    """The first block of the joint ablation; ``None`` (a full forward) if any is blockless."""
    if any(s.block is None for s in states):
        return None
    return min((s.block for s in states), default=None)


def screening_bar(settings: Any) -> float:
    """The screening bar, ``min_impact ** screen_exponent``."""
    return settings.min_impact ** (settings.screen_exponent or 0.0)


def screen(states: list[CandidateState], first_window: WindowLoss, settings: Any) -> Guard:
    """Screen the candidates below the bar, if at least two are; their guard.

    One screened candidate alone would cost its guard what measuring it costs.
    """
    if settings.screen_exponent is None:
        return Guard()
    below = [s for s in states if s.loss.ratio_over(first_window) < screening_bar(settings)]
    if len(below) < 2:
        return Guard()
    for state in below:
        state.screened = True
    return Guard(below)
