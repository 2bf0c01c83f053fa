"""Losses for verification: chosen from the model's class, with impacts that read like a
perplexity ratio; planted super weights are verified through a task head (masked LM,
image classifier) and the causal-LM path is the perplexity measurement it always was."""

import math
import warnings

import pytest
import torch
import transformers

from sw_hooks.analysis.detect import run_detection, verify
from sw_hooks.analysis.impact import LossComparison, compare_masked, impact
from sw_hooks.analysis.losses import (
    EmbeddingCosine,
    LossRatio,
    OutputKL,
    Perplexity,
    PseudoPerplexity,
    as_loss,
    loss_for,
)
from sw_hooks.analysis.verify import VerifySettings, measure_impacts
from sw_hooks.core.masks import ablate
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing import (
    HandWritten,
    family_input,
    plant_decoy,
    plant_spike_pair,
    planted_llama,
    tiny_family,
    tiny_model,
)
from sw_hooks.testing.families import wire_head


def _headed(family: str, head: str, **config: object) -> torch.nn.Module:
    """A tiny ``family`` model with a task head (``transformers.<head>``), eval mode."""
    base = tiny_family(family, num_layers=3).config
    for key, value in config.items():
        setattr(base, key, value)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(transformers, head)(base).eval()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (lambda: tiny_model("llama", num_layers=1), Perplexity),
        (lambda: tiny_model("gpt2", num_layers=1), Perplexity),
        (lambda: _headed("bert", "BertForSequenceClassification"), OutputKL),
        (lambda: _headed("vit", "ViTForImageClassification"), OutputKL),
        (lambda: _headed("t5", "T5ForConditionalGeneration"), OutputKL),
        (lambda: _headed("whisper", "WhisperForConditionalGeneration"), OutputKL),
        (lambda: tiny_family("bert", num_layers=1), EmbeddingCosine),
        (lambda: tiny_family("clip_text", num_layers=1), EmbeddingCosine),
        (lambda: tiny_family("t5", num_layers=1), EmbeddingCosine),
    ],
)
def test_loss_is_chosen_from_the_model_class(model, expected):
    assert type(loss_for(model())) is expected


def test_masked_lm_gets_pseudo_perplexity_with_the_mask_token_given():
    loss = loss_for(_headed("bert", "BertForMaskedLM"), mask_token_id=4)
    assert type(loss) is PseudoPerplexity
    assert (loss.mask_token_id, loss.rounds, loss.skip_ids) == (4, 8, (0,))


def test_masked_lm_without_a_mask_token_is_a_clear_error():
    with pytest.raises(ValueError, match="masked LM but its config names no mask token"):
        loss_for(_headed("bert", "BertForMaskedLM"))


def test_a_module_without_config_is_a_clear_error_for_loss_for():
    with pytest.raises(ValueError, match="cannot choose a loss for HandWritten.*loss_fn="):
        loss_for(HandWritten(1))


def test_a_compiled_model_is_chosen_for_by_what_it_wraps():
    assert type(loss_for(torch.compile(tiny_family("bert", num_layers=1)))) is EmbeddingCosine


def test_unknown_class_fails_before_any_slow_work():
    model = _headed("bert", "BertForPreTraining")
    with pytest.raises(ValueError, match="cannot choose a loss for BertForPreTraining"):
        run_detection(model, "not inputs")  # the inputs are never read


def test_impact_transforms_read_like_a_perplexity_ratio():
    assert Perplexity().impact(math.log(6.0), math.log(3.0)) == pytest.approx(2.0)
    assert OutputKL().impact(math.log(2.0), 0.0) == pytest.approx(2.0)
    assert EmbeddingCosine().impact(0.5, 0.0) == 2.0  # cosine 0.5: turned 60 degrees
    assert EmbeddingCosine().impact(1.7, 0.0) == 1000.0  # beyond 90 degrees: floored
    assert LossRatio(lambda m, b: torch.tensor(1.0)).impact(3.0, 1.5) == 2.0


def test_a_loss_ratio_needs_a_positive_baseline():
    with pytest.raises(ValueError, match="a loss ratio needs a positive baseline"):
        LossRatio(lambda m, b: torch.tensor(0.0)).impact(1.0, 0.0)


def test_reference_losses_must_be_bound_first():
    model = tiny_family("bert", num_layers=1)
    with pytest.raises(ValueError, match=r"call \.bind\(model, batch\)"):
        EmbeddingCosine()(model, family_input(model))


def test_bound_references_give_zero_on_the_unablated_model():
    model = tiny_family("bert", num_layers=1)
    batch = family_input(model)
    assert float(EmbeddingCosine().bind(model, batch)(model, batch)) == pytest.approx(0, abs=1e-6)
    kl_model = _headed("bert", "BertForSequenceClassification")
    assert float(OutputKL().bind(kl_model, batch)(kl_model, batch)) == pytest.approx(0, abs=1e-6)


def test_pseudo_perplexity_scores_each_position_once_with_fixed_masks():
    seen: list[torch.Tensor] = []

    class Uniform(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            seen.append(input_ids.clone())
            return torch.zeros(*input_ids.shape, 10)

    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 0]])
    loss = PseudoPerplexity(3, rounds=2, skip_ids=(0,))(Uniform(), ids)
    assert float(loss) == pytest.approx(math.log(10))  # uniform over 10 tokens
    assert [s.tolist() for s in seen] == [[[0, 5, 3, 7, 3, 9, 0]], [[0, 3, 6, 3, 8, 3, 0]]]


def test_causal_lm_default_is_the_perplexity_path_unchanged():
    planted = planted_llama()
    ids = planted.calibration_ids()
    weights = [SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 8.0)]
    settings = VerifySettings(window=64, stride=32)
    default = measure_impacts(planted.model, weights, ids, settings)
    explicit = measure_impacts(planted.model, weights, ids, settings, loss_fn=Perplexity())
    assert default == explicit
    assert default.prefix_reused
    assert type(as_loss(planted.model, None)) is Perplexity
    assert impact(planted.model, ids, weights) == compare_masked(
        planted.model, ids, lambda: ablate(planted.model, weights)
    )


def test_a_module_without_config_is_measured_as_before():
    assert type(as_loss(HandWritten(1), None)) is Perplexity


def _planted_pair(model: torch.nn.Module, layer_template: str) -> list[SuperWeight]:
    """A spike pair on every token in layer 1 and two decoys; as candidates, planted first."""
    planted = plant_spike_pair(model, layer_template.format(1), 5, 17, on_every_token=True)
    plant_decoy(model, layer_template.format(1), 9, 33)
    plant_decoy(model, layer_template.format(0), 9, 33)
    return [
        SuperWeight(planted.module, 1, 5, 17, 8.0),
        SuperWeight(layer_template.format(1), 1, 9, 33, 8.0),
        SuperWeight(layer_template.format(0), 0, 9, 33, 8.0),
    ]


def test_image_classifier_super_weight_is_verified_by_kl():
    model = _headed("vit", "ViTForImageClassification", num_labels=8)
    candidates = _planted_pair(model, "vit.layers.{}.mlp.fc2")
    wire_head(model, 5, 3)
    result = run_detection(model, family_input(model))
    assert [(w.module, w.row, w.col, w.verdict) for w in result.candidates] == [
        ("vit.layers.1.mlp.fc2", 5, 17, "super")
    ]
    assert result.options["loss"] == "kl"
    assert result.baseline_perplexity is None
    measured, _, _ = verify(model, candidates, family_input(model))
    assert [w.verdict for w in measured] == ["super", "candidate", "candidate"]
    assert measured[0].impact > 4.0  # exp(KL): the head's 8 classes lose their certainty
    assert [w.impact for w in measured[1:]] == pytest.approx([1.0, 1.0])


def test_masked_lm_super_weight_is_verified_by_pseudo_perplexity():
    model = _headed("bert", "BertForMaskedLM")
    candidates = _planted_pair(model, "bert.encoder.layer.{}.output.dense")
    wire_head(model, 5, 7)  # the super activation's row reads as token 7
    loss = loss_for(model, mask_token_id=4)
    text = torch.full((1, 16), 7)
    result = run_detection(model, family_input(model), calibration=text, loss_fn=loss)
    assert [(w.module, w.row, w.col, w.verdict) for w in result.candidates] == [
        ("bert.encoder.layer.1.output.dense", 5, 17, "super")
    ]
    assert result.options["loss"] == "pseudo-perplexity"
    assert result.baseline_perplexity == pytest.approx(1.0, abs=1e-3)
    measured, _, joint = verify(model, candidates, text, loss_fn=loss)
    assert [w.verdict for w in measured] == ["super", "candidate", "candidate"]
    assert [w.impact for w in measured[1:]] == pytest.approx([1.0, 1.0])
    assert joint > 2.0


def test_impact_under_a_loss_compares_the_batch():
    model = tiny_family("vit", num_layers=3)
    candidates = _planted_pair(model, "layers.{}.mlp.fc2")
    batch = family_input(model)
    result = impact(model, batch, candidates[:1])
    assert isinstance(result, LossComparison)
    assert (result.loss, result.baseline) == ("cosine", pytest.approx(0.0, abs=1e-6))
    assert result.impact == pytest.approx(1 / (1 - result.masked))
    assert result.impact >= 2.0
    assert impact(model, batch, candidates[2:]).impact == pytest.approx(1.0, abs=0.01)


def test_a_plain_callable_is_measured_by_its_ratio():
    model = tiny_family("bert", num_layers=3)
    candidates = _planted_pair(model, "encoder.layer.{}.output.dense")

    def squared_pooled(model, batch):
        return model(**batch).last_hidden_state[..., 5].pow(2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measured = measure_impacts(model, candidates, family_input(model), loss_fn=squared_pooled)
    assert [w.verdict for w in measured.weights] == ["candidate", "candidate", "candidate"]
    assert measured.weights[0].impact < 0.1  # row 5 is quiet without its super activation
    assert measured.baseline_perplexity is None


def test_bad_batch_is_a_clear_error_before_any_forward():
    model = tiny_family("bert", num_layers=1)
    with pytest.raises(TypeError, match="a batch must be a tensor or a dict of tensors"):
        measure_impacts(model, [], [1, 2, 3])
