"""Tiny models with planted super weights, for tests and examples.

* :mod:`~sw_hooks.testing.tiny`: causal LMs of real architectures (:func:`tiny_model`) and a
  local byte-level tokenizer;
* :mod:`~sw_hooks.testing.planting`: super weights and decoys planted by construction in
  them (:func:`plant_super_weight`, :func:`planted_llama`);
* :mod:`~sw_hooks.testing.moe`: mixture-of-experts models, expert super weights and super
  experts (:func:`planted_moe`);
* :mod:`~sw_hooks.testing.families`: encoders, vision and encoder-decoder models, hybrids and
  a hand-written model (:func:`tiny_family`), with spike pairs and decoys planted in any of
  them (:func:`plant_spike_pair`, :func:`plant_decoy`).
"""

from sw_hooks.testing.families import (
    FAMILIES,
    HandWritten,
    PlantedPair,
    family_input,
    plant_decoy,
    plant_spike_pair,
    tiny_family,
    wire_head,
)
from sw_hooks.testing.moe import (
    MOE_ARCHITECTURES,
    ExpertMLP,
    ListExperts,
    plant_expert_super_weight,
    plant_super_expert,
    planted_moe,
    tiny_moe_model,
    to_expert_list,
)
from sw_hooks.testing.planting import (
    PlantedModel,
    PlantedWeight,
    plant_super_weight,
    planted_llama,
)
from sw_hooks.testing.tiny import ARCHITECTURES, byte_tokenizer, save_checkpoint, tiny_model

__all__ = [
    "save_checkpoint",
    "wire_head",
    "ARCHITECTURES",
    "FAMILIES",
    "MOE_ARCHITECTURES",
    "ExpertMLP",
    "HandWritten",
    "ListExperts",
    "PlantedModel",
    "PlantedPair",
    "PlantedWeight",
    "byte_tokenizer",
    "family_input",
    "plant_decoy",
    "plant_expert_super_weight",
    "plant_spike_pair",
    "plant_super_expert",
    "plant_super_weight",
    "planted_llama",
    "planted_moe",
    "tiny_family",
    "tiny_model",
    "tiny_moe_model",
    "to_expert_list",
]
