"""Small frozen result objects, with JSON in and out under a schema version.

Results are plain JSON, never pickles: a report from someone else's machine can be read
without running their code.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sw_hooks.core.access import Coordinate
from sw_hooks.core.provenance import Calibration

SCHEMA_VERSION = 3
"""3: each impact says what it was measured on (``calibration`` on a detection result;
``impact_tokens`` and ``screened`` on each super weight and super expert); 2: a detection
result names every candidate ``candidates`` (1 called them ``super_weights``). Every version
is still read."""
READABLE_SCHEMA_VERSIONS = (1, 2, SCHEMA_VERSION)
_CANDIDATES_KEY = {1: "super_weights", 2: "candidates", 3: "candidates"}

VERDICTS = ("super", "candidate")


@dataclass(frozen=True)
class SuperWeight:
    """One (candidate) super weight: ``module.weight[row, col]`` in ``[out, in]`` order.

    Attributes:
        module: the down-projection's module name, e.g. ``model.layers.2.mlp.down_proj``.
        layer: the layer index parsed from ``module`` (``None`` if it has none).
        row: output channel: where the super activation appears.
        col: input channel: where the down-projection's input spikes.
        value: the weight's original value.
        input_activation: signed input value at channel ``col`` at the spike.
        output_activation: signed output value at channel ``row`` at the spike.
        token_position: the token position of the output spike.
        impact: perplexity with this weight zeroed over perplexity without; ``None`` if
            not measured.
        verdict: ``"super"`` when ``impact`` reached the threshold, else ``"candidate"``.
        expert: the expert index for a weight inside a mixture-of-experts layer.
        impact_tokens: the tokens ``impact`` was scored on (``None`` if not measured, or
            read from a file written before it was kept).
        screened: ``impact`` is over the first window only: screening stopped measuring it
            there (:mod:`sw_hooks.analysis.verify`).
    """

    module: str
    layer: int | None
    row: int
    col: int
    value: float
    input_activation: float = 0.0
    output_activation: float = 0.0
    token_position: int = 0
    impact: float | None = None
    verdict: str = "candidate"
    expert: int | None = None
    impact_tokens: int | None = None
    screened: bool = False

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.row < 0 or self.col < 0:
            raise ValueError(f"row and col must be non-negative, got [{self.row}, {self.col}]")

    @property
    def coordinate(self) -> Coordinate:
        """Where this weight is, its expert included."""
        return Coordinate(self.module, self.row, self.col, self.expert)

    @property
    def label(self) -> str:
        """``layer 1 [5, 17]``, with ``expert 3`` inside experts: for progress and tables."""
        where = f"layer {self.layer}" + (
            f" expert {self.expert}" if self.expert is not None else ""
        )
        return f"{where} [{self.row}, {self.col}]"

    def with_impact(
        self,
        impact: float,
        min_impact: float,
        *,
        tokens: int | None = None,
        screened: bool = False,
    ) -> SuperWeight:
        """A copy carrying a measured impact, the verdict it earns and what it was scored on."""
        # NaN compares false: an unmeasurable impact never earns the verdict.
        verdict = "super" if impact >= min_impact else "candidate"
        return replace(
            self, impact=impact, verdict=verdict, impact_tokens=tokens, screened=screened
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SuperWeight:
        """Build from a dict, checking every field's type with a clear error."""
        if not isinstance(data, dict):
            raise ValueError(f"a super weight must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown super-weight field(s): {sorted(unknown)}")
        for required in ("module", "row", "col", "value"):
            if required not in data:
                raise ValueError(f"super weight is missing {required!r}")
        return cls(**{k: _checked(k, v) for k, v in {"layer": None, **data}.items()})


_INT_FIELDS = {"row", "col", "token_position"}
_OPTIONAL_INT_FIELDS = {"layer", "expert", "impact_tokens"}
_FLOAT_FIELDS = {"value", "input_activation", "output_activation"}


def _checked(name: str, value: Any) -> Any:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ok = {
        "module": isinstance(value, str) and bool(value),
        "verdict": isinstance(value, str),
        "screened": isinstance(value, bool),
        "impact": value is None or (isinstance(value, int | float) and not isinstance(value, bool)),
    }.get(name)
    if ok is None:
        if name in _INT_FIELDS:
            ok = is_int(value)
        elif name in _OPTIONAL_INT_FIELDS:
            ok = value is None or is_int(value)
        elif name in _FLOAT_FIELDS:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"super-weight field {name!r} has a bad value: {value!r}")
    return float(value) if name in _FLOAT_FIELDS else value


@dataclass(frozen=True)
class LayerPeak:
    """One down-projection's largest ``|input|`` and ``|output|`` and where each is.

    Detection keeps one per recorded module from its first (unablated) pass: the paper's
    Figure 2 is drawn from these, so a report never records the model again.

    Attributes:
        module: the down-projection's module name.
        layer: the layer index parsed from ``module`` (``None`` if it has none).
        input_max, input_channel: the largest ``|input|`` and its channel (a candidate ``col``).
        output_max, output_channel: the largest ``|output|`` and its channel (a candidate ``row``).
    """

    module: str
    layer: int | None
    input_max: float
    input_channel: int
    output_max: float
    output_channel: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LayerPeak:
        """Build from :meth:`to_dict` output, checking every field with a clear error."""
        if not isinstance(data, dict):
            raise ValueError(f"a layer peak must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"layer peak lacks {missing}; got keys {sorted(data)}")
        checks = {
            "module": lambda v: isinstance(v, str) and bool(v),
            "layer": lambda v: v is None or _is_count(v),
            "input_max": _is_number,
            "output_max": _is_number,
            "input_channel": _is_count,
            "output_channel": _is_count,
        }
        for name, ok in checks.items():
            if not ok(data[name]):
                raise ValueError(f"layer peak field {name!r} has a bad value: {data[name]!r}")
        values = {name: data[name] for name in names}
        return cls(
            **{
                **values,
                "input_max": float(data["input_max"]),
                "output_max": float(data["output_max"]),
            }
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class SuperExpert:
    """An expert whose down-projection output is massive compared with all experts'.

    Attributes:
        module: the experts module, e.g. ``model.layers.1.mlp.experts``.
        layer, expert: where it is.
        output_max: its max ``|down_proj output|``.
        channel: the output channel of that maximum.
        token_position: the token position of that maximum (-1 if unknown).
        tokens: tokens routed to it while recording.
        impact: perplexity with the expert pruned over without (``None`` if not measured).
        verdict: ``"super"`` when ``impact`` reached ``min_impact``, else ``"candidate"``.
        impact_tokens, screened: what ``impact`` was scored on, as for :class:`SuperWeight`.
    """

    module: str
    layer: int | None
    expert: int
    output_max: float
    channel: int
    token_position: int
    tokens: int
    impact: float | None = None
    verdict: str = "candidate"
    impact_tokens: int | None = None
    screened: bool = False

    @property
    def unit(self) -> tuple[str, int]:
        """``(experts module, expert)``, what :func:`~sw_hooks.analysis.super_experts.prune_experts` takes."""
        return (self.module, self.expert)

    @property
    def label(self) -> str:
        return f"layer {self.layer} expert {self.expert}"

    def with_impact(
        self,
        impact: float,
        min_impact: float,
        *,
        tokens: int | None = None,
        screened: bool = False,
    ) -> SuperExpert:
        """A copy carrying a measured impact, the verdict it earns and what it was scored on."""
        verdict = "super" if impact >= min_impact else "candidate"
        return replace(
            self, impact=impact, verdict=verdict, impact_tokens=tokens, screened=screened
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SuperExpert:
        """Build from :meth:`to_dict` output, with a clear error for a missing field."""
        if not isinstance(data, dict):
            raise ValueError(f"a super expert must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names[:7] if n not in data]
        if missing:
            raise ValueError(f"super expert lacks {missing}; got keys {sorted(data)}")
        return cls(**{n: data[n] for n in names if n in data})


@dataclass(frozen=True)
class DetectionResult:
    """What :func:`sw_hooks.analysis.detect` found, with the numbers that back it.

    It is the one artifact every command reads its super weights from (``sw-hooks detect
    --json`` writes it; :meth:`load` reads it), and :meth:`select` is the one rule that
    picks them: the verified super weights, or every candidate when asked.

    Attributes:
        model: a name for the model (id, path or class name).
        candidates: every candidate, verified or not (:attr:`verified`: the super weights).
        baseline_perplexity: perplexity of the unmodified model on the calibration text.
        joint_ablation_ratio: perplexity with every candidate zeroed over the baseline.
        prepend_bos: whether a BOS token was put before the prompt.
        passes: how many record-and-ablate passes detection ran.
        options: the :class:`~sw_hooks.analysis.detect.DetectionOptions` used, as a dict.
        layer_peaks: per recorded down-projection (an experts module counts as one, its
            loudest expert's), its peaks in the first (unablated) pass; empty in files
            written before it was kept.
        super_experts: whole experts found massive (and verified, when measured); empty
            for dense models.
        calibration: what the impacts were measured on (``None`` when not measured, or
            read from a version 1 file).
    """

    model: str
    candidates: tuple[SuperWeight, ...]
    baseline_perplexity: float | None = None
    joint_ablation_ratio: float | None = None
    prepend_bos: bool = False
    passes: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    layer_peaks: tuple[LayerPeak, ...] = ()
    super_experts: tuple[SuperExpert, ...] = ()
    calibration: Calibration | None = None

    @property
    def super_weights(self) -> tuple[SuperWeight, ...]:
        """Deprecated: every candidate, verified or not; read :attr:`candidates`, or
        :attr:`verified` for the super weights."""
        warnings.warn(
            "DetectionResult.super_weights holds every candidate and is renamed candidates; "
            "the verified super weights are DetectionResult.verified",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.candidates

    @property
    def verified(self) -> tuple[SuperWeight, ...]:
        """The candidates whose measured impact earned ``verdict == "super"``."""
        return tuple(w for w in self.candidates if w.verdict == "super")

    @property
    def measured(self) -> bool:
        """Whether verification measured the candidates (``detect --no-verify`` does not):
        some candidate carries an impact or a verdict."""
        return any(w.impact is not None or w.verdict == "super" for w in self.candidates)

    def select(self, *, candidates: bool = False) -> tuple[SuperWeight, ...]:
        """The super weights a command or function works on: the one selection rule.

        The verified super weights by default; every candidate with ``candidates=True``
        (``--candidates`` on the command line).

        Raises:
            ValueError: verified weights were asked of a result whose candidates were never
                measured (``detect --no-verify``): none of them is verified, and taking all
                of them silently would be a different answer.

        Example:
            >>> weight = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 8.0)
            >>> result = DetectionResult("tiny", (weight.with_impact(40.0, 2.0), weight))
            >>> len(result.select()), len(result.select(candidates=True))
            (1, 2)
        """
        if candidates:
            return self.candidates
        if self.candidates and not self.measured:
            raise ValueError(
                f"the detection result of {self.model or 'this model'} has "
                f"{len(self.candidates)} candidate(s) that were never verified "
                "(detect --no-verify); ask for its candidates (candidates=True, or "
                "--candidates on the command line) or detect again with verification"
            )
        return self.verified

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["candidates"] = [w.to_dict() for w in self.candidates]
        data["layer_peaks"] = [peak.to_dict() for peak in self.layer_peaks]
        data["super_experts"] = [expert.to_dict() for expert in self.super_experts]
        data["calibration"] = self.calibration.to_dict() if self.calibration else None
        return {"schema_version": SCHEMA_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Any) -> DetectionResult:
        """Read :meth:`to_dict` output of this or an earlier schema version."""
        if not isinstance(data, dict):
            raise ValueError("a detection result must be a JSON object")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(
                f"unsupported schema_version {version!r}; this version reads "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
            )
        key = _CANDIDATES_KEY[version]
        weights = data.get(key)
        if not isinstance(weights, list):
            raise ValueError(f"{key!r} must be a list")
        model = data.get("model", "")
        if not isinstance(model, str):
            raise ValueError("'model' must be a string")
        return cls(
            model=model,
            candidates=tuple(SuperWeight.from_dict(w) for w in weights),
            baseline_perplexity=_optional_number(data, "baseline_perplexity"),
            joint_ablation_ratio=_optional_number(data, "joint_ablation_ratio"),
            prepend_bos=bool(data.get("prepend_bos", False)),
            passes=int(data.get("passes", 0)),
            options=dict(data.get("options") or {}),
            layer_peaks=_layer_peaks(data.get("layer_peaks", [])),
            super_experts=_super_experts(data.get("super_experts", [])),
            calibration=_calibration(data.get("calibration")),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DetectionResult:
        """Read a detection result file, with an error that names the file and the problem."""
        try:
            return cls.from_dict(read_json(path))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _layer_peaks(rows: Any) -> tuple[LayerPeak, ...]:
    """The optional ``layer_peaks`` list: absent in files written before it was kept."""
    if not isinstance(rows, list):
        raise ValueError(f"'layer_peaks' must be a list, got {type(rows).__name__}")
    return tuple(LayerPeak.from_dict(row) for row in rows)


def _calibration(data: Any) -> Calibration | None:
    """The optional ``calibration``: absent in files before version 3 and unverified results."""
    return None if data is None else Calibration.from_dict(data)


def _super_experts(rows: Any) -> tuple[SuperExpert, ...]:
    if not isinstance(rows, list):
        raise ValueError(f"'super_experts' must be a list, got {type(rows).__name__}")
    return tuple(SuperExpert.from_dict(row) for row in rows)


def _optional_number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} must be a number, got {value!r}")
    return float(value)


def read_json(path: str | Path) -> Any:
    """Read a JSON file with an error that names the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (JSON) file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def save_super_weights(
    weights: list[SuperWeight] | tuple[SuperWeight, ...], path: str | Path, *, model: str = ""
) -> None:
    """Write super weights as a detection result file, the one format every reader takes."""
    DetectionResult(model, tuple(weights)).save(path)


def load_super_weights(path: str | Path, *, candidates: bool = False) -> list[SuperWeight]:
    """The super weights of a detection result file: :meth:`DetectionResult.load` then
    :meth:`DetectionResult.select` (the verified ones; every candidate with ``candidates=True``).
    """
    return list(DetectionResult.load(path).select(candidates=candidates))
