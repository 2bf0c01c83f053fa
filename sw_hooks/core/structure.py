"""Find the MLP output projections of any ``nn.Module`` from its data flow, not its names.

One forward on a small example input runs under a ``TorchDispatchMode`` that records every
aten operation as a node of a data-flow graph (which node made each tensor, which nodes
each operation read). Forward hooks on every linear-like module mark which nodes are a
linear's input and output. A linear is an **MLP output projection** when

1. **its input is an elementwise function of other linears' outputs**: walking back from
   its input through operations tagged ``torch.Tag.pointwise`` (activations, products,
   sums, casts) and pure reshapes (views, slices, splits, copies), every path ends at a
   linear's output or a constant, and at least one pointwise operation is on the way:
   ``act(fc1(x))``, ``act(gate(x)) * up(x)``, a fused ``gate_up`` split in two. An
   attention output (a matmul or softmax), a state-space scan or a normalisation (a
   reduction) ends the walk and rules the linear out;
2. **its input is wider than its output** (the intermediate size is above the hidden size);
3. **its output is added to the residual stream**: walking forward from its output through
   pointwise operations and reshapes reaches an addition whose other operand is an
   ancestor of the projection's own input (the block input it was computed from). Sums
   on the way (GPT-J and Phi add the attention and MLP outputs before the residual) and
   a norm after the MLP (Gemma 2) are walked through. The other operand may also be a
   pointwise function of such an ancestor: DeepNorm's ``alpha * h + mlp(h)``, a residual
   kept in float32 in a bfloat16 model (``h.float() + mlp(h)``), or parallel blocks written
   ``x + attn + mlp``. Permutes and transposes count as reshapes (ConvNeXt permutes its
   channels-last MLP output back before the add).

Tensor identity, not numerical comparison, links the graph, so the answer does not depend
on the weights: a random model and a trained one give the same modules. The answer is kept
per model, example and dtype (:mod:`sw_hooks.core.structure_answers`), and a projection
found in some repeated blocks but not in their siblings is warned about by name.
The trace runs in eval mode without gradients; hooks the caller registered on the model
see that one forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sw_hooks.core.devices import execution_device
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.structure_answers import dtype_key, example_key, warn_missed_blocks


@dataclass(frozen=True)
class CallArguments:
    """A forward call's positional and keyword arguments together, as an example input."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


ExampleInput = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any] | CallArguments


class ExampleInputNeeded(ValueError):
    """No example input could be built for a structural trace: the caller must give one
    (or, for :func:`~sw_hooks.core.record.record`, the model's first call is traced)."""


# aten operations that move or re-view values without changing them.
_RESHAPES = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "slice",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "expand",
        "clone",
        "_to_copy",
        "contiguous",
        "alias",
        "detach",
        "unsqueeze",
        "squeeze",
        "lift_fresh",
        "permute",
        "transpose",
        "t",
        "movedim",
    }
)
_ADDITIONS = frozenset({"add", "add_"})
_TOKENS, _DECODER_TOKENS = 8, 4


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear``, transformers' ``Conv1D`` and any module with a 2-D ``weight``."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


@dataclass(frozen=True)
class _Node:
    kind: str  # "pointwise", "reshape", "add" (also pointwise), "other", or "input"
    inputs: tuple[int, ...]


@dataclass(frozen=True)
class _LinearCall:
    module: str
    input_node: int
    output_node: int
    input_width: int
    output_width: int


def _kind(func: torch._ops.OpOverload) -> str:
    name = func.overloadpacket.__name__
    if name in _ADDITIONS:
        return "add"
    if torch.Tag.pointwise in func.tags:
        return "pointwise"
    return "reshape" if name in _RESHAPES else "other"


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class _DataflowTrace(TorchDispatchMode):
    """Every aten call of a forward as a node; tensors are linked to nodes by identity."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[_Node] = []
        self._node_of: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []  # a live tensor's id is never reused

    def node_of(self, tensor: torch.Tensor | None) -> int | None:
        return None if tensor is None else self._node_of.get(id(tensor))

    def add_inputs(self, example: Any) -> None:
        """Give the example's tensors nodes: a block may add its MLP to the model's input."""
        for tensor in _tensors(example):
            self.nodes.append(_Node("input", ()))
            self._node_of[id(tensor)] = len(self.nodes) - 1
            self._alive.append(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        inputs = tuple(
            node for t in _tensors((args, kwargs)) if (node := self._node_of.get(id(t))) is not None
        )
        out = func(*args, **kwargs)
        self.nodes.append(_Node(_kind(func), inputs))
        for tensor in _tensors(out):
            self._node_of[id(tensor)] = len(self.nodes) - 1
            self._alive.append(tensor)
        return out


@dataclass
class _Graph:
    nodes: list[_Node]
    calls: list[_LinearCall]
    consumers: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, node in enumerate(self.nodes):
            for source in node.inputs:
                self.consumers.setdefault(source, []).append(index)

    def ancestors(self, node: int) -> set[int]:
        seen, stack = {node}, [node]
        while stack:
            for source in self.nodes[stack.pop()].inputs:
                if source not in seen:
                    seen.add(source)
                    stack.append(source)
        return seen


def _activation_sources(graph: _Graph, call: _LinearCall, linear_outputs: set[int]) -> set[int]:
    """Criterion 1: the linear outputs the input is a pointwise function of (and constants).

    Empty when the input is not one: another operation is on the way, no linear output is
    reached, or only reshapes are (no activation).
    """
    stack, seen, sources = [call.input_node], set(), set()
    saw_pointwise = False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linear_outputs:
            sources.add(node)
            continue
        kind = graph.nodes[node].kind
        if kind == "input":
            continue  # the model's input counts as a constant here
        if kind == "other":
            return set()
        saw_pointwise |= kind != "reshape"
        stack.extend(graph.nodes[node].inputs)
    return sources if saw_pointwise else set()


def _derives_from(graph: _Graph, node: int, upstream: set[int], own_output: int) -> bool:
    """``node`` is in ``upstream`` or a pointwise function of it, not of ``own_output``:
    ``alpha * h``, ``h.float()``, ``x + attn`` for a block input ``h`` or ``x``."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in upstream:
            return True
        if current in seen or current == own_output or graph.nodes[current].kind == "other":
            continue
        seen.add(current)
        stack.extend(graph.nodes[current].inputs)
    return False


def _adds_to_residual(graph: _Graph, call: _LinearCall) -> bool:
    """Criterion 3: the output reaches an addition with (a pointwise function of) an
    ancestor of the input."""
    upstream = graph.ancestors(call.input_node)
    stack, seen = [call.output_node], {call.output_node}
    while stack:
        node = stack.pop()
        for consumer in graph.consumers.get(node, []):
            if consumer in seen or graph.nodes[consumer].kind == "other":
                continue
            seen.add(consumer)
            others = [i for i in graph.nodes[consumer].inputs if i != node]
            if graph.nodes[consumer].kind == "add" and any(
                _derives_from(graph, i, upstream, call.output_node) for i in others
            ):
                return True
            stack.append(consumer)
    return False


def output_projections_in(graph: _Graph) -> list[str]:
    """Names of the modules with a call meeting all three criteria, in call order."""
    linear_outputs = {call.output_node for call in graph.calls}
    found: list[str] = []
    for call in graph.calls:
        if call.module in found or call.input_width <= call.output_width:
            continue
        if _activation_sources(graph, call, linear_outputs) and _adds_to_residual(graph, call):
            found.append(call.module)
    return found


def feeding_linears(model: nn.Module, module: str, example: ExampleInput) -> list[str]:
    """The linear-like modules whose outputs ``module``'s input is a pointwise function of.

    For an MLP output projection: its input projections (``fc1``; ``gate_proj`` and
    ``up_proj``; a fused ``gate_up_proj``), from one traced forward on ``example``.

    Raises:
        ValueError: ``module`` was not called, or its input is not such a function.
    """
    graph = trace_linears(model, example)
    owner = {call.output_node: call.module for call in graph.calls}
    for call in (c for c in graph.calls if c.module == module):
        sources = _activation_sources(graph, call, set(owner))
        if sources:
            return sorted({owner[node] for node in sources})
    raise ValueError(f"{module} does not read a pointwise function of other linears' outputs")


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _linear_hook(trace: _DataflowTrace, name: str, calls: list[_LinearCall]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x, y = _first_tensor(args, kwargs), _first_tensor((out,), {})
        x_node, y_node = trace.node_of(x), trace.node_of(y)
        if x is None or y is None or x_node is None or y_node is None:
            return
        if not (x.is_floating_point() and y.is_floating_point()) or x.dim() == 0:
            return
        calls.append(_LinearCall(name, x_node, y_node, x.shape[-1], y.shape[-1]))

    return hook


def _call(model: nn.Module, example: ExampleInput) -> None:
    if isinstance(example, torch.Tensor):
        model(example)
    elif isinstance(example, Mapping):
        model(**example)
    elif isinstance(example, CallArguments):
        model(*example.args, **example.kwargs)
    else:
        model(*example)


@contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """Silence transformers' advice (slow-kernel fallbacks...) during the probe forward: it is
    about the probe, not about anything the user runs."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def trace_linears(model: nn.Module, example: ExampleInput) -> _Graph:
    """Run ``model`` once on ``example`` (eval mode, no gradients) and return its data flow."""
    trace, calls = _DataflowTrace(), []
    modes = {module: module.training for module in model.modules()}
    try:
        with HookSet() as hooks, torch.no_grad():
            for name, module in model.named_modules():
                if name and is_linear_like(module) and not isinstance(module, nn.Embedding):
                    hooks.forward(module, _linear_hook(trace, name, calls), with_kwargs=True)
            model.eval()
            trace.add_inputs(example.args if isinstance(example, CallArguments) else example)
            trace.add_inputs(example.kwargs if isinstance(example, CallArguments) else ())
            with trace, _quiet_library_logs():
                _call(model, example)
    finally:
        for module, training in modes.items():
            module.training = training
    return _Graph(trace.nodes, calls)


def _int_ids(length: int, vocab: int, device: torch.device) -> torch.Tensor:
    # Ids from 2 on: 0 and 1 are often padding and start tokens.
    return (torch.arange(length, device=device) % max(vocab - 2, 1) + 2)[None] % vocab


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )


def _noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A private generator: building an input must not move the caller's random stream.
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device, dtype)


def _pixels(config: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return _noise((1, getattr(config, "num_channels", 3), height, width), dtype, device)


def example_input(model: nn.Module) -> dict[str, torch.Tensor]:
    """A small input for ``model`` built from its Hugging Face config.

    Token models get 8 ids (encoder-decoders 4 decoder ids too), vision models one image of
    the configured size, Whisper-like audio encoders one window of mel features.

    Raises:
        ValueError: the model has no config, or its input kind is not one this knows.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> example_input(tiny_model("llama", num_layers=1))["input_ids"].shape
        torch.Size([1, 8])
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ExampleInputNeeded(
            f"cannot build an example input for {type(model).__name__}: it has no Hugging "
            "Face config; pass example_input= (a tensor, a tuple of arguments or a dict)"
        )
    device, dtype = execution_device(model), _float_dtype(model)
    main = getattr(model, "main_input_name", "input_ids")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    inputs: dict[str, torch.Tensor] = {}
    if main == "input_ids" and getattr(text, "vocab_size", None):
        inputs["input_ids"] = _int_ids(_TOKENS, text.vocab_size, device)
    elif main == "pixel_values" and hasattr(config, "image_size"):
        inputs["pixel_values"] = _pixels(config, dtype, device)
    elif main == "input_features" and hasattr(config, "num_mel_bins"):
        frames = 2 * config.max_source_positions
        inputs["input_features"] = _noise((1, config.num_mel_bins, frames), dtype, device)
    else:
        raise ExampleInputNeeded(
            f"cannot build an example input for {type(model).__name__} (main input "
            f"{main!r}); pass example_input= (a tensor, a tuple of arguments or a dict)"
        )
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = _int_ids(_DECODER_TOKENS, text.vocab_size, device)
    return inputs


def check_example_input(example: object) -> None:
    """Refuse an ``example_input`` that is not a tensor, an argument tuple/list or a dict."""
    accepted = torch.Tensor | tuple | list | Mapping | CallArguments
    if example is not None and not isinstance(example, accepted):
        raise TypeError(
            "example_input must be a tensor, a tuple of arguments or a dict of keyword "
            f"arguments, got {type(example).__name__}"
        )


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, list[str]]] = (
    weakref.WeakKeyDictionary()
)


def _answer_key(model: nn.Module, example: ExampleInput | None) -> Hashable:
    """The modules (by identity), the dtypes and the example: what the answer depends on."""
    modules = tuple((n, id(m)) for n, m in model.named_modules() if is_linear_like(m))
    return (modules, dtype_key(model), example_key(example))


def _cached_answer(
    model: nn.Module, key: Hashable, example: ExampleInput | None
) -> list[str] | None:
    """The kept answer for ``key``; a call with no example takes the answer found on the
    last example given for the same modules and dtypes (a hand-written model located on
    the user's first input has no example of its own to trace again)."""
    cached = _CACHE.get(model)
    if cached is None:
        return None
    same = cached[0] == key or (example is None and cached[0][:2] == key[:2])
    return list(cached[1]) if same else None


def find_output_projections(model: nn.Module, example: ExampleInput | None = None) -> list[str]:
    """Names of ``model``'s MLP output projections, found by structure, in call order.

    One traced forward on ``example`` (default: :func:`example_input`); the answer is kept
    per model until its linear-like modules, its dtype or the example change, so repeated
    calls cost nothing; a call with no example reuses the answer of the last example. A projection found in some repeated blocks and not in their
    siblings raises a :class:`~sw_hooks.core.structure_answers.MissedBlocksWarning`
    naming the missed ones.

    Raises:
        TypeError: ``example`` is of a type the model cannot be called with.
        ExampleInputNeeded: no example input could be built (a ``ValueError``).
        ValueError: the traced forward failed.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> find_output_projections(tiny_model("gpt2", num_layers=2))
        ['transformer.h.0.mlp.c_proj', 'transformer.h.1.mlp.c_proj']
    """
    check_example_input(example)
    key = _answer_key(model, example)
    cached = _cached_answer(model, key, example)
    if cached is not None:
        return cached
    traced = example_input(model) if example is None else example
    try:
        graph = trace_linears(model, traced)
    except Exception as error:
        raise ValueError(
            f"the traced forward of {type(model).__name__} on its example input failed "
            f"({type(error).__name__}: {error}); pass example_input= that the model accepts"
        ) from error
    found = output_projections_in(graph)
    warn_missed_blocks(model, found, {call.module for call in graph.calls})
    _CACHE[model] = (key, found)
    return list(found)
