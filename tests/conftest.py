"""Shared fixtures: tiny models with planted super weights, and the real model loaded once."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.testing import PlantedModel, planted_llama


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def planted() -> PlantedModel:
    """Tiny Llama: a causal super weight at layers[1] [5, 17], a decoy at layers[3] [9, 33]."""
    return planted_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (SmolLM2-135M-Instruct) and its tokenizer, loaded once."""
    from sw_hooks.models import load_model

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    return load_model()
