"""Detection block by block: a model larger than memory, each block read once per sweep.

The same detection as :func:`~sw_hooks.analysis.detect.run_detection` -- the same record
passes, candidates, prefix reuse, screening and verdicts, to float rounding -- run
block-major (:mod:`sw_hooks.analysis.blockwise`) over a
:class:`~sw_hooks.core.streaming.StreamedModel`:

* **Record passes.** Pass 1 runs the prompt through every block with a recorder on each
  block's down-projection. A later pass, with the candidates found so far zeroed, starts at
  the first candidate's block from the hidden state pass 1 left there: the blocks before it
  and their maxima are unchanged. A spiking unit's weights are read (that module only) to
  check that a weight can explain its spike.
* **Verification.** Every window, unablated and with each candidate zeroed and with all of
  them zeroed, goes through a block before the next block loads; a candidate's stream
  starts at its own block from the unablated stream's hidden state. With screening and more
  than one window, the first window is one sweep and the others a second one, so that a
  screened candidate is measured on the first window only, as in memory; the screened
  removed together (the guard, :mod:`sw_hooks.analysis.screening`) are one more stream of
  the second sweep, and when it moves a third sweep measures each of them alone.
* **The LM head** runs on the scored positions of a window only.

Peak memory is one block, the resident weights (embeddings, final norm, LM head) and the
streams' hidden states; every block is read once per sweep: ``passes + 1`` or ``+ 2`` reads
of the blocks (fewer when later passes start past block 0). Causal LMs with dense
down-projections only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from sw_hooks.analysis.blockwise import (
    BlockCalls,
    Stream,
    SweepCost,
    capture_calls,
    head_logits,
    sweep,
)
from sw_hooks.analysis.candidates import layer_peaks_of, spike_candidates, spiking_layers
from sw_hooks.analysis.detect import ordered_candidates
from sw_hooks.analysis.impact import _check_ids, _window_batches, windows
from sw_hooks.analysis.losses import as_loss, is_causal
from sw_hooks.analysis.options import DetectionOptions, resolve_options
from sw_hooks.analysis.screening import CandidateState, Guard, WindowLoss, screen
from sw_hooks.analysis.verify import VerifySettings, conclude
from sw_hooks.core.experts import find_experts
from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.masks import ablate
from sw_hooks.core.maxima import ChannelStats
from sw_hooks.core.progress import Progress
from sw_hooks.core.provenance import Calibration
from sw_hooks.core.record import Recorder
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.core.streaming import StreamedModel
from sw_hooks.core.units import Unit


@dataclass(frozen=True)
class StreamedCost:
    """What a block-major detection cost.

    Attributes:
        forwards: block runs over blocks in the model, in windows of ``options.window``
            tokens (the prompt's passes count by their share of a window).
        head_positions: positions that went through the LM head.
        sweeps: passes over the blocks; each reads every block it runs once.
        block_loads: blocks loaded.
        bytes_read: checkpoint bytes read (0 for a model in memory), resident weights included.
    """

    forwards: float
    head_positions: int
    sweeps: int
    block_loads: int
    bytes_read: int


@dataclass(frozen=True)
class StreamedDetection:
    result: DetectionResult
    cost: StreamedCost


def run_streamed_detection(
    streamed: StreamedModel,
    inputs: torch.Tensor,
    *,
    calibration: torch.Tensor | None = None,
    verify_impact: bool = True,
    options: DetectionOptions | None = None,
    model_name: str | None = None,
    prepend_bos: bool = False,
    progress: Progress | None = None,
    calibration_name: str | None = None,
    **overrides: Any,
) -> StreamedDetection:
    """:func:`~sw_hooks.analysis.detect.run_detection` of a streamed (or in-memory) model,
    block by block. ``inputs`` and ``calibration`` are token ids ``[1, tokens]``.

    Example:
        >>> from sw_hooks.core.streaming import open_streamed
        >>> run = run_streamed_detection(open_streamed(folder), prompt)  # doctest: +SKIP
        >>> run.result.verified, run.cost.bytes_read  # doctest: +SKIP
    """
    options = resolve_options(options, overrides)
    prompt = _check_ids(inputs)
    _check_streamable(streamed, verify_impact)
    cost = SweepCost(options.window, len(streamed.blocks))
    found, passes, peaks = _search(streamed, prompt, options, cost, progress)
    ordered = ordered_candidates(found)
    baseline = joint = scored_on = None
    heads = 0
    if verify_impact:
        ids = _check_ids(calibration if calibration is not None else prompt)
        ordered, baseline, joint, heads, scored_on = _verify(
            streamed, ordered, ids, options, cost, progress
        )
        scored_on = replace(scored_on, name=calibration_name)
    result = DetectionResult(
        model=model_name or type(streamed.model).__name__,
        candidates=tuple(ordered),
        baseline_perplexity=baseline,
        joint_ablation_ratio=joint,
        prepend_bos=prepend_bos,
        passes=passes,
        options=asdict(options),
        layer_peaks=peaks,
        calibration=scored_on,
    )
    spent = StreamedCost(
        cost.forwards, heads, cost.sweeps, streamed.block_loads, streamed.bytes_read
    )
    return StreamedDetection(result, spent)


def _check_streamable(streamed: StreamedModel, verify_impact: bool) -> None:
    if find_experts(streamed.model, required=False):
        raise ValueError("block-by-block detection covers dense down-projections only, not experts")
    if verify_impact and not is_causal(as_loss(streamed.model, None)):
        raise ValueError(
            "block-by-block verification measures a causal LM's perplexity; "
            f"{type(streamed.model).__name__} is not one"
        )


def _block_index(streamed: StreamedModel) -> Callable[[str], int | None]:
    """``module name -> index of the block holding it`` (``None`` outside the blocks)."""
    prefix = f"{streamed.blocks_name}."

    def block_of(module: str) -> int | None:
        head = module[len(prefix) :].split(".", 1)[0] if module.startswith(prefix) else ""
        return int(head) if head.isdigit() else None

    return block_of


def _item_block(streamed: StreamedModel) -> Callable[[Any], int | None]:
    """``item -> index of the block holding item.module``, for :func:`sweep`."""
    block_of = _block_index(streamed)
    return lambda item: block_of(item.module)


# -- record passes -----------------------------------------------------------------------------
def _search(
    streamed: StreamedModel,
    prompt: torch.Tensor,
    options: DetectionOptions,
    cost: SweepCost,
    progress: Progress | None,
) -> tuple[list[SuperWeight], int, tuple]:
    """The record-and-ablate loop of :func:`~sw_hooks.analysis.detect.search_candidates`."""
    calls = capture_calls(streamed, prompt)
    block_of = _block_index(streamed)
    modules = find_down_projections(streamed.model)
    by_block = {i: {n: m for n, m in modules.items() if block_of(n) == i}
                for i in range(len(streamed.blocks))}  # fmt: skip
    first_stats: dict[str, ChannelStats] = {}
    entries: dict[int, torch.Tensor] = {}
    found: list[SuperWeight] = []
    peaks: tuple = ()
    passes = 0
    for passes in range(1, options.max_passes + 1):
        start = min((block_of(w.module) or 0 for w in found), default=0)
        stats = {n: s for n, s in first_stats.items() if (block_of(n) or 0) < start}
        stream = Stream(calls, start=start, ablated=tuple(found), hidden=entries.get(start))
        keep = entries if passes == 1 else None

        @contextmanager
        def recording(index: int, stream: Stream = stream, stats: dict = stats,
                      keep: dict | None = keep) -> Iterator[None]:  # fmt: skip
            if keep is not None:
                keep[index] = stream.hidden
            with Recorder(streamed.model, by_block[index], use_attention_mask=False) as rec:
                yield
            stats.update(rec.stats)

        sweep(
            streamed, [stream], ablate, _item_block(streamed), cost, first=start, around=recording
        )
        if passes == 1:
            first_stats, peaks = dict(stats), layer_peaks_of(stats)
        explained = {w.module for w in found}
        new = [c for c in _candidates(streamed, stats, options) if c.module not in explained]
        if progress:
            progress(f"pass {passes} (blocks {start}-{len(streamed.blocks) - 1}): "
                     f"{len(new)} new candidate(s)")  # fmt: skip
        if not new:
            break
        found += new
    return found, passes, peaks


def _candidates(
    streamed: StreamedModel, stats: dict[str, ChannelStats], options: DetectionOptions
) -> list[SuperWeight]:
    """:func:`spike_candidates`, with the spiking modules' weights read for it."""
    spiking = spiking_layers({Unit(n): s for n, s in stats.items()}, options.spike_factor)
    with streamed.loaded(*(f"{unit.module}." for unit in spiking)):
        return spike_candidates(streamed.model, stats, options)


# -- verification ------------------------------------------------------------------------------
def _verify(
    streamed: StreamedModel,
    candidates: Sequence[SuperWeight],
    ids: torch.Tensor,
    options: DetectionOptions,
    cost: SweepCost,
    progress: Progress | None,
) -> tuple[list[SuperWeight], float, float | None, int, Calibration]:
    """:func:`~sw_hooks.analysis.verify.measure_impacts` for a causal LM, block-major.

    Returns ``(measured candidates, baseline perplexity, joint ratio, LM-head positions,
    what the impacts were measured on)``.
    """
    settings = _settings(options)
    block_of = _item_block(streamed)
    states = [CandidateState(w, block_of(w)) for w in candidates]
    if any(s.block is None for s in states):
        raise ValueError("a candidate outside the decoder blocks cannot be measured block by block")
    spans = list(windows(ids.shape[1], settings.window, settings.stride))
    batches = list(_window_batches(ids, settings.window, settings.stride))
    screening = settings.screen_exponent is not None and len(spans) > 1
    rounds = [[0], list(range(1, len(spans)))] if screening else [list(range(len(spans)))]
    baseline, joint, first_window = WindowLoss(), WindowLoss(), WindowLoss()
    guard = Guard()
    heads = 0
    for number, chosen in enumerate(rounds, start=1):
        active = [s for s in states if not s.screened]
        runs = _window_streams(streamed, batches, chosen, states, active, guard)
        sweep(streamed, [s for run in runs for s in run.streams], ablate, block_of, cost)
        for run in runs:
            heads += run.score(streamed, spans[run.window][2], baseline, joint, guard)
        if number == 1 and screening:
            first_window = WindowLoss(baseline.total, baseline.tokens)
            guard = screen(states, first_window, settings)
        if progress:
            progress(f"verify sweep {number}/{len(rounds)}: windows {chosen[0] + 1}-"
                     f"{chosen[-1] + 1} of {len(spans)}, {len(active)} candidate(s), "
                     f"{cost.forwards:.2f} forwards so far")  # fmt: skip
    again: dict[int, SuperWeight] = {}
    if guard.moved(baseline, first_window, settings):
        # The screened together moved after the first window: measure each on every window.
        unscreened = replace(options, screen_exponent=None)
        weights = [m.weight for m in guard.members]
        redone = _verify(streamed, weights, ids, unscreened, cost, progress)
        heads += redone[3]
        again = {id(m): w for m, w in zip(guard.members, redone[0], strict=True)}
    measured, perplexity, joint_ratio, scored_on = conclude(
        states, again, (baseline, first_window, joint), guard, ids, settings, progress
    )
    return measured, perplexity, joint_ratio, heads, scored_on


def _settings(options: DetectionOptions) -> VerifySettings:
    return VerifySettings(
        min_impact=options.min_impact,
        window=options.window,
        stride=options.stride,
        reuse_prefix=options.reuse_prefix,
        screen_exponent=options.screen_exponent,
    )


@dataclass
class _WindowRun:
    """One window's streams: unablated, each active candidate, all candidates together."""

    window: int
    targets: torch.Tensor
    base: Stream
    candidates: list[tuple[CandidateState, Stream]]
    joint: Stream | None
    guard: Stream | None = None

    @property
    def streams(self) -> list[Stream]:
        extra = [s for s in (self.joint, self.guard) if s is not None]
        return [self.base, *(s for _, s in self.candidates), *extra]

    def score(
        self,
        streamed: StreamedModel,
        scored_from: int,
        baseline: WindowLoss,
        joint: WindowLoss,
        guard: Guard,
    ) -> int:
        """Add each stream's loss on the scored tokens; returns LM-head positions run."""
        keep = self.base.tokens - max(scored_from - 1, 0)
        targets = self.targets[:, -(keep - 1) :] if keep > 1 else self.targets[:, :0]

        def loss_of(stream: Stream, into: WindowLoss) -> None:
            into.add(head_logits(streamed, stream, keep)[:, :-1], targets)

        loss_of(self.base, baseline)
        for state, stream in self.candidates:
            loss_of(stream, state.loss)
        if self.joint is not None:
            loss_of(self.joint, joint)
        if self.guard is not None:
            loss_of(self.guard, guard.loss)
        return keep * len(self.streams)


def _window_streams(
    streamed: StreamedModel,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    chosen: list[int],
    states: list[CandidateState],
    active: list[CandidateState],
    guard: Guard,
) -> list[_WindowRun]:
    runs = []
    joint_start = min((s.block for s in states), default=None)
    for index in chosen:
        chunk, targets = batches[index]
        calls: BlockCalls = capture_calls(streamed, chunk)
        base = Stream(calls)
        forks = [(s, Stream(calls, s.block, (s.weight,), base)) for s in active]
        joint = (
            Stream(calls, joint_start, tuple(s.weight for s in states), base)
            if joint_start is not None
            else None
        )
        screened = tuple(m.weight for m in guard.members)
        together = Stream(calls, guard.start, screened, base) if screened else None
        runs.append(_WindowRun(index, targets, base, forks, joint, together))
    return runs
