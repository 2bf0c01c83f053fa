"""Silence the known messages torchao logs when transformers imports it, and only those.

transformers imports torchao (when installed) as it loads any model, and torchao, beside a
CPU build of torch, logs that its CUDA-only kernels and Triton are missing, and torch logs
a deprecation for each Enum torchao registers. They say nothing about the user's command,
and the CLI keeps stderr for its own progress and its one-line errors. Each message is
matched by its logger and its text, so any other message from these loggers still shows.
"""

from __future__ import annotations

import logging
import re

KNOWN_IMPORT_NOISE: dict[str, re.Pattern[str]] = {
    "torchao": re.compile(r"^Failed to load \S*/torchao/_C_(mxfp8|cutlass_\w+)\S*\.so: "),
    "torchao.kernel.intmm": re.compile(r"^Warning: Detected no triton, on systems without"),
    "torch.utils._pytree": re.compile(
        r"^<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile"
    ),
}


class _DropKnownNoise(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def is_known_import_noise(logger: str, message: str) -> bool:
    """True for a message this module silences."""
    pattern = KNOWN_IMPORT_NOISE.get(logger)
    return pattern is not None and pattern.search(message) is not None


def silence_known_import_noise() -> None:
    """Add the filters to their loggers (once per process; a second call adds nothing)."""
    for name, pattern in KNOWN_IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(pattern))
