"""Super-weight-aware quantization.

``config`` (one frozen ``QuantConfig``), ``primitives`` (block RTN of one tensor, or of each
matrix of a stack; clipping included), ``targets`` (which weights, fused experts included, and
where the held-out elements sit), ``quantize`` (the verb: ``quantize_model``), ``activations``
(per-token input quantization) and ``sweep`` (with and without holdout, per config).
"""
