"""Prefix reuse for verification: keep block ``L - 1``'s output once, replay it later.

Zeroing a weight in block ``L`` changes nothing before block ``L``: the baseline pass keeps
the output of the blocks where candidates start, and a candidate's pass replays it, so only
the blocks from ``L`` on run. :class:`Runner` runs both kinds of pass and counts the cost in
forward-equivalents; :func:`replay_is_exact` checks once per measurement that replaying
gives the logits of a full forward (a block that reads state an earlier block left behind
would not).
"""

from __future__ import annotations

from collections.abc import Iterator
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

        ``share`` is the chunk's length over a window's, for counting forwards.
        """
        if not self.reuse or not start or start - 1 not in self.kept:
            self.forwards += share
            return _logits(self.model, chunk, self.device)
        self.forwards += self.cost(start) * share
        with replayed_prefix(self.blocks, start, self.kept[start - 1]):
            return _logits(self.model, chunk, self.device)


@contextmanager
def nothing() -> Iterator[dict[int, Any]]:
    yield {}


@torch.no_grad()
def replay_is_exact(runner: Runner, probe: torch.Tensor, start: int) -> bool:
    """Whether replaying blocks before ``start`` gives the logits of a full forward.

    Checked once per measurement, on the first ``PROBE_TOKENS`` tokens: enough to catch a
    block that depends on more than its input, at a few percent of a window's cost.
    """
    expected = runner.baseline(probe, {start}, share=probe.shape[1] / runner.window_tokens)
    replayed = runner.run(probe, start, share=probe.shape[1] / runner.window_tokens)
    runner.kept = {}
    scale = float(expected.abs().max()) or 1.0
    return bool(torch.allclose(replayed, expected, rtol=1e-5, atol=1e-5 * scale))
