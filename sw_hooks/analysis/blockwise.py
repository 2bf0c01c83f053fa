"""Block-major execution: every sequence goes through a block before the next block loads.

A model's forward runs one input through every block. Detection runs many inputs (the
prompt; each calibration window unablated, with each candidate zeroed, with all of them
zeroed) through the same blocks, so when the blocks live on disk
(:class:`~sw_hooks.core.streaming.StreamedModel`) the order is turned around: block ``i`` is
loaded once, every :class:`Stream` runs through it, then block ``i + 1`` loads.

What a block receives besides the hidden state (attention mask, rotary embeddings, position
ids, per-layer variants of them) is taken from the model itself: :func:`capture_calls`
runs the model's forward once per input with every block replaced by a catcher that keeps
its arguments and passes the hidden state on unchanged (nothing in the blocks is computed
or needed). After the last block, :func:`head_logits` runs the model's forward again with
every block replaying the stream's final output, so the final norm and the LM head are the
model's own; only the positions asked for reach the LM head.

This assumes what prefix reuse (:mod:`sw_hooks.analysis.prefix`) assumes: a block depends
only on what it is called with. A model whose blocks read state an earlier block left
behind cannot be run this way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.prefix import replayed_prefix
from sw_hooks.core.devices import execution_device
from sw_hooks.core.streaming import StreamedModel

Ablation = Callable[[nn.Module, Sequence[Any]], AbstractContextManager[Any]]


@dataclass(frozen=True)
class BlockCalls:
    """What one input's forward hands each block: the hidden state entering block 0, and
    per block the other positional arguments and the keyword arguments."""

    ids: torch.Tensor
    entry: torch.Tensor
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    tuple_output: bool


@dataclass(eq=False)
class Stream:
    """One input on its way through the blocks.

    A stream with a ``parent`` starts at block ``start`` from the parent's hidden state
    entering that block (prefix reuse: the blocks before ``start`` are the parent's). Each
    item of ``ablated`` is removed (by the sweep's ablation) while its own block runs.
    """

    calls: BlockCalls
    start: int = 0
    ablated: tuple[Any, ...] = ()
    parent: Stream | None = None
    hidden: torch.Tensor | None = None
    output: Any = None
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = int(self.calls.ids.shape[-1])


def _takes(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _forward(model: nn.Module, ids: torch.Tensor, logits_to_keep: int | None = None) -> Any:
    """The model's forward without a KV cache (streams would share it), keeping some logits."""
    extra: dict[str, Any] = {"use_cache": False} if _takes(model, "use_cache") else {}
    if logits_to_keep is not None and _takes(model, "logits_to_keep"):
        extra["logits_to_keep"] = logits_to_keep
    return model(ids.to(execution_device(model)), **extra)


@contextmanager
def _catchers(blocks: nn.ModuleList, tuple_output: bool) -> Iterator[list[tuple[tuple, dict]]]:
    """Every block keeps what it is called with and returns its hidden state unchanged."""
    caught: list[tuple[tuple, dict]] = []

    def catch(*args: Any, **kwargs: Any) -> Any:
        caught.append((args, kwargs))
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if tuple_output else hidden

    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block in blocks:
            block.forward = catch
        yield caught
    finally:
        for block, own in zip(blocks, saved, strict=True):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own


@torch.no_grad()
def capture_calls(streamed: StreamedModel, ids: torch.Tensor) -> BlockCalls:
    """Each block's call arguments for ``ids``, from one forward through catchers.

    Blocks return a tensor or a tuple whose first item is the hidden state; the catchers
    first return a tensor, and a tuple if the model did not pass their tensor on as it was.
    """
    for tuple_output in (False, True):
        with _catchers(streamed.blocks, tuple_output) as caught:
            try:
                _forward(streamed.model, ids, logits_to_keep=1)
            except (IndexError, TypeError, RuntimeError):
                # The model took the first item of what it thought was a tuple: retry with one.
                continue
        hiddens = [args[0] if args else kwargs["hidden_states"] for args, kwargs in caught]
        if len(caught) == len(streamed.blocks) and all(h is hiddens[0] for h in hiddens):
            return BlockCalls(
                ids,
                hiddens[0],
                [args[1:] for args, _ in caught],
                [{k: v for k, v in kwargs.items() if k != "hidden_states"} for _, kwargs in caught],
                tuple_output,
            )
    raise ValueError(
        f"{type(streamed.model).__name__} does not call each of its {len(streamed.blocks)} "
        "blocks once with the previous block's output: it cannot run block by block"
    )


@dataclass
class SweepCost:
    """What sweeps cost: blocks run (per stream, weighted by its tokens over ``window``)."""

    window: int
    blocks: int
    block_runs: float = 0.0
    sweeps: int = 0

    @property
    def forwards(self) -> float:
        """Forward-equivalents of the blocks: block runs over blocks in the model."""
        return self.block_runs / self.blocks


def sweep(
    streamed: StreamedModel,
    streams: Sequence[Stream],
    ablation: Ablation,
    block_of: Callable[[Any], int | None],
    cost: SweepCost,
    *,
    first: int = 0,
    around: Callable[[int], AbstractContextManager[Any]] | None = None,
) -> None:
    """Run every stream through blocks ``first ..``, each block loaded once.

    ``around(index)`` is entered once per block, with its weights loaded and the streams
    that start there forked (a recorder for the block's modules, say). A stream's
    ``ablated`` items are removed from block ``i`` (``block_of(item) == i``) while that
    stream runs it, and put back before the next stream runs.
    """
    cost.sweeps += 1
    for index in range(first, len(streamed.blocks)):
        for stream in streams:
            if stream.start == index and stream.hidden is None:
                stream.hidden = stream.parent.hidden if stream.parent else stream.calls.entry
        with streamed.block(index) as block, around(index) if around else nullcontext():
            for stream in streams:
                if stream.start > index:
                    continue
                removed = [item for item in stream.ablated if block_of(item) == index]
                with ablation(streamed.model, removed) if removed else nullcontext():
                    output = block(
                        stream.hidden, *stream.calls.args[index], **stream.calls.kwargs[index]
                    )
                stream.output = output
                stream.hidden = output[0] if stream.calls.tuple_output else output
                cost.block_runs += stream.tokens / cost.window


@torch.no_grad()
def head_logits(streamed: StreamedModel, stream: Stream, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions of a stream that ran every block (float32).

    The model's own forward, with every block replaying the stream's final output: the
    embeddings are looked up again (a gather), then the final norm and the LM head run on the
    kept positions only.
    """
    if stream.output is None:
        raise ValueError("the stream has not run the last block")
    with replayed_prefix(streamed.blocks, len(streamed.blocks), stream.output):
        output = _forward(streamed.model, stream.calls.ids, logits_to_keep=keep)
    logits = output.logits if hasattr(output, "logits") else output
    return logits[:, -keep:].float()
