"""What can happen to a super weight during training, and the stable names it is logged under.

A :class:`WeightEvent` is one of :data:`EVENT_KINDS` at one recording:

* ``"found"``: a spike pair present at the first recording (a candidate);
* ``"appeared"``: a spike pair that was not there before (a new candidate);
* ``"collapsed"``: a known weight's super activation fell below its reference divided by
  ``collapse_factor``;
* ``"drifted"``: a known weight's value moved by more than ``drift_fraction`` of its
  reference value;
* ``"recovered"``: a collapsed or drifted weight is back within both bounds.

:func:`weight_tag` and :func:`module_tag` turn a weight or a module into a logger-safe name
(``layer_3.row_5.col_17``), the same in every monitor.

A spike pair is a *candidate* until it is measured: an event carries the weight's measured
``impact`` (perplexity ratio with it zeroed) and ``verdict`` (``"super"`` when the impact
reached the threshold), so a weight is called a super weight only once a measurement said
so, or when the user named it one (``verdict="super"`` without an impact).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from sw_hooks.core.locate import layer_index

EVENT_KINDS = ("found", "appeared", "collapsed", "drifted", "recovered")
WARNING_KINDS = ("appeared", "collapsed", "drifted")


@dataclass(frozen=True)
class WeightEvent:
    """Something that happened to one super weight at one recording."""

    step: int
    kind: str
    module: str
    row: int
    col: int
    value: float
    activation: float
    reference_value: float
    reference_activation: float
    stage: str = "train"
    expert: int | None = None
    impact: float | None = None
    verdict: str = "candidate"

    @property
    def tag(self) -> str:
        return weight_tag(self.module, self.row, self.col, self.expert)

    @property
    def is_super(self) -> bool:
        """Whether the weight is a super weight: measured so, or named so by the user."""
        return self.verdict == "super"

    @property
    def alarming(self) -> bool:
        """Worth a warning: a warning kind, on a weight not measured harmless."""
        harmless = self.impact is not None and not self.is_super
        return self.kind in WARNING_KINDS and not harmless

    def describe(self) -> str:
        inside = f" (expert {self.expert})" if self.expert is not None else ""
        return (
            f"{self.noun} {self.module}[{self.row}, {self.col}]{inside} {self.kind} at "
            f"{self.stage} step {self.step}: value {self.value:.4g} (was "
            f"{self.reference_value:.4g}), super activation {self.activation:.4g} (was "
            f"{self.reference_activation:.4g}){self._measured()}"
        )

    @property
    def noun(self) -> str:
        """What the weight is called: ``super weight`` only when measured (or named) so."""
        return "super weight" if self.is_super else "candidate super weight"

    def _measured(self) -> str:
        if self.impact is None:
            return ", impact not measured" if not self.is_super else ""
        return f", impact x{self.impact:.3g} when zeroed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_tag(module: str, row: int, col: int, expert: int | None = None) -> str:
    """A stable, logger-safe name for one weight: ``layer_<L>.row_<r>.col_<c>``, with
    ``.expert_<e>`` after the layer for a weight inside an expert."""
    base = module_tag(module)
    if expert is not None:
        base = f"{base.removesuffix('.experts')}.expert_{expert}"
    return f"{base}.row_{row}.col_{col}"


def module_tag(module: str) -> str:
    """``layer_<L>`` for a module with a layer index, else its name with dots as underscores.

    An experts module's down-projection is ``layer_<L>.experts``, next to a dense (shared
    expert) down-projection of the same layer.
    """
    index = layer_index(module)
    if index is None:
        return re.sub(r"[^\w]", "_", module)
    return f"layer_{index}.experts" if ".experts." in f"{module}." else f"layer_{index}"
