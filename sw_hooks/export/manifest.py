"""A super-weight manifest: hand exact super-weight values to the tools that ship models.

A quantizer, a merge or a format conversion may round a super weight away. The manifest
records each one bit for bit, with enough of the model's identity to refuse the wrong
model, so :func:`apply_manifest` can write the exact values back afterwards.

Every public name lives in one room and is importable from here: the format, its types and
reading (:mod:`sw_hooks.export.manifest_format`, where the schema is documented), the model's
identity (:mod:`sw_hooks.export.manifest_identity`), writing
(:mod:`sw_hooks.export.manifest_write`) and applying (:mod:`sw_hooks.export.manifest_apply`).

Example:
    >>> from sw_hooks.testing import planted_llama
    >>> planted = planted_llama()
    >>> _ = write_manifest([("model.layers.1.mlp.down_proj", 5, 17)], planted.model, "sw.json")
    >>> report = apply_manifest(planted.model, read_manifest("sw.json"))
    >>> report.changed
    ()
"""

from sw_hooks.export.manifest_apply import AppliedWeight, ApplyReport, apply_manifest
from sw_hooks.export.manifest_format import (
    FORMAT,
    SCHEMA_VERSION,
    Manifest,
    ManifestWeight,
    manifest_from_dict,
    read_manifest,
)
from sw_hooks.export.manifest_write import write_manifest

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "AppliedWeight",
    "ApplyReport",
    "Manifest",
    "ManifestWeight",
    "apply_manifest",
    "manifest_from_dict",
    "read_manifest",
    "write_manifest",
]
