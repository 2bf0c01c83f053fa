"""The recorder: forward hooks that fold every call into running per-channel maxima.

Nothing but O(channels) state is kept per module: the largest ``|activation|`` each
channel has reached, the signed value there, and where (batch index, token position)
it happened. Full activations are never stored.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import find_down_projections


@dataclass(frozen=True)
class ChannelMaxima:
    """Per-channel running maxima of one tensor stream (a module's input or output).

    Attributes:
        abs_max: ``[C]`` float32, the largest ``|x|`` seen per channel.
        value: ``[C]`` float32, the signed value at that maximum.
        token: ``[C]`` int64, the token position (index along the sequence axis) of the maximum.
        batch: ``[C]`` int64, the batch index of the maximum within its call.
    """

    abs_max: torch.Tensor
    value: torch.Tensor
    token: torch.Tensor
    batch: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.abs_max.numel())

    def top(self) -> tuple[int, float]:
        """``(channel, abs_max)`` of the largest channel."""
        channel = int(self.abs_max.argmax())
        return channel, float(self.abs_max[channel])


@dataclass(frozen=True)
class ChannelStats:
    """What the recorder keeps for one module: input and output maxima and a call count."""

    input: ChannelMaxima | None
    output: ChannelMaxima | None
    calls: int


Locations = bool | int
"""Which channels get a location: ``True`` all, ``False`` none, ``k`` the k largest per call."""

LOCATED_CHANNELS = 32
"""The default: where the 32 largest channels of each call peaked. Finding a position is
an indexed reduction, ~8x a plain max on a CPU; done on 32 columns it costs almost nothing,
and a spike channel, the only kind detection asks the position of, is always among them."""


def channel_maxima(
    x: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    locations: Locations = True,
) -> ChannelMaxima:
    """Per-channel max ``|x|`` over every token of one activation, with where it happened.

    ``x`` is ``[batch, seq, channels]`` (or ``[tokens, channels]``, read as one sequence).
    ``token_mask`` (``[batch, seq]``, true for real tokens) keeps padding out of the max.
    ``locations`` says for which channels to find where the maximum happened: ``True``
    every channel, an int ``k`` the ``k`` largest, ``False`` none; the others get token and
    batch -1. Every location given is exact: the first token holding the channel's max.

    Works in the activation's own dtype (``|x|`` and a max need no arithmetic that could
    overflow); only the ``[C]`` results are cast to float32.

    Example:
        >>> m = channel_maxima(torch.tensor([[[1.0, -5.0], [3.0, 2.0]]]))
        >>> m.abs_max.tolist(), m.value.tolist(), m.token.tolist()
        ([3.0, 5.0], [3.0, -5.0], [1, 0])
        >>> channel_maxima(torch.tensor([[[1.0, -5.0], [3.0, 2.0]]]), locations=1).token.tolist()
        [-1, 0]
    """
    x = x.detach()
    seq_len = x.shape[-2] if x.dim() >= 2 else 1
    if token_mask is not None and x.dim() >= 3 and token_mask.shape == x.shape[:2]:
        x = x.masked_fill(~token_mask.to(device=x.device, dtype=torch.bool)[..., None], 0)
    flat = x.reshape(-1, x.shape[-1])
    count = _located_count(locations, flat.shape[-1])
    if count == 0:
        return _maxima_without_locations(flat)
    if count < flat.shape[-1]:
        return _maxima_located_in_largest(flat, count, seq_len)
    # One indexed reduction over |x| (not two, max and min), then the signed value is
    # gathered at the winning positions.
    abs_max, position = flat.abs().max(dim=0)
    value = flat.gather(0, position[None]).squeeze(0).float()
    return ChannelMaxima(abs_max.float(), value, position % seq_len, position // seq_len)


def _located_count(locations: Locations, channels: int) -> int:
    if isinstance(locations, bool):
        return channels if locations else 0
    if not isinstance(locations, int) or locations < 0:
        raise ValueError(
            f"locations must be True, False or a channel count >= 0, got {locations!r}"
        )
    return min(locations, channels)


def _maxima_located_in_largest(flat: torch.Tensor, count: int, seq_len: int) -> ChannelMaxima:
    """Plain max and min for every channel; positions only in the ``count`` largest."""
    unlocated = _maxima_without_locations(flat)
    chosen = unlocated.abs_max.topk(count).indices
    column = flat.index_select(1, chosen)
    _, position = column.abs().max(dim=0)
    value = unlocated.value.clone()
    value[chosen] = column.gather(0, position[None]).squeeze(0).float()
    token, batch = unlocated.token.clone(), unlocated.batch.clone()
    token[chosen], batch[chosen] = position % seq_len, position // seq_len
    return ChannelMaxima(unlocated.abs_max, value, token, batch)


def _maxima_without_locations(flat: torch.Tensor) -> ChannelMaxima:
    high, low = flat.amax(dim=0), flat.amin(dim=0)
    value = torch.where(-low > high, low, high).float()
    unknown = torch.full(value.shape, -1, dtype=torch.long, device=value.device)
    return ChannelMaxima(value.abs(), value, unknown, unknown.clone())


def merge_channel_maxima(a: ChannelMaxima | None, b: ChannelMaxima | None) -> ChannelMaxima | None:
    """Elementwise max of two running maxima; each channel keeps the winner's location."""
    if a is None or b is None:
        return a if b is None else b
    if a.abs_max.shape != b.abs_max.shape:
        raise ValueError(f"cannot merge maxima of {a.channels} and {b.channels} channels")
    b = _to_device(b, a.abs_max.device)
    # A NaN wins and stays: a non-finite activation must not vanish from the record.
    b_wins = (b.abs_max > a.abs_max) | (b.abs_max.isnan() & ~a.abs_max.isnan())
    return ChannelMaxima(
        *(
            torch.where(b_wins, getattr(b, f.name), getattr(a, f.name))
            for f in fields(ChannelMaxima)
        )
    )


def merge_stats(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    """Combine two modules' stats (e.g. from two processes) as if one had seen both."""
    return ChannelStats(
        merge_channel_maxima(a.input, b.input),
        merge_channel_maxima(a.output, b.output),
        a.calls + b.calls,
    )


def _to_device(m: ChannelMaxima, device: torch.device) -> ChannelMaxima:
    return ChannelMaxima(*(getattr(m, f.name).to(device) for f in fields(ChannelMaxima)))


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


ModuleSelection = Mapping[str, nn.Module] | Iterable[str] | str | re.Pattern[str] | None


class TokenMasks:
    """Which tokens are real in the forward call in progress, for hooks deep inside it.

    A training wrapper (a ``LightningModule``'s ``training_step``, a module that takes the
    whole batch) passes ``attention_mask=`` to the model it holds, not to the module that
    was handed to :func:`record`. So every module on the way from that one down to the
    recorded modules, and able to take ``attention_mask=``, gets a pair of hooks: on entry
    its call pushes the 2-D mask it was given, or the one already in force if it was given
    none (decoder layers get a 4-D one), and on exit it pops it. The innermost mask wins, an
    inner call never clears an outer one, and nothing outlives the outermost call.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, torch.Tensor | None]] = []

    @property
    def current(self) -> torch.Tensor | None:
        """``[batch, seq]`` bool, true for real tokens; ``None`` when no mask is in force."""
        return self._stack[-1][1] if self._stack else None

    def attach(
        self,
        model: nn.Module,
        recorded: Iterable[nn.Module],
        hooks: HookSet,
    ) -> None:
        """Hook the mask receivers of ``model`` on the way to ``recorded``, into ``hooks``."""
        # Eager under torch.compile, like the recorder's own bookkeeping.
        enter, leave = torch.compiler.disable(self._enter), torch.compiler.disable(self._leave)
        for module in mask_receivers(model, recorded):
            hooks.pre(module, enter, with_kwargs=True)
            hooks.forward(module, leave, with_kwargs=True, always_call=True)

    def clear(self) -> None:
        self._stack.clear()

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        given = token_mask(args, kwargs)
        self._stack.append((id(module), given if given is not None else self.current))

    def _leave(self, module: nn.Module, args: Any, kwargs: Any, output: Any = None) -> None:
        # always_call runs this even when an earlier pre-hook failed and _enter never did.
        if self._stack and self._stack[-1][0] == id(module):
            self._stack.pop()


def token_mask(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The call's ``attention_mask=`` as a ``[batch, seq]`` bool mask, if it is one.

    Only a 2-D mask shaped like the call's tokens counts: a decoder layer's 4-D mask is
    not one, nor is a cached generation step's mask, which also covers past tokens.
    """
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    tokens = _call_tokens(args, kwargs)
    if tokens is not None and tokens.dim() >= 2 and tuple(tokens.shape[:2]) != tuple(mask.shape):
        return None
    return mask.bool()


def _call_tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds", "hidden_states"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def mask_receivers(model: nn.Module, recorded: Iterable[nn.Module]) -> list[nn.Module]:
    """``model`` and the modules inside it that hold a recorded module and can be called
    with ``attention_mask=``: where a padding mask can enter on its way to the recorded ones.

    Only these are hooked, so the cost grows with the depth of the recorded modules, not
    with the size of the model.
    """
    targets = {id(module) for module in recorded}
    holds_target: dict[int, bool] = {}
    receivers: list[nn.Module] = []

    def visit(module: nn.Module) -> bool:
        if id(module) not in holds_target:
            # Every child is visited (no short cut): a target may hold further targets.
            below = [visit(child) or id(child) in targets for child in module.children()]
            holds_target[id(module)] = any(below)
            if (any(below) or module is model) and _takes_attention_mask(module):
                receivers.append(module)
        return holds_target[id(module)]

    visit(model)
    return receivers


def _takes_attention_mask(module: nn.Module) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: assume it may
        return True
    return any(p.name == "attention_mask" or p.kind is p.VAR_KEYWORD for p in parameters)


class Recorder:
    """Forward hooks that keep per-channel max ``|input|`` and ``|output|`` of chosen modules.

    Use :func:`record` to make one. Unlike the masks, it hooks the model when it is made,
    not on ``__enter__``: ``rec = record(model)`` records every forward from then on, until
    :meth:`remove`. It is also a context manager whose exit removes the hooks, even when
    the forward raised. A 2-D ``attention_mask=`` keeps padded tokens out of the maxima,
    whether it is passed to the model or, inside it, to the module that receives it (a
    training wrapper's inner model).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSelection = None,
        *,
        inputs: bool = True,
        outputs: bool = True,
        use_attention_mask: bool = True,
        locations: Locations = LOCATED_CHANNELS,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"record() needs a torch.nn.Module, got {type(model).__name__}")
        if not (inputs or outputs):
            raise ValueError("record(): nothing to record with inputs=False and outputs=False")
        selected = _select_modules(model, modules)
        _check_not_meta(selected)
        self.module_names: tuple[str, ...] = tuple(selected)
        _located_count(locations, 1)  # a bad value is refused before any hook exists
        self._inputs, self._outputs, self._locations = inputs, outputs, locations
        self._masks = TokenMasks()
        self._stats: dict[str, ChannelStats] = {}
        self._hooks = HookSet()
        with self._hooks.registering():
            for name, module in selected.items():
                self._hooks.forward(module, self._fold_hook(name))
            if use_attention_mask:
                self._masks.attach(model, selected.values(), self._hooks)

    # -- hooks ---------------------------------------------------------------------------
    def _fold_hook(self, name: str):
        def fold(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._fold(name, _first_tensor(args), _first_tensor(output))

        return fold

    # Run the bookkeeping eagerly under torch.compile: traced, the stats dict becomes part
    # of every graph's guards and each call recompiles (measured: 52x more captured calls).
    @torch.compiler.disable
    def _fold(self, name: str, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        previous = self._stats.get(name)
        mask, where = self._masks.current, self._locations
        new_in = (
            channel_maxima(x, mask, locations=where) if self._inputs and x is not None else None
        )
        new_out = (
            channel_maxima(y, mask, locations=where) if self._outputs and y is not None else None
        )
        if previous is None:
            self._stats[name] = ChannelStats(new_in, new_out, 1)
        else:
            self._stats[name] = merge_stats(previous, ChannelStats(new_in, new_out, 1))

    # -- results -------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, ChannelStats]:
        """``{module_name: ChannelStats}`` for every module called at least once."""
        return dict(self._stats)

    def reset(self) -> None:
        """Forget everything recorded so far; the hooks stay."""
        self._stats.clear()

    def merge(self, other: Recorder | Mapping[str, ChannelStats]) -> None:
        """Fold another recorder's stats (or a ``stats`` dict) into this one, elementwise max."""
        incoming = other.stats if isinstance(other, Recorder) else other
        for name, theirs in incoming.items():
            mine = self._stats.get(name)
            self._stats[name] = theirs if mine is None else merge_stats(mine, theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<module>.<input|output>.<field>": tensor, "<module>.calls": tensor}``."""
        return stats_to_state_dict(self._stats)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the recorded stats with a :meth:`state_dict`."""
        self._stats = stats_from_state_dict(state)

    # -- lifetime ------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook, newest first. Safe to call twice."""
        self._hooks.remove()
        self._masks.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def record(
    model: nn.Module,
    modules: ModuleSelection = None,
    *,
    inputs: bool = True,
    outputs: bool = True,
    use_attention_mask: bool = True,
    locations: Locations = LOCATED_CHANNELS,
) -> Recorder:
    """Record per-channel max ``|input|`` and ``|output|`` of the down-projections.

    The hooks are registered by this call, so recording starts at once; leaving a
    ``with`` block (or :meth:`Recorder.remove`) takes them off.

    Args:
        model: any ``nn.Module``.
        modules: which modules to hook: ``None`` for the down-projections
            (:func:`~sw_hooks.core.locate.find_down_projections`), a glob or compiled regex,
            a list of module names, or a ``{name: module}`` mapping.
        inputs, outputs: which side(s) to record.
        use_attention_mask: ignore padded tokens, taking the 2-D ``attention_mask=``
            from the model's call or from the innermost module on the way to the recorded
            modules that is called with one (a ``LightningModule`` or training wrapper
            passes it to the model it holds).
        locations: for which channels to keep where the maximum happened (token, batch
            index): the :data:`LOCATED_CHANNELS` (32) largest of each call by default,
            ``True`` for every channel (an indexed reduction over the whole activation,
            about 6% of a forward on a CPU), ``False`` for none. Channels without a
            location have token and batch -1; every location kept is exact.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=2)
        >>> with record(model) as rec:
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> sorted(rec.stats)[0], rec.stats["model.layers.0.mlp.down_proj"].calls
        ('model.layers.0.mlp.down_proj', 1)
    """
    return Recorder(
        model,
        modules,
        inputs=inputs,
        outputs=outputs,
        use_attention_mask=use_attention_mask,
        locations=locations,
    )


def _select_modules(model: nn.Module, modules: ModuleSelection) -> dict[str, nn.Module]:
    if modules is None or isinstance(modules, str | re.Pattern):
        return find_down_projections(model, modules)
    if isinstance(modules, Mapping):
        return dict(modules)
    names = list(modules)
    try:
        return {name: model.get_submodule(name) for name in names}
    except AttributeError as error:
        raise ValueError(f"record(): {error}") from None


def _check_not_meta(modules: Mapping[str, nn.Module]) -> None:
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        offloaded = getattr(module, "_hf_hook", None) is not None
        if isinstance(weight, torch.Tensor) and weight.device.type == "meta" and not offloaded:
            raise ValueError(
                f"{name} is on the meta device (no real weights); load the model with its "
                "weights, or with accelerate offloading, before recording"
            )


_FIELDS = tuple(f.name for f in fields(ChannelMaxima))


def stats_to_state_dict(stats: Mapping[str, ChannelStats]) -> dict[str, torch.Tensor]:
    """Flatten ``{module: ChannelStats}`` into a tensor dict (checkpoint and all-reduce friendly)."""
    state: dict[str, torch.Tensor] = {}
    for name, s in stats.items():
        state[f"{name}.calls"] = torch.tensor(s.calls)
        for side in ("input", "output"):
            maxima = getattr(s, side)
            if maxima is not None:
                for field in _FIELDS:
                    state[f"{name}.{side}.{field}"] = getattr(maxima, field).clone()
    return state


def stats_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, ChannelStats]:
    """Inverse of :func:`stats_to_state_dict`."""
    names = [key[: -len(".calls")] for key in state if key.endswith(".calls")]
    if not names and state:
        raise ValueError("not a recorder state_dict: no '<module>.calls' entries")
    return {
        name: ChannelStats(
            _side_from_state(state, name, "input"),
            _side_from_state(state, name, "output"),
            int(state[f"{name}.calls"]),
        )
        for name in names
    }


def _side_from_state(
    state: Mapping[str, torch.Tensor], name: str, side: str
) -> ChannelMaxima | None:
    keys = [f"{name}.{side}.{field}" for field in _FIELDS]
    if not any(k in state for k in keys):
        return None
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"recorder state_dict lacks {missing}")
    return ChannelMaxima(*(state[k].clone() for k in keys))
