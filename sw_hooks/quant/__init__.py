"""Super-weight-aware quantization."""
