"""Hooks on any nn.Module: locating down-projections and experts, reading and writing single weights, recording per-channel maxima, masks, and the result types."""
