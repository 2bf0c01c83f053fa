"""An importance matrix from recording, written in llama.cpp's imatrix GGUF format.

``llama-quantize --imatrix`` weighs each input channel of a weight by how large the
activations entering it were: per linear, the per-channel sum of squared inputs and the
number of tokens summed. :class:`ImportanceMatrix` hooks every linear of a model and keeps
exactly that (O(channels) state), so the channels that carry super activations, the inputs
of the super weights, get the weight they deserve when llama.cpp quantizes.

The state is a sum, so it merges by adding: :meth:`ImportanceMatrix.merge` for two
recordings, :meth:`ImportanceMatrix.all_reduce` across ranks, ``state_dict`` for checkpoints.
:meth:`ImportanceMatrix.write_gguf` writes what ``llama-imatrix`` writes: ``general.type``
``"imatrix"``, the three ``imatrix.*`` keys ``llama-quantize`` requires (``datasets``,
``chunk_count``, ``chunk_size``; no ``general.architecture``), and per weight
``<tensor>.in_sum2`` (``[1, C]`` F32) and ``<tensor>.counts`` (``[1, 1]`` F32), under
llama.cpp's tensor names. Mixture-of-experts weights, 3-D in llama.cpp
(``blk.N.ffn_down_exps``), get one row and one count per expert: ``[E, C]`` and ``[E, 1]``
(:mod:`sw_hooks.export.imatrix_experts`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sw_hooks.core.access import oriented_shape
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import is_linear_like
from sw_hooks.core.record import TokenMasks
from sw_hooks.export.gguf_names import gguf_tensor_name
from sw_hooks.export.imatrix_experts import (
    ExpertEntry,
    expert_entries,
    hook_experts,
    list_expert_linears,
)

CHUNK_SIZE = 512
"""``imatrix.chunk_size`` written by default: ``llama-imatrix``'s default context length."""

_SUM2, _COUNTS = "in_sum2", "counts"

ModuleChoice = Mapping[str, nn.Module] | Iterable[str] | str | re.Pattern[str] | None


def input_square_sums(
    x: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Per-channel sum of ``x**2`` over the real tokens of one activation, and their number.

    ``x`` is ``[batch, seq, channels]`` (or ``[tokens, channels]``); ``token_mask``
    (``[batch, seq]``, true for real tokens) leaves padding out of both. Squares are taken in
    float32, as llama.cpp does, and summed in float64 so that long recordings stay exact.

    Example:
        >>> sums, tokens = input_square_sums(torch.tensor([[[1.0, 2.0], [3.0, -4.0]]]))
        >>> sums.tolist(), tokens
        ([10.0, 20.0], 2)
    """
    x = x.detach()
    flat = x.reshape(-1, x.shape[-1])
    if token_mask is not None and x.dim() >= 3 and tuple(token_mask.shape) == tuple(x.shape[:2]):
        flat = flat[token_mask.to(device=x.device, dtype=torch.bool).reshape(-1)]
    return flat.float().square().sum(dim=0, dtype=torch.float64), int(flat.shape[0])


class ImportanceMatrix:
    """Per linear, the sum of squared inputs per channel and the count of tokens summed.

    Experts weights (3-D in llama.cpp) hold one row of sums and one count per expert:
    ``in_sum2[name]`` is ``[experts, C]`` and ``counts[name]`` ``[experts]``.

    Hooks are registered when it is made and removed by :meth:`remove` or on leaving a
    ``with`` block. A 2-D ``attention_mask=`` keeps padded tokens out, whether it is passed
    to the model or, inside it, to a module on the way to the linears (as the recorder does).

    Args:
        model: any ``nn.Module``; its ``config.model_type`` names the GGUF tensors.
        modules: which linears: ``None`` for every linear but the output head, and every
            experts weight (what ``llama-imatrix`` collects by default), a regex searched in
            module and experts-weight names, a list of names or a ``{name: module}`` mapping
            (linears only).
        use_attention_mask: leave padded tokens out.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> with ImportanceMatrix(model) as imatrix, torch.no_grad():
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> int(imatrix.counts["model.layers.0.mlp.down_proj"])
        3
    """

    def __init__(
        self, model: nn.Module, modules: ModuleChoice = None, *, use_attention_mask: bool = True
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ImportanceMatrix needs a torch.nn.Module, got {type(model).__name__}")
        experts = _select_experts(model, modules)
        selected = _select_linears(model, modules, list_expert_linears(experts), bool(experts))
        self.architecture: str | None = getattr(getattr(model, "config", None), "model_type", None)
        self.in_sum2 = {
            name: torch.zeros(oriented_shape(m)[1], dtype=torch.float64)
            for name, m in selected.items()
        }
        self.counts = {name: torch.zeros((), dtype=torch.int64) for name in selected}
        for entry in experts:
            count = entry.experts.num_experts
            self.in_sum2[entry.name] = torch.zeros(count, entry.channels, dtype=torch.float64)
            self.counts[entry.name] = torch.zeros(count, dtype=torch.int64)
        self._masks = TokenMasks()
        self._hooks = HookSet()
        with self._hooks.registering():
            for name, module in selected.items():
                self._hooks.pre(module, self._fold_hook(name))
            hook_experts(experts, self._hooks, self._fold_expert, lambda: self._masks.current)
            if use_attention_mask:
                watched = [*selected.values(), *(e.experts.module for e in experts)]
                self._masks.attach(model, watched, self._hooks)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self.in_sum2)

    def _fold_hook(self, name: str):
        def fold(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._fold(name, args[0])

        return fold

    @torch.compiler.disable
    def _fold(self, name: str, x: torch.Tensor) -> None:
        sums, tokens = input_square_sums(x, self._masks.current)
        self.in_sum2[name] = self.in_sum2[name].to(sums.device) + sums
        self.counts[name] = self.counts[name].to(sums.device) + tokens

    @torch.compiler.disable
    def _fold_expert(self, name: str, expert: int, rows: torch.Tensor) -> None:
        sums, tokens = input_square_sums(rows)
        self.in_sum2[name] = self.in_sum2[name].to(sums.device)
        self.counts[name] = self.counts[name].to(sums.device)
        self.in_sum2[name][expert] += sums
        self.counts[name][expert] += tokens

    # -- combining -------------------------------------------------------------------------
    def merge(self, other: ImportanceMatrix | Mapping[str, torch.Tensor]) -> None:
        """Add another recording (or its :meth:`state_dict`) of the same modules into this one."""
        incoming = _split_state(
            other.state_dict() if isinstance(other, ImportanceMatrix) else other
        )
        self._check_same_modules(incoming, "merge")
        for name, (sums, count) in incoming.items():
            self._check_channels(name, sums, count)
        for name, (sums, count) in incoming.items():
            self.in_sum2[name] = self.in_sum2[name] + sums.to(
                self.in_sum2[name].device, torch.float64
            )
            self.counts[name] = self.counts[name] + count.to(self.counts[name].device, torch.int64)

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state over every rank of ``group`` (in place, one collective call).

        Every rank must hold the same modules; afterwards each holds the totals, as if one
        process had seen every rank's tokens. Counts travel as float64, exact up to 2**53.
        """
        import torch.distributed as dist

        names = self.module_names
        device = self.in_sum2[names[0]].device
        sums = [self.in_sum2[n].reshape(-1) for n in names]
        counts = [self.counts[n].to(device, torch.float64).reshape(-1) for n in names]
        flat = torch.cat(sums + counts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for name in names:
            size = self.in_sum2[name].numel()
            self.in_sum2[name] = flat[offset : offset + size].reshape(self.in_sum2[name].shape)
            offset += size
        for name in names:
            size, shape = self.counts[name].numel(), self.counts[name].shape
            self.counts[name] = flat[offset : offset + size].reshape(shape).round().to(torch.int64)
            offset += size

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.in_sum2": [C] float64, "<module>.counts": int64}`` (copies)."""
        state: dict[str, torch.Tensor] = {}
        for name in self.module_names:
            state[f"{name}.{_SUM2}"] = self.in_sum2[name].clone()
            state[f"{name}.{_COUNTS}"] = self.counts[name].clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with a :meth:`state_dict` of the same modules."""
        incoming = _split_state(state)
        self._check_same_modules(incoming, "load_state_dict")
        for name, (sums, count) in incoming.items():
            self._check_channels(name, sums, count)
        for name, (sums, count) in incoming.items():
            self.in_sum2[name] = sums.to(torch.float64).clone()
            self.counts[name] = count.to(torch.int64).clone()

    def reset(self) -> None:
        """Back to zero; the hooks stay."""
        for name in self.module_names:
            self.in_sum2[name] = torch.zeros_like(self.in_sum2[name])
            self.counts[name] = torch.zeros_like(self.counts[name])

    def _check_same_modules(self, incoming: Mapping[str, Any], action: str) -> None:
        if set(incoming) != set(self.module_names):
            missing = sorted(set(self.module_names) - set(incoming))
            unknown = sorted(set(incoming) - set(self.module_names))
            raise ValueError(
                f"{action}: the modules differ (missing {missing[:3]}, unknown {unknown[:3]})"
            )

    def _check_channels(self, name: str, sums: torch.Tensor, counts: torch.Tensor) -> None:
        if sums.shape != self.in_sum2[name].shape:
            raise ValueError(
                f"{name}: {tuple(sums.shape)} channel sums, expected {tuple(self.in_sum2[name].shape)}"
            )
        if counts.shape != self.counts[name].shape:
            raise ValueError(
                f"{name}: {tuple(counts.shape)} counts, expected {tuple(self.counts[name].shape)}"
            )

    # -- writing ---------------------------------------------------------------------------
    def gguf_names(self, architecture: str | None = None) -> dict[str, str]:
        """``{module: GGUF weight tensor name}``, e.g. ``blk.1.ffn_down.weight``."""
        arch = architecture or self.architecture
        if arch is None:
            raise ValueError("naming GGUF tensors needs the architecture: pass architecture=")
        return {name: gguf_tensor_name(name, arch) for name in self.module_names}

    def write_gguf(
        self,
        path: str | Path,
        *,
        architecture: str | None = None,
        datasets: Sequence[str] = (),
        chunk_size: int = CHUNK_SIZE,
    ) -> Path:
        """Write the matrix as ``llama-imatrix`` does, for ``llama-quantize --imatrix``.

        Args:
            path: the ``.gguf`` file to write.
            architecture: the transformers ``model_type`` (default: the model's own).
            datasets: names of the calibration texts, written as ``imatrix.datasets``
                (an empty list when none is given: the key is always written, as
                ``llama-quantize`` refuses a file without it).
            chunk_size: ``imatrix.chunk_size``; ``imatrix.chunk_count`` is the most tokens
                any weight (or expert) saw, divided by it and rounded to the nearest, as
                ``llama-imatrix`` counts its chunks.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        names = self.gguf_names(architecture)
        if self._most_tokens() == 0:
            raise ValueError("the importance matrix is empty: run the model on text first")
        return _write(Path(path), self._tensors(names), self._metadata(datasets, chunk_size))

    def _most_tokens(self) -> int:
        return max(int(c.max()) for c in self.counts.values())

    def _tensors(self, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for module in sorted(names, key=names.__getitem__):
            tensor = names[module]
            # numpy [matrices, C] is ggml's [C, matrices]: one row per expert (one if dense)
            sums = self.in_sum2[module]
            tensors[f"{tensor}.{_SUM2}"] = sums.float().reshape(-1, sums.shape[-1])
            tensors[f"{tensor}.{_COUNTS}"] = self.counts[module].float().reshape(-1, 1)
        return tensors

    def _metadata(self, datasets: Sequence[str], chunk_size: int) -> dict[str, Any]:
        return {
            "datasets": [str(d) for d in datasets],
            "chunk_count": chunks_of(self._most_tokens(), chunk_size),
            "chunk_size": chunk_size,
        }

    # -- lifetime --------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook, newest first. Safe to call twice."""
        self._hooks.remove()
        self._masks.clear()

    def __enter__(self) -> ImportanceMatrix:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def chunks_of(tokens: int, chunk_size: int) -> int:
    """Chunks ``tokens`` make, rounded to the nearest, as ``llama-imatrix`` counts them.

    Example:
        >>> chunks_of(767, 512), chunks_of(768, 512), chunks_of(255, 512)
        (1, 2, 0)
    """
    return (tokens + chunk_size // 2) // chunk_size


def _select_experts(model: nn.Module, modules: ModuleChoice) -> list[ExpertEntry]:
    """The experts weights to record: all of them by default, those a regex finds, or none."""
    if not (modules is None or isinstance(modules, str | re.Pattern)):
        return []
    pattern = re.compile(modules) if isinstance(modules, str) else modules
    entries = expert_entries(model)
    return [e for e in entries if pattern is None or pattern.search(e.name)]


def _select_linears(
    model: nn.Module, modules: ModuleChoice, inside_experts: set[str], has_experts: bool = False
) -> dict[str, nn.Module]:
    """The linears chosen; the list layout's per-expert linears are experts entries instead."""
    if isinstance(modules, Mapping):
        chosen = dict(modules)
    elif modules is None or isinstance(modules, str | re.Pattern):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        pattern = re.compile(modules) if isinstance(modules, str) else modules
        chosen = {
            name: m
            for name, m in model.named_modules()
            if _is_linear(m)
            and name not in inside_experts
            and (m is not head if pattern is None else bool(pattern.search(name)))
        }
    else:
        try:
            chosen = {name: model.get_submodule(name) for name in modules}
        except AttributeError as error:
            raise ValueError(f"ImportanceMatrix: {error}") from None
    not_linear = [name for name, m in chosen.items() if not _is_linear(m)]
    if not_linear:
        raise ValueError(f"ImportanceMatrix records linears only; not linear: {not_linear[:3]}")
    if not chosen and not has_experts:
        raise ValueError(f"ImportanceMatrix: no linear module chosen in {type(model).__name__}")
    return chosen


def _is_linear(module: nn.Module) -> bool:
    """A module that multiplies its input by a 2-D weight (an embedding looks its input up)."""
    return is_linear_like(module) and not isinstance(module, nn.Embedding)


def _split_state(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (in_sum2, counts)}`` from a flat :meth:`ImportanceMatrix.state_dict`."""
    names = [key[: -len(f".{_COUNTS}")] for key in state if key.endswith(f".{_COUNTS}")]
    missing = [f"{n}.{_SUM2}" for n in names if f"{n}.{_SUM2}" not in state]
    if missing or len(state) != 2 * len(names):
        raise ValueError(
            f"not an ImportanceMatrix state_dict: every '<module>.{_SUM2}' needs its "
            f"'<module>.{_COUNTS}' (missing {missing[:3]})"
        )
    return {n: (state[f"{n}.{_SUM2}"], state[f"{n}.{_COUNTS}"]) for n in names}


def _write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    import gguf

    writer = _imatrix_writer(path)
    writer.add_type("imatrix")
    writer.add_key_value(
        gguf.Keys.IMatrix.DATASETS,
        metadata["datasets"],
        gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.STRING,
    )
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, metadata["chunk_count"])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, metadata["chunk_size"])
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _imatrix_writer(path: Path) -> Any:
    """gguf's writer, writing no ``general.architecture`` (``llama-imatrix`` writes none) and
    able to write an empty ``imatrix.datasets`` array (gguf's writer refuses empty arrays)."""
    import gguf

    class ImatrixWriter(gguf.GGUFWriter):
        def add_architecture(self) -> None:
            pass

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype != gguf.GGUFValueType.ARRAY or len(val) or sub_type is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
            header = self._pack("I", vtype) if add_vtype else b""
            return header + self._pack("I", sub_type) + self._pack("Q", 0)

    return ImatrixWriter(path, "")
