"""sw_hooks: find, verify and handle super weights in transformer models with PyTorch hooks.

Every public name below is importable from here (``from sw_hooks import detect``). They are
loaded on first use, so ``import sw_hooks`` stays cheap and a tool that needs one room (the
recorder, say) does not pay for the rest (quantization, Lightning, plotting).

Training entry points live one import away, where a Lightning or Hugging Face user looks:
:mod:`sw_hooks.lightning` (``SuperWeightMonitor``, ``SuperWeightGuard``,
``SuperWeightAblation``) and :mod:`sw_hooks.hf` (``SuperWeightCallback``); both give
``watch`` and ``guard`` too.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES: dict[str, tuple[str, ...]] = {
    "sw_hooks.analysis.analyzer": ("TransformerAnalyzer",),
    "sw_hooks.analysis.detect": (
        "detect",
        "detect_expert_weights",
        "DetectionOptions",
        "run_detection",
        "spike_candidates",
    ),
    "sw_hooks.analysis.impact": ("compare", "compare_masked", "impact", "perplexity", "table1"),
    "sw_hooks.analysis.model_comparison": ("compare_models", "ModelComparison"),
    "sw_hooks.analysis.known": ("check_against_known", "known_super_weights"),
    "sw_hooks.analysis.super_experts": ("detect_super_experts", "prune_experts"),
    "sw_hooks.analysis.trace": (
        "residual_trace",
        "ResidualTrace",
        "super_activation_trace",
        "weight_patch",
        "WeightPatch",
    ),
    "sw_hooks.core.access": ("Coordinate", "oriented_weight", "WeightElement"),
    "sw_hooks.core.experts": ("find_experts",),
    "sw_hooks.core.locate": ("find_down_projections", "KNOWN_DOWN_PROJECTIONS", "layer_index"),
    "sw_hooks.core.masks": ("ablate", "preserve", "restore_activation", "scale"),
    "sw_hooks.core.record": (
        "ChannelMaxima",
        "ChannelStats",
        "record",
        "record_experts",
        "Recorder",
    ),
    "sw_hooks.core.results": (
        "DetectionResult",
        "load_super_weights",
        "save_super_weights",
        "SuperExpert",
        "SuperWeight",
    ),
    "sw_hooks.core.units": ("Unit",),
    "sw_hooks.export.manifest": (
        "apply_manifest",
        "ApplyReport",
        "Manifest",
        "read_manifest",
        "write_manifest",
    ),
    "sw_hooks.models": ("calibration_text", "DEFAULT_MODEL", "load_model", "tokenize"),
    "sw_hooks.quant.activations": ("quantize_activations",),
    "sw_hooks.quant.config": (
        "IQRClip",
        "parse_clip",
        "quant_grid",
        "QuantConfig",
        "TopFractionClip",
        "ZScoreClip",
    ),
    "sw_hooks.quant.primitives": ("quantize_tensor",),
    "sw_hooks.quant.quantize": ("quantize_model", "QuantizedModel"),
    "sw_hooks.quant.sweep": ("holdout_sweep", "SweepRun"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sw_hooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
