"""A model whose decoder blocks stay in the checkpoint until a block is needed.

:func:`open_streamed` builds the model from its ``config.json`` with every parameter on the
``meta`` device (accelerate's ``init_empty_weights``; buffers such as rotary frequencies are
real), then reads the weights that are not in a decoder block -- embeddings, final norm, LM
head -- through safetensors' lazy ``safe_open``. A block's weights are read only inside
:meth:`StreamedModel.loaded` and dropped on exit, so memory holds one block at a time.

:func:`in_memory` wraps an ordinary model in the same interface (loading is then a no-op),
so the block-major engine (:mod:`sw_hooks.analysis.blockwise`) runs either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sw_hooks.core.locate import find_down_projections
from sw_hooks.placement import checkpoint_dtype

INDEX_FILE = "model.safetensors.index.json"


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ``ModuleList`` of the decoder blocks that hold the down-projections."""
    names = list(find_down_projections(model))
    lists = dict(_block_lists(model))
    for name in names:
        for list_name, blocks in lists.items():
            if name.startswith(f"{list_name}."):
                return list_name, blocks
    raise ValueError("the model's down-projections sit in no list of decoder blocks")


def _block_lists(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name:
            yield name, module


@dataclass(frozen=True)
class CheckpointReader:
    """The tensors of a safetensors checkpoint (one file or a sharded index), read lazily."""

    folder: Path
    files: dict[str, Path]
    """``{tensor name: file}``."""

    @classmethod
    def of(cls, folder: str | Path) -> CheckpointReader:
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            return cls(folder, {name: folder / file for name, file in mapping.items()})
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(
                f"{folder} needs one .safetensors file or a {INDEX_FILE}, found {len(files)} files"
            )
        return cls(folder, dict.fromkeys(_tensor_names(files[0]), files[0]))

    def read(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each name, each file opened once and closed after its
        tensors are copied out, so no mapping of the file outlives the read."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, in_file in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in in_file:
                    yield name, handle.get_tensor(name)


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as handle:
        return list(handle.keys())


@dataclass
class StreamedModel:
    """A model, its decoder blocks, and how to bring one block's weights in and out.

    Attributes:
        model: the model; a streamed one holds its blocks' parameters on ``meta`` between loads.
        blocks: the decoder blocks, in order.
        blocks_name: their module path (``model.layers``).
        reader: where weights are read from; ``None`` for a model already in memory.
        dtype: the dtype weights are loaded in.
        device: where weights are loaded (and the model runs).
        bytes_read: checkpoint bytes read so far (as stored, resident weights included).
        block_loads: how many times a block was loaded.
    """

    model: nn.Module
    blocks: nn.ModuleList
    blocks_name: str
    reader: CheckpointReader | None = None
    dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    bytes_read: int = 0
    block_loads: int = 0

    @property
    def streamed(self) -> bool:
        return self.reader is not None

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_name}.{index}."

    @contextmanager
    def loaded(self, *prefixes: str) -> Iterator[None]:
        """The parameters under each module prefix (``model.layers.3.``) in memory inside."""
        if self.reader is None:
            yield
            return
        names = [
            n for n, p in self.model.named_parameters() if n.startswith(prefixes) and p.is_meta
        ]
        try:
            self._load(names)
            yield
        finally:
            for name in names:
                _set_tensor(self.model, name, "meta")

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights loaded."""
        self.block_loads += 1
        with self.loaded(self.block_prefix(index)):
            yield self.blocks[index]

    def _load(self, names: Sequence[str]) -> None:
        assert self.reader is not None
        for name, tensor in self.reader.read(names):
            self.bytes_read += tensor.numel() * tensor.element_size()
            _set_tensor(self.model, name, self.device, tensor.to(self.dtype or tensor.dtype))

    def block_bytes(self, index: int) -> int:
        """Bytes of block ``index``'s parameters in the loaded dtype."""
        return sum(p.numel() * p.element_size() for p in self.blocks[index].parameters())


def _set_tensor(
    model: nn.Module, name: str, device: str, value: torch.Tensor | None = None
) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value)


def in_memory(model: nn.Module) -> StreamedModel:
    """An ordinary model in the block-major engine's interface: nothing is ever read."""
    name, blocks = decoder_blocks(model)
    return StreamedModel(model, blocks, name)


def open_streamed(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> StreamedModel:
    """Build the model of a safetensors checkpoint folder with only its resident weights read.

    ``dtype``: the dtype to load weights in (default: the checkpoint's own, ``config.dtype``);
    ``device``: where every weight goes when loaded, and where the model runs.

    Raises:
        ValueError: the folder has no config or safetensors weights, the model has no list of
            decoder blocks, or the checkpoint lacks a weight the model needs.

    Example:
        >>> streamed = open_streamed("path/to/checkpoint")  # doctest: +SKIP
        >>> with streamed.block(0) as block:  # block 0's weights read, dropped on exit
        ...     ...
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json: streaming needs a checkpoint folder")
    reader = CheckpointReader.of(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = dtype or checkpoint_dtype(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    blocks_name, blocks = decoder_blocks(model)
    device = torch.device(device)
    streamed = StreamedModel(model, blocks, blocks_name, reader, dtype, device)
    for name, _ in list(model.named_buffers()):
        _set_tensor(model, name, device)
    missing = [n for n in _owned_parameters(model) if n not in reader.files]
    if missing:
        raise ValueError(
            f"{folder} lacks {len(missing)} weight(s) the model needs, e.g. {missing[0]}"
        )
    streamed._load([n for n in _owned_parameters(model) if not n.startswith(f"{blocks_name}.")])
    model.tie_weights()
    return streamed


def _owned_parameters(model: nn.Module) -> list[str]:
    """Parameter names, a tied weight under its first name only."""
    return [name for name, _ in model.named_parameters(remove_duplicate=True)]
