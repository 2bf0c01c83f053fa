"""sw_hooks: find, verify and handle super weights in transformer models with PyTorch hooks."""

from sw_hooks.analysis.analyzer import TransformerAnalyzer
from sw_hooks.analysis.detect import DetectionOptions, detect, run_detection, spike_candidates
from sw_hooks.analysis.impact import compare, impact, perplexity, table1
from sw_hooks.analysis.known import check_against_known, known_super_weights
from sw_hooks.analysis.trace import (
    ResidualTrace,
    WeightPatch,
    residual_trace,
    super_activation_trace,
    weight_patch,
)
from sw_hooks.core.access import Coordinate, WeightElement, oriented_weight
from sw_hooks.core.locate import KNOWN_DOWN_PROJECTIONS, find_down_projections, layer_index
from sw_hooks.core.masks import ablate, preserve, restore_activation, scale
from sw_hooks.core.moe import (
    detect_expert_weights,
    detect_super_experts,
    find_experts,
    prune_experts,
    record_experts,
)
from sw_hooks.core.record import ChannelMaxima, ChannelStats, Recorder, record
from sw_hooks.core.results import (
    DetectionResult,
    SuperWeight,
    load_super_weights,
    save_super_weights,
)
from sw_hooks.export.manifest import (
    ApplyReport,
    Manifest,
    apply_manifest,
    read_manifest,
    write_manifest,
)
from sw_hooks.models import DEFAULT_MODEL, calibration_text, load_model, tokenize
from sw_hooks.quant.quantize import (
    IQRClip,
    QuantConfig,
    QuantizedModel,
    SweepRun,
    TopFractionClip,
    ZScoreClip,
    holdout_sweep,
    parse_clip,
    quant_grid,
    quantize_activations,
    quantize_model,
    quantize_tensor,
)

__version__ = "0.1.0"

__all__ = [
    "ApplyReport",
    "Coordinate",
    "Manifest",
    "apply_manifest",
    "read_manifest",
    "write_manifest",
    "DetectionOptions",
    "TransformerAnalyzer",
    "check_against_known",
    "compare",
    "detect",
    "impact",
    "known_super_weights",
    "perplexity",
    "run_detection",
    "spike_candidates",
    "table1",
    "IQRClip",
    "QuantConfig",
    "QuantizedModel",
    "quant_grid",
    "TopFractionClip",
    "ZScoreClip",
    "parse_clip",
    "quantize_activations",
    "quantize_model",
    "quantize_tensor",
    "DEFAULT_MODEL",
    "KNOWN_DOWN_PROJECTIONS",
    "ChannelMaxima",
    "ChannelStats",
    "DetectionResult",
    "Recorder",
    "SuperWeight",
    "WeightElement",
    "ablate",
    "calibration_text",
    "find_down_projections",
    "layer_index",
    "load_model",
    "load_super_weights",
    "oriented_weight",
    "preserve",
    "record",
    "restore_activation",
    "save_super_weights",
    "scale",
    "tokenize",
    "detect_expert_weights",
    "detect_super_experts",
    "find_experts",
    "prune_experts",
    "record_experts",
    "ResidualTrace",
    "WeightPatch",
    "residual_trace",
    "super_activation_trace",
    "weight_patch",
    "SweepRun",
    "holdout_sweep",
]
