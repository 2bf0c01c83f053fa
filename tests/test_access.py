"""One coordinate type: every accepted shape, every refusal, and every room acting on it alike."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.core.access import Coordinate, WeightElement, coordinates_of
from sw_hooks.core.masks import ablate
from sw_hooks.core.record import record
from sw_hooks.core.results import SuperWeight
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.quantize import quantize_model
from sw_hooks.quant.targets import resolve_holdout
from sw_hooks.testing import planted_llama, planted_moe
from sw_hooks.training.guard import WeightGuard
from sw_hooks.training.monitor import SpikeTracker
from sw_hooks.training.session import MonitorSession

SUPER = "model.layers.1.mlp.down_proj"
FUSED = "model.layers.1.mlp.experts.down_proj"
DENSE = Coordinate(SUPER, 5, 17)
PLANTED_VALUE = 8.0


def _super_weight(expert: int | None = None, module: str = SUPER) -> SuperWeight:
    return SuperWeight(module, 1, 5, 17, PLANTED_VALUE, expert=expert)


# The three ways a user names the planted weight: a Coordinate, a tuple and a SuperWeight.
DENSE_FORMS = [DENSE, (SUPER, 5, 17), _super_weight()]
FORM_IDS = ["coordinate", "tuple", "super_weight"]


def _down_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.get_submodule(SUPER).weight.detach()


# -- the normaliser -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ((SUPER, 5, 17), Coordinate(SUPER, 5, 17, None)),
        ((FUSED, 3, 5, 17), Coordinate(FUSED, 5, 17, 3)),
        (_super_weight(), Coordinate(SUPER, 5, 17, None)),
        (_super_weight(expert=3, module=FUSED), Coordinate(FUSED, 5, 17, 3)),
        (Coordinate(FUSED, 5, 17, 3), Coordinate(FUSED, 5, 17, 3)),
    ],
    ids=["triple", "expert_quadruple", "super_weight", "expert_super_weight", "coordinate"],
)
def test_every_accepted_shape_gives_the_same_coordinate(value: object, expected: Coordinate):
    found = Coordinate.of(value)
    assert type(found) is Coordinate
    assert (found.module, found.row, found.col, found.expert) == (
        expected.module,
        expected.row,
        expected.col,
        expected.expert,
    )


def test_a_coordinate_is_returned_as_is():
    assert Coordinate.of(DENSE) is DENSE


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ((SUPER, 5), ValueError, r"is \(module, row, col\) or \(module, expert, row, col\)"),
        ((SUPER, 1, 2, 3, 4), ValueError, r"is \(module, row, col\) or \(module, expert"),
        ((), ValueError, r"is \(module, row, col\)"),
        (SUPER, TypeError, "expected a coordinate: .* got str"),
        (None, TypeError, "expected a coordinate: .* got NoneType"),
        ({"module": SUPER, "row": 5, "col": 17}, TypeError, "got dict"),
        ([SUPER, 5, 17], TypeError, "got list"),
        ((SUPER, "5", 17), TypeError, "row and col must be ints"),
        ((SUPER, 5.0, 17), TypeError, "row and col must be ints"),
        ((SUPER, True, 17), TypeError, "row and col must be ints"),
        ((7, 5, 17), TypeError, "module must be a non-empty str, got 7"),
        (("", 5, 17), TypeError, "module must be a non-empty str, got ''"),
        ((FUSED, 3.0, 5, 17), TypeError, "expert must be an int or None, got 3.0"),
        ((SUPER, -1, 17), ValueError, r"\[-1, 17\] is outside every weight"),
        ((FUSED, 3, 5, -2), ValueError, r"\[5, -2\] of expert 3 is outside every weight"),
        ((FUSED, -1, 5, 17), ValueError, r"\[5, 17\] of expert -1 is outside every weight"),
    ],
)
def test_bad_coordinates_give_one_clear_error(value: object, error: type, message: str):
    with pytest.raises(error, match=message):
        Coordinate.of(value)


def test_super_weight_coordinate_keeps_its_expert():
    coordinate = _super_weight(expert=3, module=FUSED).coordinate
    assert coordinate.expert == 3
    assert coordinate == Coordinate(FUSED, 5, 17, 3)
    assert coordinate != Coordinate(FUSED, 5, 17)  # another element: no expert
    assert coordinate == (FUSED, 3, 5, 17)


def test_a_coordinate_equals_hashes_and_unpacks_as_its_tuple():
    assert DENSE == (SUPER, 5, 17) and (SUPER, 5, 17) == DENSE
    assert DENSE != (SUPER, 5, 18) and DENSE != (SUPER, None, 5, 17)
    assert (SUPER, 5, 17) in {DENSE} and DENSE in {(SUPER, 5, 17): 1}
    assert list(Coordinate(FUSED, 5, 17, 3)) == [FUSED, 3, 5, 17]
    assert Coordinate.of(tuple(Coordinate(FUSED, 5, 17, 3))) == Coordinate(FUSED, 5, 17, 3)


def test_coordinates_of_takes_one_or_many():
    assert coordinates_of((SUPER, 5, 17)) == [DENSE]
    assert coordinates_of(_super_weight()) == [DENSE]
    assert coordinates_of(((SUPER, 5, 17), (FUSED, 3, 5, 17))) == [
        DENSE,
        Coordinate(FUSED, 5, 17, 3),
    ]
    with pytest.raises(TypeError, match="expected a coordinate or an iterable of coordinates"):
        coordinates_of(5)


# -- every room takes every shape and acts on the same element ----------------------------
@pytest.mark.parametrize("weight", DENSE_FORMS, ids=FORM_IDS)
def test_weight_element_resolves_every_shape(weight: object):
    element = WeightElement.resolve(planted_llama().model, weight)
    assert element.coordinate == DENSE
    assert element.read_float() == PLANTED_VALUE


@pytest.mark.parametrize("weight", DENSE_FORMS, ids=FORM_IDS)
def test_masks_ablate_the_same_element_for_every_shape(weight: object):
    model = planted_llama().model
    before = _down_weight(model).clone()
    for given in (weight, [weight]):  # one coordinate, or a list of them
        with ablate(model, given):
            changed = (_down_weight(model) != before).nonzero().tolist()
            assert changed == [[5, 17]] and float(_down_weight(model)[5, 17]) == 0.0
        assert torch.equal(_down_weight(model), before)


@pytest.mark.parametrize("weight", DENSE_FORMS, ids=FORM_IDS)
def test_guard_holds_the_same_element_for_every_shape(weight: object):
    model = planted_llama().model
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _down_weight(model).clone()
    assert WeightGuard(model, weight).coordinates == [DENSE]  # one coordinate, not in a list
    with WeightGuard(model, [weight]).attach(optimizer) as guard:
        assert guard.coordinates == [DENSE]
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optimizer.step()
    after = _down_weight(model)
    assert float(after[5, 17]) == PLANTED_VALUE
    assert not torch.equal(after, before)  # its neighbours moved


def test_guard_coordinates_keep_the_expert():
    planted = planted_moe("mixtral")
    guard = WeightGuard(planted.model, [(FUSED, 3, 5, 17)])
    assert guard.coordinates == [Coordinate(FUSED, 5, 17, 3)]
    assert guard.coordinates[0].expert == 3


@pytest.mark.parametrize("weight", DENSE_FORMS, ids=FORM_IDS)
def test_tracker_and_session_track_the_same_element_for_every_shape(weight: object):
    planted = planted_llama()
    tracker = SpikeTracker([weight])
    assert [w.coordinate for w in tracker.super_weights] == [DENSE]
    with record(planted.model) as recording, torch.no_grad():
        planted.model(planted.prompt())
    tracker.update(planted.model, recording.stats, step=0)
    assert tracker.current(planted.model, recording.stats)[DENSE][0] == PLANTED_VALUE
    for shape in DENSE_FORMS:
        assert tracker.status(shape) == set()
    session = MonitorSession(planted.model, super_weights=[weight])
    assert [w.coordinate for w in session.tracker.super_weights] == [DENSE]


@pytest.mark.parametrize("weight", DENSE_FORMS, ids=FORM_IDS)
def test_quantize_holds_out_the_same_element_for_every_shape(weight: object):
    model = planted_llama().model
    assert resolve_holdout(model, [weight]) == {SUPER: [(5, 17)]}
    before = _down_weight(model).clone()
    with quantize_model(model, QuantConfig(3, 64), holdout=[weight]):
        after = _down_weight(model)
        assert float(after[5, 17]) == PLANTED_VALUE
        assert not torch.equal(after, before)  # the rest of the matrix was quantized
    assert torch.equal(_down_weight(model), before)
