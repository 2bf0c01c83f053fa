"""Prefix reuse for verification: keep block ``L - 1``'s output once, replay it later.

Zeroing a weight in block ``L`` changes nothing before block ``L``: the baseline pass keeps
the output of the blocks where candidates start, and a candidate's pass replays it, so only
the blocks from ``L`` on run. :class:`Runner` runs both kinds of pass and counts the cost in
forward-equivalents.

Replaying is exact only for a model whose blocks read nothing but their input. A block that
reads state an earlier block left behind (a KV-sharing model's later layers read an earlier
layer's keys and values) would read a stale value, or none. :func:`replay_problem` checks,
before any candidate is measured, every start block a measurement will replay from: a
replay that starts at block ``L`` skips the writes of blocks ``0 .. L-1`` and of nothing
else, so no check at one start covers another. A model that fails the check, or whose
replay raises at any time, is measured with full forwards, with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.impact import _logits
from sw_hooks.core.devices import execution_device
from sw_hooks.core.hooks import HookSet

PROBE_TOKENS = 32


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


class Runner:
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
        with kept_outputs(self.blocks, keep) if keep else nothing() as kept:
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

        ``share`` is the chunk's length over a window's, for counting forwards. A replay
        that raises turns reuse off (:meth:`fall_back`) and runs a full forward instead.
        """
        if not self.reuse or not start or start - 1 not in self.kept:
            self.forwards += share
            return _logits(self.model, chunk, self.device)
        try:
            return self.replay(chunk, start, share)
        except Exception as error:  # a model-specific failure: any exception class
            self.fall_back(f"replaying the blocks before block {start} raised {_named(error)}")
            return self.run(chunk, start, share)

    def replay(self, chunk: torch.Tensor, start: int, share: float = 1.0) -> torch.Tensor:
        """Logits with blocks before ``start`` returning the kept output; errors propagate."""
        self.forwards += self.cost(start) * share
        with replayed_prefix(self.blocks, start, self.kept[start - 1]):
            return _logits(self.model, chunk, self.device)

    def fall_back(self, reason: str) -> None:
        """Measure with full forwards from now on, saying why once."""
        if self.reuse:
            warnings.warn(
                f"prefix reuse is off: {reason}; measuring with full forwards",
                RuntimeWarning,
                stacklevel=2,
            )
        self.reuse = False
        self.kept = {}


def _named(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@contextmanager
def nothing() -> Iterator[dict[int, Any]]:
    yield {}


@torch.no_grad()
def replay_problem(runner: Runner, probe: torch.Tensor, starts: Iterable[int | None]) -> str | None:
    """Why replaying from some block in ``starts`` does not give a full forward's logits.

    ``None`` when every start replays exactly. Checked once per measurement, on the first
    ``PROBE_TOKENS`` tokens: the baseline keeps every start's prefix output, a forward on
    half the probe then leaves different state in every block, and the replays run from
    the last start down. A replay from ``L`` skips blocks ``0 .. L-1`` only, and none of
    them has run since the half-probe forward (each earlier replay started later), so a
    block from ``L`` on that reads state they left behind reads the half-probe's: a wrong
    value or a wrong shape, not the probe's own.
    """
    replayed = sorted({s for s in starts if s}, reverse=True)
    if not runner.reuse or not replayed:
        return None
    share = probe.shape[1] / runner.window_tokens
    expected = runner.baseline(probe, set(replayed), share=share)
    runner.run(probe[:, : max(probe.shape[1] // 2, 1)], None, share=share / 2)
    try:
        for start in replayed:
            problem = _replay_differs(runner, probe, start, share, expected)
            if problem:
                return problem
    finally:
        runner.kept = {}
    return None


def _replay_differs(
    runner: Runner, probe: torch.Tensor, start: int, share: float, expected: torch.Tensor
) -> str | None:
    """What is wrong with one replay from ``start``, or ``None``."""
    try:
        replayed = runner.replay(probe, start, share=share)
    except Exception as error:  # a model-specific failure: any exception class
        return f"replaying the blocks before block {start} raised {_named(error)}"
    if not _same_logits(replayed, expected):
        return f"replaying the blocks before block {start} changes the logits"
    return None


def _same_logits(replayed: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = float(expected.abs().max()) or 1.0
    return bool(torch.allclose(replayed, expected, rtol=1e-5, atol=1e-5 * scale))


def replay_is_exact(runner: Runner, probe: torch.Tensor, start: int | Iterable[int]) -> bool:
    """Whether replaying from ``start`` (one block or several) gives a full forward's logits."""
    starts = [start] if isinstance(start, int) else start
    return replay_problem(runner, probe, starts) is None
