"""The hook-lifetime helper, and every hook owner leaving no hook behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch
from torch import nn

from sw_hooks.analysis.trace import residual_trace
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.masks import restore_activation
from sw_hooks.core.record import record
from sw_hooks.core.results import SuperWeight
from sw_hooks.quant.activations import quantize_activations
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.quantize import QuantizedModel
from sw_hooks.testing import tiny_model
from sw_hooks.training.guard import WeightGuard, guard

DOWN = "model.layers.1.mlp.down_proj"
SUPER = SuperWeight(DOWN, 1, 5, 17, 8.0, output_activation=50.0, token_position=0)
IDS = torch.tensor([[1, 2, 3, 4]])

_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules that still hold any forward hook, pre-hook or kwargs flag."""
    return [
        name
        for name, module in model.named_modules()
        if any(getattr(module, table) for table in _HOOK_TABLES)
    ]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _LoggedHandle:
    """A handle that writes its name into ``log`` each time it is removed."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def remove(self) -> None:
        self.log.append(self.name)


def _noop(*_: object) -> None:
    return None


# -- HookSet -------------------------------------------------------------------------------


def test_remove_runs_newest_first() -> None:
    log: list[str] = []
    hooks = HookSet()
    for name in ("first", "second", "third"):
        hooks.add(_LoggedHandle(name, log))
    hooks.remove()
    assert log == ["third", "second", "first"]


def test_remove_is_idempotent() -> None:
    log: list[str] = []
    linear = nn.Linear(2, 2)
    hooks = HookSet()
    hooks.add(_LoggedHandle("logged", log))
    hooks.forward(linear, _noop)
    hooks.pre(linear, _noop, with_kwargs=True)
    assert len(hooks) == 3
    hooks.remove()
    hooks.remove()
    assert log == ["logged"] and len(hooks) == 0
    assert not linear._forward_hooks and not linear._forward_pre_hooks


def test_forward_and_pre_pass_their_options_to_torch() -> None:
    linear = nn.Linear(2, 2)
    with HookSet() as hooks:
        forward = hooks.forward(linear, _noop, with_kwargs=True, always_call=True)
        pre = hooks.pre(linear, _noop, with_kwargs=True)
        assert linear._forward_hooks_with_kwargs == {forward.id: True}
        assert linear._forward_hooks_always_called == {forward.id: True}
        assert linear._forward_pre_hooks_with_kwargs == {pre.id: True}
    assert _hooked_modules(linear) == []


def test_leaving_the_with_block_removes_even_after_an_error() -> None:
    linear = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with HookSet() as hooks:
            hooks.forward(linear, _noop)
            raise RuntimeError("boom")
    assert _hooked_modules(linear) == []


def test_an_error_while_registering_leaves_no_hook() -> None:
    linear = nn.Linear(2, 2)
    hooks = HookSet()
    with pytest.raises(RuntimeError, match="refused"):
        with hooks.registering():
            hooks.forward(linear, _noop)
            hooks.pre(linear, _noop)
            raise RuntimeError("refused")
    assert _hooked_modules(linear) == [] and len(hooks) == 0


def test_an_error_while_registering_keeps_what_was_registered_before() -> None:
    """A second registration that fails takes back only its own hooks, not the first's."""
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    hooks = HookSet()
    with hooks.registering():
        hooks.forward(first, _noop)
    with pytest.raises(RuntimeError, match="refused"):
        with hooks.registering():
            hooks.forward(second, _noop)
            raise RuntimeError("refused")
    assert len(first._forward_hooks) == 1 and _hooked_modules(second) == []
    hooks.remove()
    assert _hooked_modules(first) == []


def test_registering_without_an_error_keeps_every_hook() -> None:
    linear = nn.Linear(2, 2)
    hooks = HookSet()
    with hooks.registering():
        hooks.forward(linear, _noop)
    assert len(linear._forward_hooks) == 1
    hooks.remove()


# -- every owner, entered and left ---------------------------------------------------------


def _recording(model: nn.Module) -> AbstractContextManager:
    return record(model)


def _restoring(model: nn.Module) -> AbstractContextManager:
    return restore_activation(model, [SUPER])


def _quantizing_activations(model: nn.Module) -> AbstractContextManager:
    return quantize_activations(model, 8, holdout=[SUPER])


def _quantizing_weights(model: nn.Module) -> AbstractContextManager:
    return QuantizedModel(model, QuantConfig(4, 64))


@contextmanager
def _guarding(model: nn.Module) -> Iterator[None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with WeightGuard(model, [SUPER], "restore").attach(optimizer):
        yield
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


OWNERS: dict[str, Callable[[nn.Module], AbstractContextManager]] = {
    "record": _recording,
    "restore_activation": _restoring,
    "quantize_activations": _quantizing_activations,
    "QuantizedModel": _quantizing_weights,
    "guard": _guarding,
}


@pytest.mark.parametrize("owner", sorted(OWNERS))
def test_no_hook_is_left_after_a_forward_inside_each_owner(owner: str) -> None:
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad(), OWNERS[owner](model):
        assert model(IDS).logits.shape == (1, 4, 256)
    assert _hooked_modules(model) == []


@pytest.mark.parametrize("owner", sorted(OWNERS))
def test_no_hook_is_left_after_a_forward_that_raised_inside_each_owner(owner: str) -> None:
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(IndexError):
        with torch.no_grad(), OWNERS[owner](model):
            model(torch.tensor([[1, 2, 999]]))  # past the 256-token vocabulary
    assert _hooked_modules(model) == []


def test_no_hook_is_left_after_a_residual_trace() -> None:
    model = tiny_model("llama", num_layers=2)
    residual_trace(model, IDS, channel=5, token=0)
    with pytest.raises(ValueError, match="outside hidden size"):
        residual_trace(model, IDS, channel=64, token=0)
    assert _hooked_modules(model) == []


# -- when each owner registers ---------------------------------------------------------------


def test_record_registers_when_made_and_with_only_removes() -> None:
    """By design: ``record(model)`` records from the call on, ``with`` is optional."""
    model = tiny_model("llama", num_layers=2)
    recorder = record(model)
    assert _hook_count(model) > 0
    with recorder:
        pass
    assert _hooked_modules(model) == []


@pytest.mark.parametrize("owner", ["restore_activation", "quantize_activations"])
def test_hook_context_registers_nothing_before_enter(owner: str) -> None:
    model = tiny_model("llama", num_layers=2)
    context = OWNERS[owner](model)
    assert _hooked_modules(model) == []
    with context:
        assert _hook_count(model) > 0
    assert _hooked_modules(model) == []


def test_weight_guard_hooks_the_optimizer_on_attach_not_when_made() -> None:
    model = tiny_model("llama", num_layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    made = WeightGuard(model, [SUPER], "restore")
    assert not optimizer._optimizer_step_post_hooks
    with made.attach(optimizer):
        assert len(optimizer._optimizer_step_post_hooks) == 1
    assert not optimizer._optimizer_step_post_hooks
    with guard(model, [SUPER], optimizer, mode="freeze"):
        assert len(optimizer._optimizer_step_pre_hooks) == 1
    assert not optimizer._optimizer_step_pre_hooks


# -- an error while registering, through each owner ----------------------------------------


class _RefusesHooks(nn.Module):
    """Wraps a model; refuses any forward pre-hook, as a module with frozen hooks might."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.inner(input_ids, attention_mask=attention_mask)

    def register_forward_pre_hook(self, *args: object, **kwargs: object):
        raise RuntimeError("hooks refused")


def test_record_leaves_no_hook_when_registration_fails() -> None:
    model = _RefusesHooks(tiny_model("llama", num_layers=2))
    with pytest.raises(RuntimeError, match="hooks refused"):
        record(model, [f"inner.{DOWN}"])
    assert _hooked_modules(model) == []


def test_restore_activation_leaves_no_hook_when_registration_fails() -> None:
    model = tiny_model("llama", num_layers=2)
    down = model.get_submodule(DOWN)

    def refuse(*args: object, **kwargs: object):
        raise RuntimeError("hooks refused")

    down.register_forward_hook = refuse  # the writer comes last, after the ancestors' hooks
    with pytest.raises(RuntimeError, match="hooks refused"):
        with restore_activation(model, [SUPER]):
            pass
    assert _hooked_modules(model) == []


def test_guard_attach_takes_back_its_hooks_when_one_optimizer_refuses() -> None:
    model = tiny_model("llama", num_layers=2)
    good = torch.optim.SGD(model.parameters(), lr=0.1)
    refusing = torch.optim.SGD(model.parameters(), lr=0.1)

    def refuse(*args: object, **kwargs: object):
        raise RuntimeError("hooks refused")

    refusing.register_step_pre_hook = refuse
    guarded = WeightGuard(model, [SUPER], "freeze")
    with pytest.raises(RuntimeError, match="hooks refused"):
        guarded.attach(good, refusing)
    assert not good._optimizer_step_pre_hooks


# -- what a restore-mode guard holds ends on detach ------------------------------------------


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(IDS).logits.pow(2).sum().backward()
    optimizer.step()


def test_restore_guard_attached_again_keeps_the_values_of_that_moment() -> None:
    """Detach lets go of the remembered value: a weight changed between two attaches stays."""
    model = tiny_model("llama", num_layers=2)
    weight = model.get_submodule(DOWN).weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guarded = WeightGuard(model, [SUPER], "restore")
    with guarded.attach(optimizer):
        _step(model, optimizer)
    with torch.no_grad():
        weight[5, 17] = 3.25  # changed on purpose while unguarded
    with guarded.attach(optimizer):
        _step(model, optimizer)
    assert float(weight.detach()[5, 17]) == 3.25


def test_restore_guard_detached_leaves_the_model_free_to_be_collected() -> None:
    import gc
    import weakref

    model = tiny_model("llama", num_layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with WeightGuard(model, [SUPER], "restore").attach(optimizer):
        _step(model, optimizer)
    parameter = weakref.ref(model.get_submodule(DOWN).weight)
    del model, optimizer
    gc.collect()
    assert parameter() is None


def test_restore_guard_that_fails_to_attach_holds_nothing() -> None:
    model = tiny_model("llama", num_layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def refuse(*args: object, **kwargs: object):
        raise RuntimeError("hooks refused")

    optimizer.register_step_post_hook = refuse
    guarded = WeightGuard(model, [SUPER], "restore")
    with pytest.raises(RuntimeError, match="hooks refused"):
        guarded.attach(optimizer)
    with torch.no_grad():
        model.get_submodule(DOWN).weight[5, 17] = 3.25
    good = torch.optim.SGD(model.parameters(), lr=0.1)
    with guarded.attach(good):
        _step(model, good)
    assert float(model.get_submodule(DOWN).weight.detach()[5, 17]) == 3.25
