"""Published super-weight coordinates, looked up by model id.

Sources: arXiv 2411.07191 (Table 2 and the authors' code). Coordinates are
``layers[layer].mlp.down_proj.weight[row, col]`` in ``[out, in]`` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sw_hooks.core.results import SuperWeight


@dataclass(frozen=True)
class KnownSuperWeight:
    layer: int
    row: int
    col: int

    def matches(self, weight: SuperWeight) -> bool:
        return (weight.layer, weight.row, weight.col) == (self.layer, self.row, self.col)


def _weights(*triples: tuple[int, int, int]) -> tuple[KnownSuperWeight, ...]:
    return tuple(KnownSuperWeight(*t) for t in triples)


KNOWN_SUPER_WEIGHTS: dict[str, tuple[KnownSuperWeight, ...]] = {
    "huggyllama/llama-7b": _weights((2, 3968, 7003)),
    "huggyllama/llama-13b": _weights((2, 2231, 2278), (2, 2231, 6939)),
    "huggyllama/llama-30b": _weights((3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)),
    "meta-llama/Llama-2-7b-hf": _weights((1, 2533, 7890)),
    "meta-llama/Llama-2-13b-hf": _weights((3, 4743, 7678)),
    "meta-llama/Meta-Llama-3-8B": _weights((1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)),
    "mistralai/Mistral-7B-v0.1": _weights((1, 2070, 7310)),
    "allenai/OLMo-1B-0724-hf": _weights((1, 1764, 1710), (1, 1764, 8041)),
    "allenai/OLMo-7B-0724-hf": _weights((1, 269, 7467), (1, 269, 8275)),
    "microsoft/Phi-3-mini-4k-instruct": _weights(
        (2, 525, 808),
        (2, 1693, 808),
        (2, 1113, 808),
        (4, 525, 2723),
        (4, 1113, 2723),
        (4, 1693, 2723),
    ),
}

_ALIASES = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "meta-llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "olmo-1b": "allenai/OLMo-1B-0724-hf",
    "olmo-7b": "allenai/OLMo-7B-0724-hf",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
}


def known_super_weights(model_id: str) -> tuple[KnownSuperWeight, ...]:
    """The published coordinates for a model id (exact, or a short alias); empty if unknown.

    Example:
        >>> known_super_weights("mistralai/Mistral-7B-v0.1")
        (KnownSuperWeight(layer=1, row=2070, col=7310),)
    """
    key = model_id.strip().rstrip("/")
    if key in KNOWN_SUPER_WEIGHTS:
        return KNOWN_SUPER_WEIGHTS[key]
    lowered = key.lower()
    for full in KNOWN_SUPER_WEIGHTS:
        if full.lower() == lowered or full.lower().endswith("/" + lowered):
            return KNOWN_SUPER_WEIGHTS[full]
    alias = _ALIASES.get(lowered.split("/")[-1])
    return KNOWN_SUPER_WEIGHTS[alias] if alias else ()


@dataclass(frozen=True)
class KnownCheck:
    """Published coordinates against detected ones."""

    confirmed: tuple[KnownSuperWeight, ...]
    missed: tuple[KnownSuperWeight, ...]
    new: tuple[SuperWeight, ...]


def check_against_known(model_id: str, detected: Sequence[SuperWeight]) -> KnownCheck | None:
    """Compare detection with the published answer; ``None`` when the model is not in the table."""
    known = known_super_weights(model_id)
    if not known:
        return None
    confirmed = tuple(k for k in known if any(k.matches(w) for w in detected))
    missed = tuple(k for k in known if k not in confirmed)
    new = tuple(w for w in detected if not any(k.matches(w) for k in known))
    return KnownCheck(confirmed, missed, new)
