"""Per-channel running maxima: the recorder's only state, and its checkpoint form.

Nothing but O(channels) state is kept per recorded unit: the largest ``|activation|`` each
channel has reached, the signed value there, and where (batch index, token position) it
happened. Full activations are never stored. A layer's experts keep the same maxima with a
leading expert axis (:class:`ExpertStats`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch


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


def beats(incoming: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The max-merge rule, per channel: ``incoming`` replaces ``current`` when larger.

    A NaN wins and stays: a non-finite activation must not vanish from the record. Ties
    keep ``current``. Every merge of running maxima (the recorder's, the metric's across
    steps and processes) decides with this one rule.

    Example:
        >>> beats(torch.tensor([3.0, 1.0, float("nan")]), torch.tensor([2.0, 1.0, 9.0])).tolist()
        [True, False, True]
    """
    return (incoming > current) | (incoming.isnan() & ~current.isnan())


def merge_channel_maxima(a: ChannelMaxima | None, b: ChannelMaxima | None) -> ChannelMaxima | None:
    """Elementwise max of two running maxima; each channel keeps the winner's location."""
    if a is None or b is None:
        return a if b is None else b
    if a.abs_max.shape != b.abs_max.shape:
        raise ValueError(f"cannot merge maxima of {a.channels} and {b.channels} channels")
    b = _to_device(b, a.abs_max.device)
    b_wins = beats(b.abs_max, a.abs_max)
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


@dataclass(frozen=True)
class ExpertStats:
    """What the expert recorder keeps for one layer's experts.

    Attributes:
        input: ``[experts, intermediate]`` maxima of the down-projections' inputs.
        output: ``[experts, hidden]`` maxima of the down-projections' outputs.
        tokens: ``[experts]`` int64, tokens routed to each expert.
        calls: forward calls of the experts module (fused layout) or of the experts'
            down-projections (list layout).

    Positions (``token``, ``batch``) are -1 where an expert was never routed to, and for
    the list layout, whose experts only see their gathered tokens.
    """

    input: ChannelMaxima | None
    output: ChannelMaxima | None
    tokens: torch.Tensor
    calls: int

    def expert(self, expert: int) -> ChannelStats:
        """One expert's maxima, as a dense module's :class:`ChannelStats`."""

        def row(m: ChannelMaxima | None) -> ChannelMaxima | None:
            return (
                None
                if m is None
                else ChannelMaxima(*(getattr(m, f.name)[expert] for f in fields(m)))
            )

        return ChannelStats(row(self.input), row(self.output), int(self.tokens[expert]))

    def output_peaks(self) -> torch.Tensor:
        """``[experts]`` max ``|down_proj output|`` of each expert (0 if never routed)."""
        if self.output is None:
            raise ValueError("outputs were not recorded")
        return self.output.abs_max.amax(dim=1)


def empty_expert_maxima(experts: int, channels: int, device: torch.device) -> ChannelMaxima:
    zeros = torch.zeros(experts, channels, device=device)
    unknown = torch.full((experts, channels), -1, dtype=torch.long, device=device)
    return ChannelMaxima(zeros, zeros.clone(), unknown, unknown.clone())


def set_expert_row(
    target: ChannelMaxima, expert: int, maxima: ChannelMaxima, positions: torch.Tensor
):
    """Write one expert's maxima into row ``expert``; ``positions`` maps local rows to flat tokens."""
    target.abs_max[expert] = maxima.abs_max
    target.value[expert] = maxima.value
    target.token[expert] = positions[maxima.token]


def merge_expert_stats(a: ExpertStats | None, b: ExpertStats) -> ExpertStats:
    """Elementwise max of maxima, sum of routing counts and calls."""
    if a is None:
        return b
    return ExpertStats(
        merge_channel_maxima(a.input, b.input),
        merge_channel_maxima(a.output, b.output),
        a.tokens + b.tokens.to(a.tokens.device),
        a.calls + b.calls,
    )


_FIELDS = tuple(f.name for f in fields(ChannelMaxima))


def stats_to_state_dict(
    stats: Mapping[str, ChannelStats | ExpertStats],
) -> dict[str, torch.Tensor]:
    """Flatten ``{module: ChannelStats | ExpertStats}`` into a tensor dict (checkpoint and
    all-reduce friendly); an experts module adds ``"<module>.tokens"``, its routing counts."""
    state: dict[str, torch.Tensor] = {}
    for name, s in stats.items():
        state[f"{name}.calls"] = torch.tensor(s.calls)
        if isinstance(s, ExpertStats):
            state[f"{name}.tokens"] = s.tokens.clone()
        for side in ("input", "output"):
            maxima = getattr(s, side)
            if maxima is not None:
                for field in _FIELDS:
                    state[f"{name}.{side}.{field}"] = getattr(maxima, field).clone()
    return state


def stats_from_state_dict(
    state: Mapping[str, torch.Tensor],
) -> dict[str, ChannelStats | ExpertStats]:
    """Inverse of :func:`stats_to_state_dict`."""
    names = [key[: -len(".calls")] for key in state if key.endswith(".calls")]
    if not names and state:
        raise ValueError("not a recorder state_dict: no '<module>.calls' entries")
    return {name: _stats_from_state(state, name) for name in names}


def _stats_from_state(state: Mapping[str, torch.Tensor], name: str) -> ChannelStats | ExpertStats:
    sides = (_side_from_state(state, name, "input"), _side_from_state(state, name, "output"))
    calls = int(state[f"{name}.calls"])
    if f"{name}.tokens" in state:
        return ExpertStats(*sides, state[f"{name}.tokens"].clone(), calls)
    return ChannelStats(*sides, calls)


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
