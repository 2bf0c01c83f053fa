"""Faults at every step of a mask or a recorder leave the model exactly as it was."""

from __future__ import annotations

import threading

import pytest
import torch

from sw_hooks.core.access import WeightElement
from sw_hooks.core.masks import ablate, scale
from sw_hooks.core.record import record
from sw_hooks.testing import planted_llama

WEIGHTS = [
    ("model.layers.1.mlp.down_proj", 5, 17),
    ("model.layers.1.mlp.down_proj", 6, 17),
    ("model.layers.2.mlp.down_proj", 0, 0),
    ("model.layers.3.mlp.down_proj", 9, 33),
]


class Fault(Exception):
    pass


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().view(torch.int32).clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value.detach().view(torch.int32), snapshot[key]), key


def _fail_on_call(monkeypatch, method: str, call: int, error: type[BaseException]) -> list[int]:
    """Make ``WeightElement.<method>`` raise ``error`` on its ``call``-th call (1-based), once."""
    original = getattr(WeightElement, method)
    calls = [0]

    def faulty(self, *args):
        calls[0] += 1
        if calls[0] == call:
            raise error(f"{method} call {call}")
        return original(self, *args)

    monkeypatch.setattr(WeightElement, method, faulty)
    return calls


@pytest.fixture(scope="module")
def planted_model():
    return planted_llama().model


@pytest.mark.parametrize("error", [Fault, KeyboardInterrupt])
@pytest.mark.parametrize("method", ["read", "write"])
@pytest.mark.parametrize("call", range(1, len(WEIGHTS) + 1))
def test_fault_while_applying_leaves_every_weight(planted_model, monkeypatch, error, method, call):
    snapshot = _snapshot(planted_model)
    calls = _fail_on_call(monkeypatch, method, call, error)
    with pytest.raises(error), ablate(planted_model, WEIGHTS):
        pytest.fail("the body must not run when applying failed")
    assert calls[0] >= call
    _assert_unchanged(planted_model, snapshot)


@pytest.mark.parametrize("call", range(1, len(WEIGHTS) + 1))
def test_interrupt_while_restoring_then_restore_again(planted_model, monkeypatch, call):
    snapshot = _snapshot(planted_model)
    mask = scale(planted_model, WEIGHTS, 3.0).apply()
    _fail_on_call(monkeypatch, "write", call, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        mask.restore()
    assert mask.active  # what was not written back is still remembered
    mask.restore()
    assert not mask.active
    _assert_unchanged(planted_model, snapshot)


@pytest.mark.parametrize("error", [Fault, KeyboardInterrupt])
def test_fault_inside_the_body_of_nested_masks(planted_model, error):
    snapshot = _snapshot(planted_model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(error), ablate(planted_model, WEIGHTS[:2]), scale(planted_model, WEIGHTS, 2):
        with torch.no_grad():
            planted_model(ids)
        raise error("in the body")
    _assert_unchanged(planted_model, snapshot)


def test_fault_inside_a_recorded_forward_removes_every_hook(planted_model):
    snapshot = _snapshot(planted_model)
    hooks_before = _hook_count(planted_model)

    def explode(module, args, output):
        raise Fault("forward failed")

    layer = planted_model.get_submodule("model.layers.2")
    handle = layer.register_forward_hook(explode)
    try:
        with pytest.raises(Fault), record(planted_model) as rec, ablate(planted_model, WEIGHTS):
            planted_model(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert _hook_count(planted_model) == hooks_before
    # Layer 2's down-projection ran before the layer's own hook raised; layer 3 never ran.
    assert list(rec.stats) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    _assert_unchanged(planted_model, snapshot)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_two_threads_on_two_models_keep_their_own_statistics():
    first, second = planted_llama(seed=1), planted_llama(seed=2)
    runs = {"first": (first, first.prompt()), "second": (second, torch.tensor([[5, 1, 9] * 20]))}
    serial = {}
    for key, (planted, ids) in runs.items():
        with record(planted.model) as rec, torch.no_grad():
            planted.model(ids)
        serial[key] = rec.stats
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(key: str) -> None:
        planted, ids = runs[key]
        try:
            with record(planted.model) as rec, torch.no_grad():
                barrier.wait()
                for _ in range(5):
                    planted.model(ids)
            results[key] = rec.stats
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(key,)) for key in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for key, stats in results.items():
        assert set(stats) == set(serial[key])
        for name, module_stats in stats.items():
            assert module_stats.calls == 5
            assert torch.equal(module_stats.output.abs_max, serial[key][name].output.abs_max)
            assert torch.equal(module_stats.input.abs_max, serial[key][name].input.abs_max)
    # The two models really produce different maxima, so mixing would have shown.
    name = "model.layers.1.mlp.down_proj"
    assert not torch.equal(
        results["first"][name].output.abs_max, results["second"][name].output.abs_max
    )
