"""What a super-weight report holds: its options and every number it shows, as plain JSON.

:class:`ReportOptions` says what :func:`sw_hooks.analysis.report.collect_report` measures;
:class:`ReportData` is what it measured, read and written as ``report.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sw_hooks.analysis.model_comparison import ModelComparison
from sw_hooks.analysis.options import PROMPT_TOKENS
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.quant.config import QuantConfig, ZScoreClip, quant_grid

REPORT_SCHEMA_VERSION = 3
"""3: adds ``comparison``, a candidate model's :class:`~sw_hooks.analysis.model_comparison.ModelComparison`
(empty without one); 2: the layer peaks live in ``detection`` (version 1 kept a copy beside
it). Every version is still read."""
READABLE_VERSIONS = (1, 2, REPORT_SCHEMA_VERSION)


REPORT_BLOCK_SIZES = (128, 1024, 4096)
REPORT_CLIP = ZScoreClip(6.0)


@dataclass(frozen=True)
class ReportOptions:
    """What a report measures; the defaults finish on SmolLM2-135M in minutes on 2 cores.

    Attributes:
        prompt_tokens: tokens recorded for detection (the start of the text).
        quantization: the sweep's settings, each run with and without the super weights
            held out; ``()``: no sweep. Default: 4 bits at block sizes 128, 1024 and 4096
            with ``zscore:6`` clipping (build others with :func:`~sw_hooks.quant.config.quant_grid`).
        radius: the weight heat map shows ``2 * radius + 1`` rows and columns.
        window, stride: perplexity windows.
        max_traced: at most this many super weights get a residual-stream trace and a heat map.
        candidates: the report is about every candidate of the detection, not only the
            verified super weights.

    Example:
        >>> from sw_hooks.quant.config import quant_grid
        >>> options = ReportOptions(quantization=quant_grid([3], [64, 1024], ["zscore:6"]))
        >>> [config.block_size for config in options.quantization]
        [64, 1024]
    """

    prompt_tokens: int = PROMPT_TOKENS
    quantization: tuple[QuantConfig, ...] = quant_grid([4], REPORT_BLOCK_SIZES, [REPORT_CLIP])
    radius: int = 8
    window: int = 512
    stride: int = 256
    max_traced: int = 3
    candidates: bool = False

    def __post_init__(self) -> None:
        if self.prompt_tokens < 2 or self.radius < 0 or self.max_traced < 1:
            raise ValueError("prompt_tokens >= 2, radius >= 0 and max_traced >= 1 are required")
        configs = tuple(self.quantization)
        if not all(isinstance(config, QuantConfig) for config in configs):
            raise ValueError("quantization takes QuantConfig objects, e.g. quant_grid(...)")
        object.__setattr__(self, "quantization", configs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: each quantization config as :meth:`QuantConfig.to_dict`."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**fields, "quantization": [config.to_dict() for config in self.quantization]}


@dataclass
class ReportData:
    """Every number a report shows, in plain JSON-ready form.

    Attributes:
        model: the model's display name; tokens: tokens of text measured.
        detection: :meth:`DetectionResult.to_dict`, with the layer peaks the spikes figure
            draws (read them as :attr:`layer_peaks`).
        traces: per traced super weight, ``{"super_weight", "original", "ablated"}``.
        patches: :func:`sw_hooks.analysis.trace.weight_patch` windows as dicts.
        impact: :func:`sw_hooks.analysis.impact.table1` rows as dicts (empty with no super weight).
        quantization: ``{"baseline_perplexity", "runs"}``.
        history: optional monitoring rows (``{name: value}``, with ``step``).
        comparison: with a candidate model, :meth:`ModelComparison.to_dict` of it against
            this one (:mod:`sw_hooks.analysis.model_comparison`); empty without one.
        options: the :class:`ReportOptions` used, as a dict.
        timings: seconds per stage.
    """

    model: str
    tokens: int
    detection: dict[str, Any]
    traces: list[dict[str, Any]] = field(default_factory=list)
    patches: list[dict[str, Any]] = field(default_factory=list)
    impact: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    comparison: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> ReportData:
        """Read :meth:`to_dict` output (or an older version's) back, with a clear error."""
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        if version not in READABLE_VERSIONS:
            raise ValueError(f"not a sw_hooks report of schema_version {READABLE_VERSIONS}")
        required = {"model", "tokens", "detection"} | ({"layer_peaks"} if version == 1 else set())
        missing = required - set(data)
        if missing:
            raise ValueError(f"report JSON lacks {sorted(missing)}")
        detection = dict(data["detection"]) if isinstance(data["detection"], Mapping) else None
        if version == 1 and detection is not None:
            detection.setdefault("layer_peaks", data["layer_peaks"])
        DetectionResult.from_dict(detection)  # checks the detection part
        if data.get("comparison"):
            ModelComparison.from_dict(data["comparison"])  # checks the comparison part
        names = set(cls.__dataclass_fields__)
        return cls(**{**{k: v for k, v in data.items() if k in names}, "detection": detection})

    @property
    def result(self) -> DetectionResult:
        return DetectionResult.from_dict(self.detection)

    @property
    def layer_peaks(self) -> list[dict[str, Any]]:
        """Detection's first-pass peaks per down-projection, as JSON rows."""
        return [peak.to_dict() for peak in self.result.layer_peaks]


def shown_weights(
    result: DetectionResult | None, options: ReportOptions | None = None
) -> list[SuperWeight]:
    """The weights the report is about, by the one selection rule
    (:meth:`~sw_hooks.core.results.DetectionResult.select`): the verified ones, or every
    candidate when ``options.candidates``."""
    if result is None:
        return []
    return list(result.select(candidates=bool(options and options.candidates)))
