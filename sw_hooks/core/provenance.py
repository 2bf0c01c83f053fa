"""What an impact was measured on: the text, its tokens, the windows, and screening.

Every impact a detection result holds is a perplexity ratio over some tokens; the same
weight reads x5.2 on one text and x20 on another, or with other windows. A result carries
one :class:`Calibration` (the text's name and digest, the tokens, the windows, the guard
of screening) and each impact its own token count and whether it was screened.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def token_digest(batch: torch.Tensor | Mapping[str, torch.Tensor]) -> str:
    """The first 16 hex digits of the SHA-256 of ``batch``: token ids as little-endian int64,
    a dict of inputs as each name and tensor in name order.

    Example:
        >>> token_digest(torch.tensor([[1, 2, 3]]))
        'e2e2033ae7e19d68'
    """
    digest = hashlib.sha256()
    tensors = dict(sorted(batch.items())) if isinstance(batch, Mapping) else {"": batch}
    for name, tensor in tensors.items():
        digest.update(name.encode())
        data = tensor.detach().cpu()
        wide = data.double() if data.is_floating_point() else data.long()  # bf16 has no numpy
        digest.update(wide.numpy().astype("<f8" if wide.is_floating_point() else "<i8").tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """What every impact of a detection result was measured on.

    Attributes:
        name: the text's name as the caller gave it (a file, ``pydoc_data.topics``);
            ``None`` when none was given.
        digest: the first 16 hex digits of the SHA-256 of the measured token ids (as
            little-endian int64; of the inputs' tensors, by name, for other losses): the
            same digest, the same tokens.
        tokens: tokens in the calibration; scored: tokens whose loss counts in an impact
            that was not screened.
        window, stride: perplexity windows (for other losses: chunks of ``window`` tokens).
        screened_tokens: tokens of the first window, what a screened impact is scored on.
        screened_joint_ratio: the impact of every screened candidate removed together over
            all ``scored`` tokens (``None`` when none was screened): the guard.
        loss: what was measured (``"perplexity"`` for a causal LM).
    """

    name: str | None
    digest: str
    tokens: int
    scored: int
    window: int
    stride: int
    screened_tokens: int | None = None
    screened_joint_ratio: float | None = None
    loss: str = "perplexity"

    def describe(self) -> str:
        """One line for tables: ``pydoc_data.topics (sha256 1a2b...), 1023 tokens scored, ...``."""
        name = self.name or "the calibration tokens"
        windows = f"windows of {self.window}, stride {self.stride}"
        return f"{name} (sha256 {self.digest}), {self.scored} tokens scored, {windows}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Build from :meth:`to_dict` output, checking every field with a clear error."""
        if not isinstance(data, dict):
            raise ValueError(f"'calibration' must be a JSON object, got {type(data).__name__}")
        checks = {
            "name": lambda v: v is None or isinstance(v, str),
            "digest": lambda v: isinstance(v, str) and bool(v),
            "tokens": _is_count,
            "scored": _is_count,
            "window": _is_count,
            "stride": _is_count,
            "screened_tokens": lambda v: v is None or _is_count(v),
            "screened_joint_ratio": lambda v: v is None or _is_number(v),
            "loss": lambda v: isinstance(v, str),
        }
        unknown = set(data) - set(checks)
        if unknown:
            raise ValueError(f"unknown calibration field(s): {sorted(unknown)}")
        for name, ok in checks.items():
            if name in data and not ok(data[name]):
                raise ValueError(f"calibration field {name!r} has a bad value: {data[name]!r}")
        missing = [
            n for n in ("name", "digest", "tokens", "scored", "window", "stride") if n not in data
        ]
        if missing:
            raise ValueError(f"calibration lacks {missing}")
        return cls(**data)
