"""A map-style dataset of ready-made items, for the ``Trainer`` and ``DataLoader`` paths."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch.utils.data import Dataset


class Sequences(Dataset):
    """Items given as dicts of tensors (``input_ids``, ``labels``, ``attention_mask``...).

    Example:
        >>> data = Sequences.planted(count=2, tokens=8)
        >>> len(data), sorted(data[0]), tuple(data[0]["input_ids"].shape)
        (2, ['input_ids', 'labels'], (8,))
    """

    def __init__(self, items: Iterable[Mapping[str, torch.Tensor]]) -> None:
        self.items = [dict(item) for item in items]

    @classmethod
    def planted(cls, count: int = 6, tokens: int = 32) -> Sequences:
        """``count`` causal-LM items of the planted llama's calibration text (labels = ids)."""
        from sw_hooks.testing.planting import planted_llama

        planted = planted_llama()
        ids = [planted.calibration_ids(tokens, seed=seed)[0] for seed in range(count)]
        return cls({"input_ids": row, "labels": row} for row in ids)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]
