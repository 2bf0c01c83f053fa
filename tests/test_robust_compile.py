"""torch.compile: the recorder gives eager statistics and leaves no hook behind.

Measured behaviour (documented in the README): hooks registered *before* the first
compiled call are traced into the graph; removing them makes the compiled module
recompile without them. Hooks registered *after* the first compiled call are not seen
until ``torch.compiler.reset()`` forces a recompile.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sw_hooks.core.record import record


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(16, 32)
        self.down_proj = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _net(seed: int) -> _Net:
    torch.manual_seed(seed)
    net = _Net().eval()
    with torch.no_grad():
        net.layers[1].mlp.down_proj.weight[3, 7] = 40.0  # a spike to find
    return net


def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def _assert_same_stats(compiled, eager) -> None:
    assert set(compiled) == set(eager)
    for name, stats in eager.items():
        for side in ("input", "output"):
            got, want = getattr(compiled[name], side), getattr(stats, side)
            torch.testing.assert_close(got.abs_max, want.abs_max, rtol=1e-5, atol=1e-6)
            assert torch.equal(got.token, want.token)
            assert torch.equal(got.batch, want.batch)


def _check_compiled_recording(backend: str) -> None:
    torch.compiler.reset()
    net, x = _net(0), torch.randn(2, 5, 16)
    with record(net) as eager, torch.no_grad():
        net(x)
    compiled = torch.compile(net, backend=backend)
    with record(net) as rec, torch.no_grad():
        compiled(x)
        compiled(x)
    _assert_same_stats(rec.stats, eager.stats)
    assert {s.calls for s in rec.stats.values()} == {2}
    assert rec.stats["layers.1.mlp.down_proj"].output.top()[0] == 3
    # Removed: no hook left on the module, and the compiled graph no longer folds.
    assert _hooks(net) == 0
    with torch.no_grad():
        compiled(x)
    assert {s.calls for s in rec.stats.values()} == {2}


def test_compiled_recording_matches_eager_and_removal_leaves_no_hook():
    _check_compiled_recording("aot_eager")


@pytest.mark.slow
def test_inductor_recording_matches_eager():
    _check_compiled_recording("inductor")


def test_hooks_added_after_compiling_need_a_reset():
    torch.compiler.reset()
    net, x = _net(1), torch.randn(1, 4, 16)
    compiled = torch.compile(net, backend="aot_eager")
    with torch.no_grad():
        compiled(x)
    with record(net) as late, torch.no_grad():
        compiled(x)
    assert late.stats == {}  # the graph compiled without hooks does not run them
    with record(net) as after_reset, torch.no_grad():
        torch.compiler.reset()
        compiled(x)
    assert {s.calls for s in after_reset.stats.values()} == {1}
    assert _hooks(net) == 0


def test_recording_does_not_recompile_on_every_call() -> None:
    import torch._dynamo.utils as dynamo_utils

    torch.compiler.reset()
    net, x = _net(0), torch.randn(2, 5, 16)
    compiled = torch.compile(net, backend="aot_eager")
    with record(net) as rec, torch.no_grad():
        compiled(x)
        compiled(x)
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        for _ in range(6):
            compiled(x)
        assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    assert rec.stats["layers.1.mlp.down_proj"].calls == 8
