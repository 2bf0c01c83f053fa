"""What the recorder records: a unit is a down-projection, dense or inside one expert."""

from __future__ import annotations

from typing import NamedTuple


class Unit(NamedTuple):
    """One recorded down-projection: ``module`` as in a weight's coordinate, and its expert.

    A dense down-projection is ``Unit("model.layers.3.mlp.down_proj")``; an expert's is
    ``Unit("model.layers.1.mlp.experts.down_proj", 3)`` (fused layout) or
    ``Unit("model.layers.1.mlp.experts.3.down_proj", 3)`` (list layout). A plain module
    name is read as a dense unit.
    """

    module: str
    expert: int | None = None

    def __str__(self) -> str:
        return self.module if self.expert is None else f"{self.module} expert {self.expert}"

    @classmethod
    def of(cls, key: str | tuple[str, int | None]) -> Unit:
        """A unit from a module name or a ``(module, expert)`` pair."""
        if isinstance(key, str):
            return cls(key)
        module, expert = key
        return cls(module, expert)
