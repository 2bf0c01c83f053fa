import pytest

from sw_hooks.analysis.analyzer import TransformerAnalyzer


def test_facade_over_the_functional_api(planted):
    analyzer = TransformerAnalyzer(planted.model)
    layers = analyzer.analyze_activations(planted.prompt())
    assert [(a.layer, a.input_channel, a.output_channel) for a in layers if a.output_max > 100] == [
        (1, 17, 5),
        (3, 33, 9),
    ]
    assert analyzer.analyze_activations(planted.prompt(), layer_indices=[3])[0].output_channel == 9

    by_magnitude = analyzer.find_superweights(8.0, criterion="absolute")
    assert {(w.layer, w.row, w.col) for w in by_magnitude} == {(1, 5, 17), (3, 9, 33)}

    result = analyzer.detect(planted.calibration_ids())
    assert [(w.layer, w.row, w.col) for w in result.verified] == [(1, 5, 17)]
    comparison = analyzer.evaluate_impact(planted.calibration_ids(), result.verified)
    assert comparison.ratio >= 2.0


def test_text_needs_a_tokenizer(planted):
    with pytest.raises(ValueError, match="no tokenizer"):
        TransformerAnalyzer(planted.model).analyze_activations("some text")
