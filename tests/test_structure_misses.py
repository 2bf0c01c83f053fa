"""Structure location on the block shapes it used to miss, and saying which blocks it missed.

Each model is hand-written (no name table knows its modules), so only the data flow can
find its MLP output projections; every one of them is expected, in every block.
"""

import warnings

import pytest
import torch
from torch import nn

from sw_hooks.core import structure
from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.structure import find_output_projections
from sw_hooks.core.structure_answers import MissedBlocksWarning

F = nn.functional
IDS = torch.tensor([[1, 2, 3, 4]])


def _blocks(layers: int, **modules) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleDict({name: make() for name, make in modules.items()}) for _ in range(layers)
    )


class DeepNorm(nn.Module):
    """Post-norm blocks ``norm(alpha * h + mlp(h))`` (DeepNet)."""

    def __init__(self, layers: int = 3, alpha: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.embed = alpha, nn.Embedding(32, 8)
        self.blocks = _blocks(
            layers, norm=lambda: nn.LayerNorm(8), fc1=lambda: nn.Linear(8, 16),
            fc2=lambda: nn.Linear(16, 8),
        )  # fmt: skip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = b["norm"](self.alpha * h + b["fc2"](F.gelu(b["fc1"](h))))
        return h


class Parallel(nn.Module):
    """Parallel attention and MLP summed as ``x + attn(n) + mlp(n)`` (Cohere's order)."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        square = {name: (lambda: nn.Linear(8, 8)) for name in ("q", "k", "v", "o")}
        self.blocks = _blocks(
            layers, norm=lambda: nn.LayerNorm(8), up=lambda: nn.Linear(8, 16),
            down=lambda: nn.Linear(16, 8), **square,
        )  # fmt: skip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            n = b["norm"](x)
            scores = torch.softmax(b["q"](n) @ b["k"](n).transpose(-1, -2), -1)
            x = x + b["o"](scores @ b["v"](n)) + b["down"](F.silu(b["up"](n)))
        return x


class Fp32Residual(nn.Module):
    """Mamba's ``residual_in_fp32``: blocks run in the parameters' dtype, the residual stream
    is kept in float32 and added to a block's output at the start of the next block."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed, self.norm_f = nn.Embedding(32, 8), nn.RMSNorm(8)
        self.blocks = _blocks(
            layers, norm=lambda: nn.RMSNorm(8), up=lambda: nn.Linear(8, 16, bias=False),
            down=lambda: nn.Linear(16, 8, bias=False),
        )  # fmt: skip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed(ids), None
        for b in self.blocks:
            residual = hidden if residual is None else hidden + residual
            hidden = b["norm"](residual.to(b["norm"].weight.dtype))
            residual = residual.to(torch.float32)  # a no-op in float32, a cast in bfloat16
            hidden = b["down"](F.gelu(b["up"](hidden)))
        return self.norm_f((hidden + residual).to(self.norm_f.weight.dtype))


class ConvNeXtLike(nn.Module):
    """ConvNeXt blocks: a depthwise conv, a channels-last MLP, permuted back before the add
    (the first block adds to the model's own input)."""

    def __init__(self, layers: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.blocks = _blocks(
            layers, dwconv=lambda: nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
            norm=lambda: nn.LayerNorm(dim), pwconv1=lambda: nn.Linear(dim, 4 * dim),
            pwconv2=lambda: nn.Linear(4 * dim, dim),
        )  # fmt: skip
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for b in self.blocks:
            y = b["pwconv2"](F.gelu(b["pwconv1"](b["norm"](b["dwconv"](x).permute(0, 2, 3, 1)))))
            x = x + (self.gamma * y).permute(0, 3, 1, 2)
        return x


def _found(model: nn.Module, example) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissedBlocksWarning)  # a partial answer fails here
        return find_output_projections(model, example)


@pytest.mark.parametrize(
    ("model", "example", "projection"),
    [
        (DeepNorm(), IDS, "fc2"),
        (Parallel(), IDS, "down"),
        (Fp32Residual(), IDS, "down"),
        (Fp32Residual().to(torch.bfloat16), IDS, "down"),
        (ConvNeXtLike(), torch.randn(1, 8, 4, 4), "pwconv2"),
    ],
    ids=["deepnorm", "parallel-x-first", "fp32-residual-float32", "fp32-residual-bfloat16",
         "convnext-permute"],
)  # fmt: skip
def test_every_block_is_found(model, example, projection) -> None:
    assert _found(model, example) == [f"blocks.{i}.{projection}" for i in range(3)]


def test_transformers_convnext_is_found_in_every_stage() -> None:
    from transformers import ConvNextConfig, ConvNextModel

    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 1], num_stages=2, image_size=32)
    found = _found(ConvNextModel(config), None)
    assert found == [
        "encoder.stages.0.layers.0.pwconv2",
        "encoder.stages.0.layers.1.pwconv2",
        "encoder.stages.1.layers.0.pwconv2",
    ]


class OneOddBlock(DeepNorm):
    """Block 1 sorts its activation before the down-projection (not a pointwise function)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for index, b in enumerate(self.blocks):
            act = F.gelu(b["fc1"](h))
            act = act.sort(dim=-1).values if index == 1 else act
            h = b["norm"](self.alpha * h + b["fc2"](act))
        return h


def test_blocks_missed_beside_found_ones_are_named() -> None:
    with pytest.warns(MissedBlocksWarning) as caught:
        found = find_down_projections(OneOddBlock(), example_input=IDS)
    assert list(found) == ["blocks.0.fc2", "blocks.2.fc2"]
    (warning,) = caught
    assert str(warning.message).startswith(
        "OneOddBlock: found by structure in 2 of 3 blocks (blocks.#.fc2), missed in "
        "blocks.1.fc2: their data flow does not match"
    )


class LongInputsSkipTheMlp(nn.Module):
    """Inputs longer than 4 tokens skip the MLP: what is found depends on the example."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up, self.down = nn.Embedding(32, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return x if ids.shape[1] > 4 else x + self.down(F.gelu(self.up(x)))


def test_the_kept_answer_is_keyed_by_the_example() -> None:
    model = LongInputsSkipTheMlp()
    assert find_output_projections(model, IDS) == ["down"]
    assert find_output_projections(model, torch.arange(8)[None]) == []
    assert find_output_projections(model, IDS) == ["down"]


def test_the_kept_answer_is_keyed_by_the_dtype(monkeypatch) -> None:
    traces = []
    real = structure.trace_linears
    monkeypatch.setattr(structure, "trace_linears", lambda *a: traces.append(1) or real(*a))
    model = Fp32Residual()
    assert len(_found(model, IDS)) == 3 and len(traces) == 1
    assert len(_found(model, IDS)) == 3 and len(traces) == 1  # kept
    model.to(torch.bfloat16)  # the same modules, another dtype: traced again
    assert len(_found(model, IDS)) == 3 and len(traces) == 2
