"""The seed models' table: each architecture's down-projections located on a tiny config of
it, a super weight planted at its published layer found there, and the docs' table rendered
from the same data."""

from __future__ import annotations

from pathlib import Path

import pytest

from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.known import known_super_weights
from sw_hooks.analysis.seed_models import SEED_MODELS, SeedModel, seed_table
from sw_hooks.core.locate import find_down_projections
from sw_hooks.testing import plant_super_weight, tiny_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
HEADS = 4


def _tiny_of(seed: SeedModel, layers: int):
    """A tiny model of the seed's architecture: its model type, its ratio of key-value heads
    to heads and its tied or untied embeddings."""
    config = seed.config
    kv_heads = HEADS * config["num_key_value_heads"] // config["num_attention_heads"]
    overrides = {
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": config["tie_word_embeddings"],
    }
    return tiny_model(config["model_type"], num_layers=layers, overrides=overrides)


@pytest.mark.parametrize("seed", SEED_MODELS, ids=[s.name for s in SEED_MODELS])
def test_down_projections_are_found_by_name_where_the_table_says(seed):
    model = _tiny_of(seed, layers=3)
    found = find_down_projections(model)
    names = [seed.down_projections.format(i=i) for i in range(3)]
    assert list(found) == names
    assert found.found_by == dict.fromkeys(names, "name")


@pytest.mark.parametrize("seed", SEED_MODELS, ids=[s.name for s in SEED_MODELS])
def test_a_super_weight_at_the_published_layer_is_detected_and_verified(seed):
    published = known_super_weights(seed.model_id)[0]
    layer = published.layer
    # The published row and column folded into the tiny model's 56 free rows and 128 columns.
    row, col = published.row % 56, published.col % 128
    planted = plant_super_weight(
        _tiny_of(seed, layers=layer + 2), layer, row, col, trigger_token=1, target_token=2
    )
    result = run_detection(planted.model, planted.prompt(), calibration=planted.calibration_ids())
    expected = (seed.down_projections.format(i=layer), row, col)
    assert [w.coordinate for w in result.verified] == [expected]


def test_every_seed_model_has_published_coordinates():
    assert all(known_super_weights(seed.model_id) for seed in SEED_MODELS)


def test_the_docs_table_is_the_rendered_one():
    assert seed_table() in DOCS.read_text(), "regenerate docs/models.md from seed_table()"
