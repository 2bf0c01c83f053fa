"""Measure candidate super weights: perplexity with each one zeroed over the baseline.

The measurement is the paper's (sliding-window perplexity of the calibration tokens), made
cheaper in two ways:

* **Prefix reuse (exact).** Zeroing a weight in block ``L`` changes nothing before block
  ``L``. The baseline pass keeps the output of block ``L - 1`` for each window, and a
  candidate's pass replays it: blocks ``0 .. L-1`` return the kept output instead of
  computing, and only the blocks from ``L`` on run. Before any candidate is measured, the
  replayed baseline is checked against the real one from every block a replay will start
  at; a model where the two differ (a block that reads state an earlier block left
  behind) or whose replay raises is measured with full forwards, with one warning.
* **Screening (a stated rule with a guard, off with ``screen_exponent=None``).** After the
  first window (``n1`` of the ``N`` scored tokens), the candidates whose ratio there is
  below ``bar = min_impact ** screen_exponent`` (1.19 by default) are screened when there
  are at least two: their own passes stop, and one pass with all of them removed together
  (the guard) runs on every later window. When the guard's ratio over the other ``N - n1``
  tokens reaches ``bar``, each screened candidate is measured again alone on every window,
  so a candidate whose effect shows only later in the text (its trigger absent from the
  first window) keeps the verdict of the full measurement. Otherwise a screened
  candidate's impact is its ratio over the first window's ``n1`` tokens, and the result
  says so. Why the guard suffices: a candidate whose ratio over all ``N`` tokens reaches
  ``min_impact`` while its first ``n1`` tokens showed less than ``bar`` has a ratio above
  ``min_impact`` over the other ``N - n1``, the guard's tokens. What remains of the error:
  the candidates screened with it could cancel it when all are removed together --
  together lowering perplexity by more than ``min_impact / bar`` (1.68 by default) on
  those tokens, or interacting so that removing them with it shows less than removing it
  alone. The length of the text no longer enters (the rule without the guard held only
  while the rest of the text would have needed a ratio of about 3.4 at 1024 tokens, 2.15
  at 4096).

Windows are measured in order, window by window, so only one window's kept block outputs
are in memory at a time.

Models that are not causal LMs are measured with their own loss
(:mod:`sw_hooks.analysis.losses`): the loss on the unablated model, then with each candidate
removed, on the same batch (token ids longer than ``window`` are cut into chunks of
``window`` tokens), with full forwards and no screening.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from sw_hooks.analysis.impact import _check_ids, _window_batches
from sw_hooks.analysis.losses import Batch, Loss, LossFn, as_loss, is_causal
from sw_hooks.analysis.prefix import PROBE_TOKENS, Runner, find_blocks, replay_problem
from sw_hooks.analysis.screening import (
    Ablation,
    CandidateState,
    Guard,
    WindowLoss,
    first_block,
    screen,
    screening_bar,
)
from sw_hooks.core.masks import ablate
from sw_hooks.core.progress import Progress
from sw_hooks.core.provenance import Calibration, token_digest


class Measurable(Protocol):
    """What can be measured: a super weight, a whole expert, anything an ablation removes."""

    @property
    def module(self) -> str: ...

    @property
    def label(self) -> str: ...

    def with_impact(self, impact: float, min_impact: float, **scored_on: Any) -> Any:
        """A copy with the impact, its verdict, and ``tokens=``/``screened=``: what it was
        scored on."""
        ...


@dataclass(frozen=True)
class VerifySettings:
    """How :func:`measure_impacts` measures (the relevant fields of ``DetectionOptions``)."""

    min_impact: float = 2.0
    window: int = 512
    stride: int = 256
    reuse_prefix: bool = True
    screen_exponent: float | None = 0.25


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure_impacts` returns."""

    weights: list[Any]
    """The measured items (the candidates, each with its impact and verdict)."""
    baseline_perplexity: float | None
    """The unablated model's perplexity (pseudo-perplexity for a masked LM; ``None`` for a
    loss that compares with the unablated model)."""
    joint_ratio: float | None
    """The impact of all candidates removed together."""
    forwards: float
    """Forward-equivalents run: blocks run over blocks in the model, per window."""
    prefix_reused: bool
    screened_joint_ratio: float | None = None
    """The guard: the impact of every screened candidate removed together, over the tokens
    after the first window (``None`` when none was screened)."""
    screened_remeasured: bool = False
    """Whether the guard reached the screening bar, so the screened were measured again."""
    calibration: Calibration | None = None
    """What the impacts were measured on (the text's name left to the caller)."""


@torch.no_grad()
def measure_impacts(
    model: nn.Module,
    candidates: Sequence[Measurable],
    ids: Batch,
    settings: VerifySettings | None = None,
    *,
    ablation: Ablation = ablate,
    loss_fn: Loss | LossFn | None = None,
    progress: Progress | None = None,
) -> Measurement:
    """Each candidate's impact (perplexity ratio with it zeroed), the baseline and the joint ratio.

    ``ablation`` says how a candidate is removed: by default :func:`~sw_hooks.core.masks.ablate`
    zeroes super weights; :func:`~sw_hooks.analysis.super_experts.prune_experts` drops whole
    experts from the routing. Prefix reuse starts at the block holding ``candidate.module``.

    ``loss_fn`` says what is measured (default: :func:`~sw_hooks.analysis.losses.as_loss`,
    chosen from the model's class). A causal LM's perplexity is measured over ``ids`` as
    described above; any other loss by :func:`measure_loss_impacts` on ``ids`` (token ids or
    a dict of model inputs), the impact being the loss's own transform.

    Example:
        >>> from sw_hooks.core.results import SuperWeight
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> w = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 0.0)
        >>> m = measure_impacts(planted.model, [w], planted.calibration_ids())
        >>> m.weights[0].verdict
        'super'
    """
    settings = settings or VerifySettings()
    loss = as_loss(model, loss_fn)
    if not is_causal(loss):
        return measure_loss_impacts(
            model, candidates, ids, loss, settings, ablation=ablation, progress=progress
        )
    return _measure_perplexity_impacts(
        model, candidates, _check_ids(ids), settings, ablation, progress
    )


def _measure_perplexity_impacts(
    model: nn.Module,
    candidates: Sequence[Measurable],
    ids: torch.Tensor,
    settings: VerifySettings,
    ablation: Ablation,
    progress: Progress | None,
) -> Measurement:
    """The causal-LM measurement: sliding windows, prefix reuse, screening after window one."""
    states = [CandidateState(w, *_block_of(model, w)[1:]) for w in candidates]
    runner = Runner(
        model,
        _shared_blocks(model, candidates),
        settings.reuse_prefix,
        min(settings.window, ids.shape[1]),
    )
    joint_start = first_block(states)
    baseline, joint, first_window = WindowLoss(), WindowLoss(), WindowLoss()
    windows = list(_window_batches(ids, settings.window, settings.stride))
    started = time.perf_counter()
    starts = [s.block for s in states] + [joint_start]
    problem = replay_problem(runner, windows[0][0][:, :PROBE_TOKENS], starts)
    if problem:
        runner.fall_back(problem)
    guard = Guard()
    for index, (chunk, targets) in enumerate(windows):
        base_logits = runner.baseline(chunk, {s.block for s in states if s.block is not None})
        baseline.add(base_logits, targets)
        if index == 0 and progress:
            # Before screening every candidate counts; the LM head is not: a rough figure.
            left = len(windows) * _window_cost(runner, states, joint_start, guard) - 1.0
            what = f"verify {len(states)} candidate(s) over {len(windows)} window(s)"
            progress(f"{what}: about {_seconds_for(left, runner, started):.0f} s left")
        _measure_window(model, runner, states, joint, joint_start, chunk, targets, ablation)
        if index == 0:
            first_window = WindowLoss(baseline.total, baseline.tokens)
            if len(windows) > 1:
                guard = screen(states, first_window, settings)
        else:
            guard.measure(model, runner, chunk, targets, ablation)
        if progress:
            left = (len(windows) - index - 1) * _window_cost(runner, states, joint_start, guard)
            what = f"verify window {index + 1}/{len(windows)}: {runner.forwards:.1f} forwards"
            progress(f"{what} so far, about {_seconds_for(left, runner, started):.0f} s left")
    guard_ratio = guard.ratio(baseline, first_window)
    again = guard.moved(baseline, first_window, settings)
    remeasured: dict[int, Any] = {}
    if again:
        redone = _measure_again(model, guard, ids, settings, ablation, progress, guard_ratio)
        runner.forwards += redone.forwards
        remeasured = {id(m): w for m, w in zip(guard.members, redone.weights, strict=True)}
    measured, perplexity, joint_ratio, scored_on = conclude(
        states, remeasured, (baseline, first_window, joint), guard, ids, settings, progress
    )
    return Measurement(
        measured,
        perplexity,
        joint_ratio,
        runner.forwards,
        runner.reuse,
        guard_ratio,
        again,
        scored_on,
    )


def conclude(
    states: Sequence[CandidateState],
    remeasured: dict[int, Any],
    losses: tuple[WindowLoss, WindowLoss, WindowLoss],
    guard: Guard,
    ids: torch.Tensor,
    settings: VerifySettings,
    progress: Progress | None,
) -> tuple[list[Any], float, float | None, Calibration]:
    """Verdicts, baseline perplexity, joint ratio and what the impacts were measured on, from
    the ``(baseline, first window, joint)`` losses of a finished measurement (in memory or
    block by block): a screened candidate is judged on the first window unless the guard
    sent it to be measured again (``remeasured``, keyed by ``id`` of its state)."""
    baseline, first_window, joint = losses
    measured = [
        remeasured[id(s)]
        if id(s) in remeasured
        else _verdict(s, first_window if s.screened else baseline, settings, progress)
        for s in states
    ]
    joint_ratio = joint.ratio_over(baseline) if states else None
    perplexity = math.exp(baseline.total / max(baseline.tokens, 1))
    scored_on = Calibration(
        None,
        token_digest(ids),
        int(ids.numel()),
        baseline.tokens,
        settings.window,
        settings.stride,
        first_window.tokens if guard.members else None,
        guard.ratio(baseline, first_window),
    )
    return measured, perplexity, joint_ratio, scored_on


def _measure_again(
    model: nn.Module,
    guard: Guard,
    ids: torch.Tensor,
    settings: VerifySettings,
    ablation: Ablation,
    progress: Progress | None,
    guard_ratio: float,
) -> Measurement:
    """Each screened candidate measured alone on every window (no screening)."""
    if progress:
        progress(
            f"the {len(guard.members)} screened candidate(s) removed together: "
            f"x{guard_ratio:.3f} after the first window (bar {screening_bar(settings):.3f}); "
            "measuring each on every window"
        )
    weights = [m.weight for m in guard.members]
    unscreened = replace(settings, screen_exponent=None)
    return _measure_perplexity_impacts(model, weights, ids, unscreened, ablation, progress)


def _measure_window(
    model: nn.Module,
    runner: Runner,
    states: list[CandidateState],
    joint: WindowLoss,
    joint_start: int | None,
    chunk: torch.Tensor,
    targets: torch.Tensor,
    ablation: Ablation,
) -> None:
    """Each candidate still measured, then all of them together, on one window."""
    for state in states:
        if not state.screened:
            with ablation(model, [state.weight]):
                state.loss.add(runner.run(chunk, state.block), targets)
    if states:
        with ablation(model, [s.weight for s in states]):
            joint.add(runner.run(chunk, joint_start), targets)


def _seconds_for(forwards: float, runner: Runner, started: float) -> float:
    """Time ``forwards`` more forward-equivalents take at the pace measured so far."""
    return (time.perf_counter() - started) / runner.forwards * forwards


def _window_cost(
    runner: Runner, states: list[CandidateState], joint_start: int | None, guard: Guard
) -> float:
    """Forward-equivalents one more window costs: baseline, candidates left, joint, guard."""
    active = [runner.cost(s.block) for s in states if not s.screened]
    screened = runner.cost(guard.start) if guard.members else 0.0
    return 1.0 + sum(active) + (runner.cost(joint_start) if states else 0.0) + screened


def _block_of(model: nn.Module, weight: Measurable) -> tuple[nn.ModuleList | None, int | None]:
    found = find_blocks(model, weight.module)
    return (found[0], found[1]) if found else (None, None)


def _shared_blocks(model: nn.Module, candidates: Sequence[Measurable]) -> nn.ModuleList | None:
    """The block list of the candidates when they all sit in one (else no prefix reuse)."""
    lists = {id(b): b for b, _ in (_block_of(model, w) for w in candidates) if b is not None}
    return next(iter(lists.values())) if len(lists) == 1 else None


def _verdict(
    state: CandidateState,
    reference: WindowLoss,
    settings: VerifySettings,
    progress: Progress | None,
) -> Any:
    """The candidate with its ratio over ``reference``, the baseline on the same tokens."""
    ratio = state.loss.ratio_over(reference)
    weight = state.weight
    if progress:
        note = " (screened after the first window)" if state.screened else ""
        progress(f"{weight.label} x{ratio:.3f}{note}")
    return weight.with_impact(
        ratio, settings.min_impact, tokens=reference.tokens, screened=state.screened
    )


@torch.no_grad()
def measure_loss_impacts(
    model: nn.Module,
    candidates: Sequence[Measurable],
    batch: Batch,
    loss: Loss,
    settings: VerifySettings | None = None,
    *,
    ablation: Ablation = ablate,
    progress: Progress | None = None,
) -> Measurement:
    """Each candidate's impact under ``loss``: the loss with it removed against the baseline.

    References (:meth:`~sw_hooks.analysis.losses.Loss.bind`) are computed on the unablated
    model before any candidate is removed. Every candidate is measured on the whole batch.
    """
    settings = settings or VerifySettings()
    chunks = _loss_chunks(batch, settings.window)
    bound = [loss.bind(model, chunk) for chunk in chunks]
    weights = [_chunk_weight(chunk) for chunk in chunks]

    def value() -> float:
        total = sum(
            float(fn(model, c)) * w for fn, c, w in zip(bound, chunks, weights, strict=True)
        )
        return total / sum(weights)

    baseline = value()
    tokens = _token_count(batch)
    forwards = 2.0 * len(chunks)  # the references and the baseline
    measured = []
    for candidate in candidates:
        with ablation(model, [candidate]):
            impact = loss.impact(value(), baseline)
        forwards += len(chunks)
        if progress:
            progress(f"{candidate.label} x{impact:.3f} ({loss.name})")
        measured.append(candidate.with_impact(impact, settings.min_impact, tokens=tokens))
    joint = None
    if candidates:
        with ablation(model, list(candidates)):
            joint = loss.impact(value(), baseline)
        forwards += len(chunks)
    scale = loss.forwards_per_call
    scored_on = Calibration(
        None, token_digest(batch), tokens or 0, tokens or 0, settings.window, settings.window,
        loss=loss.name,
    )  # fmt: skip
    return Measurement(
        measured,
        loss.baseline_value(baseline),
        joint,
        forwards * scale,
        False,
        calibration=scored_on,
    )


def _token_count(batch: Batch) -> int | None:
    """Tokens in ``batch``: its ids, or its ``input_ids``; ``None`` for other inputs."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
        return int(ids.numel())
    return None


def _loss_chunks(batch: Batch, window: int) -> list[Batch]:
    """``batch`` as it is, or integer token ids cut into chunks of at most ``window`` tokens."""
    if isinstance(batch, Mapping):
        if not all(isinstance(v, torch.Tensor) for v in batch.values()) or not batch:
            raise TypeError("a batch dict must map input names to tensors")
        return [batch]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"a batch must be a tensor or a dict of tensors, got {type(batch).__name__}"
        )
    if batch.is_floating_point() or batch.dim() != 2 or batch.shape[1] <= window:
        return [batch]
    return list(batch.split(window, dim=1))


def _chunk_weight(chunk: Batch) -> float:
    """A chunk's share of the loss: its token count (token ids), else 1."""
    if isinstance(chunk, torch.Tensor) and not chunk.is_floating_point():
        return float(chunk.numel())
    return 1.0
