"""Measure candidate super weights: perplexity with each one zeroed over the baseline.

The measurement is the paper's (sliding-window perplexity of the calibration tokens), made
cheaper in two ways:

* **Prefix reuse (exact).** Zeroing a weight in block ``L`` changes nothing before block
  ``L``. The baseline pass keeps the output of block ``L - 1`` for each window, and a
  candidate's pass replays it: blocks ``0 .. L-1`` return the kept output instead of
  computing, and only the blocks from ``L`` on run. Before any candidate is measured, the
  replayed baseline is checked against the real one; a model where the two differ (a
  block that reads state an earlier block left behind) is measured with full forwards.
* **Screening (a stated rule, off with ``screen_exponent=None``).** After the first
  window, ``n1`` of the ``N`` scored tokens, a candidate whose ratio there is below
  ``min_impact ** screen_exponent`` is not measured further; its impact is the ratio over
  those ``n1`` tokens. It could still have reached ``min_impact`` only if the other
  ``N - n1`` tokens had a ratio of at least
  ``min_impact ** ((N - screen_exponent * n1) / (N - n1))`` -- with the defaults and two
  windows' worth of text, about 3.4 where the first half showed less than 1.19. A super
  weight acts through a super activation that every later token sees, so its effect does
  not hide in a part of the text; the error of the rule is that of a candidate whose effect
  does.

Windows are measured in order, window by window, so only one window's kept block outputs
are in memory at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sw_hooks.analysis.impact import IGNORE_INDEX, _check_ids, _logits, _window_batches
from sw_hooks.core.devices import execution_device
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.masks import ablate

Progress = Callable[[str], None]
PROBE_TOKENS = 32


class Measurable(Protocol):
    """What can be measured: a super weight, a whole expert, anything an ablation removes."""

    @property
    def module(self) -> str: ...

    @property
    def label(self) -> str: ...

    def with_impact(self, impact: float, min_impact: float) -> Any: ...


Ablation = Callable[[nn.Module, Sequence[Any]], AbstractContextManager[Any]]
"""``ablation(model, items)``: a context inside which ``items`` are removed from ``model``."""


@dataclass(frozen=True)
class VerifySettings:
    """How :func:`measure_impacts` measures (the relevant fields of ``DetectionOptions``)."""

    min_impact: float = 2.0
    window: int = 512
    stride: int = 256
    reuse_prefix: bool = True
    screen_exponent: float | None = 0.25


@dataclass
class _Loss:
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

    def ratio_over(self, baseline: _Loss) -> float:
        """Perplexity ratio against ``baseline`` on the same tokens."""
        return math.exp((self.total - baseline.total) / max(self.tokens, 1))


@dataclass
class _Candidate:
    weight: Measurable
    block: int | None
    loss: _Loss = field(default_factory=_Loss)
    screened: bool = False


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure_impacts` returns."""

    weights: list[Any]
    """The measured items (the candidates, each with its impact and verdict)."""
    baseline_perplexity: float
    joint_ratio: float | None
    forwards: float
    """Forward-equivalents run: blocks run over blocks in the model, per window."""
    prefix_reused: bool


def find_blocks(model: nn.Module, module_name: str) -> tuple[nn.ModuleList, int] | None:
    """The list of blocks that holds ``module_name`` and the index of its block.

    The outermost ``ModuleList`` on the module's path whose next name is an index
    (``model.layers.11`` for ``model.layers.11.mlp.down_proj``): the model's stack of blocks.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> blocks, index = find_blocks(tiny_model("llama", num_layers=3), "model.layers.2.mlp.down_proj")
        >>> len(blocks), index
        (3, 2)
    """
    parts = module_name.split(".")
    for depth in range(1, len(parts)):
        try:
            container = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            return None
        if isinstance(container, nn.ModuleList) and parts[depth].isdigit():
            return container, int(parts[depth])
    return None


@contextmanager
def kept_outputs(blocks: nn.ModuleList, indices: set[int]) -> Iterator[dict[int, Any]]:
    """Keep what each listed block returns during the body: ``{index: output}``."""
    kept: dict[int, Any] = {}

    def keeper(index: int):
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            kept[index] = output

        return keep

    with HookSet() as hooks:
        for index in sorted(indices):
            hooks.forward(blocks[index], keeper(index))
        yield kept


@contextmanager
def replayed_prefix(blocks: nn.ModuleList, start: int, output: Any) -> Iterator[None]:
    """Blocks ``0 .. start-1`` return ``output`` (block ``start - 1``'s) without computing.

    Each block's own ``forward`` attribute (accelerate's offload hook keeps one there) is
    put back on exit.
    """
    skipped = list(blocks[:start])
    saved = [block.__dict__.get("forward") for block in skipped]

    def replay(*args: Any, **kwargs: Any) -> Any:
        return output

    try:
        for block in skipped:
            block.forward = replay
        yield
    finally:
        for block, own in zip(skipped, saved, strict=True):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own


class _Runner:
    """Runs one window: the baseline (keeping block outputs), then masked replays."""

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList | None, reuse: bool, window_tokens: int
    ):
        self.model, self.blocks, self.reuse = model, blocks, reuse and blocks is not None
        self.window_tokens = window_tokens
        self.device = execution_device(model)
        self.total_blocks = len(blocks) if blocks is not None else 1
        self.forwards = 0.0
        self.kept: dict[int, Any] = {}

    def baseline(self, chunk: torch.Tensor, starts: set[int], share: float = 1.0) -> torch.Tensor:
        """Logits of the unmodified model, keeping the outputs of the blocks before ``starts``."""
        keep = {s - 1 for s in starts if s > 0} if self.reuse else set()
        with kept_outputs(self.blocks, keep) if keep else _nothing() as kept:
            logits = _logits(self.model, chunk, self.device)
        self.kept = kept if keep else {}
        self.forwards += share
        return logits

    def cost(self, start: int | None) -> float:
        """Forward-equivalents of a run from block ``start``: the share of blocks it runs."""
        if not self.reuse or not start:
            return 1.0
        return (self.total_blocks - start) / self.total_blocks

    def run(self, chunk: torch.Tensor, start: int | None, share: float = 1.0) -> torch.Tensor:
        """Logits with blocks before ``start`` replayed from the baseline (``None``: full).

        ``share`` is the chunk's length over a window's, for counting forwards.
        """
        if not self.reuse or not start or start - 1 not in self.kept:
            self.forwards += share
            return _logits(self.model, chunk, self.device)
        self.forwards += self.cost(start) * share
        with replayed_prefix(self.blocks, start, self.kept[start - 1]):
            return _logits(self.model, chunk, self.device)


@contextmanager
def _nothing() -> Iterator[dict[int, Any]]:
    yield {}


@torch.no_grad()
def measure_impacts(
    model: nn.Module,
    candidates: Sequence[Measurable],
    ids: torch.Tensor,
    settings: VerifySettings | None = None,
    *,
    ablation: Ablation = ablate,
    progress: Progress | None = None,
) -> Measurement:
    """Each candidate's impact (perplexity ratio with it zeroed), the baseline and the joint ratio.

    ``ablation`` says how a candidate is removed: by default :func:`~sw_hooks.core.masks.ablate`
    zeroes super weights; :func:`~sw_hooks.analysis.super_experts.prune_experts` drops whole
    experts from the routing. Prefix reuse starts at the block holding ``candidate.module``.

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
    ids = _check_ids(ids)
    states = [_Candidate(w, *_block_of(model, w)[1:]) for w in candidates]
    blocks = _shared_blocks(model, candidates)
    runner = _Runner(model, blocks, settings.reuse_prefix, min(settings.window, ids.shape[1]))
    joint_start = min((s.block for s in states if s.block is not None), default=None)
    if any(s.block is None for s in states):
        joint_start = None
    baseline, joint, first_window = _Loss(), _Loss(), _Loss()
    windows = list(_window_batches(ids, settings.window, settings.stride))
    started = time.perf_counter()
    if runner.reuse and joint_start is not None:
        runner.reuse = _replay_is_exact(runner, windows[0][0][:, :PROBE_TOKENS], joint_start)
    for index, (chunk, targets) in enumerate(windows):
        base_logits = runner.baseline(chunk, {s.block for s in states if s.block is not None})
        baseline.add(base_logits, targets)
        if index == 0 and progress:
            # Before screening every candidate counts; the LM head is not: a rough figure.
            left = len(windows) * _window_cost(runner, states, joint_start) - 1.0
            what = f"verify {len(states)} candidate(s) over {len(windows)} window(s)"
            progress(f"{what}: about {_seconds_for(left, runner, started):.0f} s left")
        _measure_window(model, runner, states, joint, joint_start, chunk, targets, ablation)
        if index == 0:
            first_window = _Loss(baseline.total, baseline.tokens)
            if len(windows) > 1:
                _screen(states, first_window, settings)
        if progress:
            left = (len(windows) - index - 1) * _window_cost(runner, states, joint_start)
            what = f"verify window {index + 1}/{len(windows)}: {runner.forwards:.1f} forwards"
            progress(f"{what} so far, about {_seconds_for(left, runner, started):.0f} s left")
    measured = [
        _verdict(s, first_window if s.screened else baseline, settings, progress) for s in states
    ]
    return Measurement(
        measured,
        math.exp(baseline.total / max(baseline.tokens, 1)),
        joint.ratio_over(baseline) if states else None,
        runner.forwards,
        runner.reuse,
    )


def _measure_window(
    model: nn.Module,
    runner: _Runner,
    states: list[_Candidate],
    joint: _Loss,
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


def _seconds_for(forwards: float, runner: _Runner, started: float) -> float:
    """Time ``forwards`` more forward-equivalents take at the pace measured so far."""
    return (time.perf_counter() - started) / runner.forwards * forwards


def _window_cost(runner: _Runner, states: list[_Candidate], joint_start: int | None) -> float:
    """Forward-equivalents one more window costs: baseline, candidates left, joint."""
    active = [runner.cost(s.block) for s in states if not s.screened]
    return 1.0 + sum(active) + (runner.cost(joint_start) if states else 0.0)


def _block_of(model: nn.Module, weight: Measurable) -> tuple[nn.ModuleList | None, int | None]:
    found = find_blocks(model, weight.module)
    return (found[0], found[1]) if found else (None, None)


def _shared_blocks(model: nn.Module, candidates: Sequence[Measurable]) -> nn.ModuleList | None:
    """The block list of the candidates when they all sit in one (else no prefix reuse)."""
    lists = {id(b): b for b, _ in (_block_of(model, w) for w in candidates) if b is not None}
    return next(iter(lists.values())) if len(lists) == 1 else None


def _replay_is_exact(runner: _Runner, probe: torch.Tensor, start: int) -> bool:
    """Whether replaying blocks before ``start`` gives the logits of a full forward.

    Checked once per measurement, on the first ``PROBE_TOKENS`` tokens: enough to catch a
    block that depends on more than its input, at a few percent of a window's cost.
    """
    expected = runner.baseline(probe, {start}, share=probe.shape[1] / runner.window_tokens)
    replayed = runner.run(probe, start, share=probe.shape[1] / runner.window_tokens)
    runner.kept = {}
    scale = float(expected.abs().max()) or 1.0
    return bool(torch.allclose(replayed, expected, rtol=1e-5, atol=1e-5 * scale))


def _screen(states: list[_Candidate], baseline: _Loss, settings: VerifySettings) -> None:
    if settings.screen_exponent is None:
        return
    bar = settings.min_impact**settings.screen_exponent
    for state in states:
        state.screened = state.loss.ratio_over(baseline) < bar


def _verdict(
    state: _Candidate, reference: _Loss, settings: VerifySettings, progress: Progress | None
) -> Any:
    """The candidate with its ratio over ``reference``, the baseline on the same tokens."""
    ratio = state.loss.ratio_over(reference)
    weight = state.weight
    if progress:
        note = " (screened after the first window)" if state.screened else ""
        progress(f"{weight.label} x{ratio:.3f}{note}")
    return weight.with_impact(ratio, settings.min_impact)
