"""Read and write single weight elements through the right API.

A weight's address is a :class:`~sw_hooks.core.coordinate.Coordinate` (re-exported here).
:class:`WeightElement` turns a coordinate into the stored parameter's own index (GPT-2's
``Conv1D`` is transposed; fused experts are 3-D), and reads and writes it whether the
parameter is a plain tensor, a sharded FSDP2 ``DTensor`` (each rank touches only the shard
it holds) or an accelerate-offloaded weight (the offload map is the source of truth).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sw_hooks.core.coordinate import (  # noqa: F401  (re-exported: the address type)
    Coordinate,
    CoordinateLike,
    CoordinateTuple,
    _fields,
    as_triple,
    coordinates_of,
)
from sw_hooks.core.locate import is_transposed


def oriented_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear-like module, whatever its storage order."""
    rows, cols = module.weight.shape
    return (cols, rows) if is_transposed(module) else (rows, cols)


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` view (no copy), for reading.

    For an accelerate-offloaded module this is the offloaded tensor behind the meta
    placeholder (write through :class:`WeightElement`, which knows how edits persist).
    """
    weight = _real_weight(module)
    return weight.t() if is_transposed(module) else weight


@dataclass(frozen=True)
class WeightElement:
    """One element of one module's weight, addressed in ``[out, in]`` order.

    ``expert`` is set for a weight inside a mixture-of-experts layer. With a fused 3-D
    parameter, ``module`` is the experts module and ``parameter_name`` names the parameter
    (``down_proj``); the element is ``parameter[expert, row, col]`` (``[expert, col, row]``
    when the experts module says ``is_transposed``).
    """

    module_name: str
    module: nn.Module
    row: int
    col: int
    expert: int | None = None
    parameter_name: str = "weight"

    @classmethod
    def resolve(cls, model: nn.Module, coordinate: CoordinateLike) -> WeightElement:
        """Look the coordinate up in ``model``; raise a clear error if it is not there."""
        name, row, col, expert = _fields(Coordinate.of(coordinate))
        if expert is not None:
            return _resolve_expert(cls, model, name, expert, row, col)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"no module named {name!r} in {type(model).__name__}") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"module {name!r} has no 2-D weight to address")
        out_features, in_features = oriented_shape(module)
        if not (0 <= row < out_features and 0 <= col < in_features):
            raise ValueError(
                f"[{row}, {col}] is outside {name}.weight, whose [out, in] shape is "
                f"[{out_features}, {in_features}]"
            )
        return cls(name, module, row, col)

    @property
    def coordinate(self) -> Coordinate:
        """The :class:`Coordinate` this element was resolved from (full module name)."""
        return Coordinate(self.module_name, self.row, self.col, self.expert)

    @property
    def parameter(self) -> torch.Tensor:
        """The stored parameter holding this element (``module.weight`` for dense weights)."""
        return getattr(self.module, self.parameter_name)

    @property
    def is_fused_expert(self) -> bool:
        """True for an element of a fused ``[experts, out, in]`` parameter."""
        return self.parameter_name != "weight"

    @property
    def storage_index(self) -> tuple[int, ...]:
        """The index into the stored parameter (transposed for ``Conv1D``)."""
        if self.is_fused_expert:
            transposed = getattr(self.module, "is_transposed", False) is True
            pair = (self.col, self.row) if transposed else (self.row, self.col)
            return (self.expert, *pair)
        return (self.col, self.row) if is_transposed(self.module) else (self.row, self.col)

    def matrix(self) -> torch.Tensor:
        """The ``[out, in]`` matrix holding this element (one expert's for fused experts), for
        reading: a view, no copy."""
        if self.is_fused_expert:
            expert = _fused_parameter(self)[self.expert]
            transposed = getattr(self.module, "is_transposed", False) is True
            return expert.t() if transposed else expert
        return oriented_weight(self.module)

    def read(self) -> torch.Tensor | None:
        """A 0-d copy of the element in its own dtype; ``None`` on a rank that does not hold it."""
        with torch.no_grad():
            target = self._target()
            if target is None:
                return None
            tensor, index = target
            return tensor[index].detach().clone()

    def read_float(self) -> float:
        """The element as a Python float (gathers a sharded weight: call it on every rank)."""
        weight = _fused_parameter(self) if self.is_fused_expert else _real_weight(self.module)
        if _is_dtensor(weight):
            return float(weight.full_tensor().detach()[self.storage_index])
        return float(weight.detach()[self.storage_index])

    def write(self, value: torch.Tensor | None) -> None:
        """Write a value (bit-exact when it came from :meth:`read`); no-op off-shard."""
        if value is None:
            return
        with torch.no_grad():
            target = self._target(for_writing=True)
            if target is None:
                return
            tensor, index = target
            tensor[index] = value.to(device=tensor.device, dtype=tensor.dtype)

    def _target(self, for_writing: bool = False) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        if not self.is_fused_expert:
            return _local_target(self.module, self.storage_index, for_writing=for_writing)
        parameter = _fused_parameter(self)
        if _is_dtensor(parameter):
            return _local_shard_target(parameter, self.storage_index)
        return parameter.data, self.storage_index


def _fused_parameter(element: WeightElement) -> torch.Tensor:
    parameter = element.parameter
    if parameter.device.type == "meta":
        raise ValueError(
            f"{element.module_name} is on the meta device; offloaded fused experts are not "
            "supported: load the model with real weights"
        )
    return parameter


def _resolve_expert(
    cls: type[WeightElement], model: nn.Module, name: str, expert: int, row: int, col: int
) -> WeightElement:
    """An expert's weight: a per-expert module (``experts.3.down_proj``) or a fused 3-D parameter."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is not None:
        # A per-expert module: the index after its experts list must be the same expert.
        in_path = expert_index_in_path(model, name)
        if in_path != expert:
            held = "no expert" if in_path is None else f"expert {in_path}"
            raise ValueError(f"module {name!r} belongs to {held}, not expert {expert}")
        element = cls.resolve(model, Coordinate(name, row, col))
        return cls(name, element.module, row, col, expert)
    parent_name, _, parameter_name = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise ValueError(f"no module or parameter {name!r} in {type(model).__name__}") from None
    parameter = getattr(parent, parameter_name, None)
    if not isinstance(parameter, torch.Tensor) or parameter.dim() != 3:
        raise ValueError(f"{name!r} is not a fused [experts, out, in] parameter")
    experts, rows, cols = parameter.shape
    if getattr(parent, "is_transposed", False) is True:
        rows, cols = cols, rows
    if not 0 <= expert < experts:
        raise ValueError(f"expert {expert} is outside {name}, which holds {experts} experts")
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(
            f"[{row}, {col}] is outside {name}[{expert}], whose [out, in] shape is [{rows}, {cols}]"
        )
    return cls(name, parent, row, col, expert, parameter_name)


def expert_index_in_path(model: nn.Module, name: str) -> int | None:
    """The expert a per-expert module belongs to: the index right after its experts list.

    Read from the module tree, not from the digits in the name, so a layer index that
    happens to equal another expert's index is never mistaken for it.

    Example:
        >>> from sw_hooks.testing import planted_moe, to_expert_list
        >>> model = to_expert_list(planted_moe("mixtral").model)
        >>> expert_index_in_path(model, "model.layers.1.mlp.experts.3.down_proj")
        3
    """
    parts = name.split(".")
    found = None
    for depth in range(1, len(parts)):
        container = model.get_submodule(".".join(parts[:depth]))
        if isinstance(container, nn.ModuleList) and parts[depth - 1].endswith("experts"):
            found = int(parts[depth]) if parts[depth].isdigit() else None
    return found


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def _offload_map(module: nn.Module) -> Mapping[str, torch.Tensor] | None:
    """The weights map of the module's accelerate offload hook (inside a ``SequentialHook`` too)."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or (hook,):
        weights_map = getattr(candidate, "weights_map", None)
        if weights_map is not None:
            return weights_map
    return None


def _offloaded_weight(module: nn.Module, *, for_writing: bool = False) -> torch.Tensor | None:
    """The real weight behind an accelerate offload hook, when the parameter is a meta placeholder."""
    if module.weight.device.type != "meta":
        return None
    weights_map = _offload_map(module)
    if weights_map is None:
        raise ValueError(
            "this weight is on the meta device and no offload hook holds its values; "
            "load the model with real weights"
        )
    return _writable_entry(weights_map, "weight") if for_writing else weights_map["weight"]


def _writable_entry(weights_map: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """The offloaded tensor whose edits the offload hook sees on its next forward.

    CPU-offloaded weights live in an in-memory state dict: that tensor itself is returned.
    Disk-offloaded weights (a safetensors checkpoint or ``.dat`` memory maps) are read
    afresh on every access, so an edit to what one read returned would be lost, and the
    files may be the user's own checkpoint. Such a weight is copied once into the loader's
    in-memory state dict, which takes priority over the disk on every later read: from the
    first write on, that one matrix lives in CPU memory. Files on disk are never written.
    """
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):  # PrefixedDataset
        key, weights_map = f"{weights_map.prefix}{key}", weights_map.dataset
    if isinstance(weights_map, dict):
        return weights_map[key]
    in_memory = getattr(weights_map, "state_dict", None)
    if isinstance(in_memory, dict):
        if key not in in_memory:
            in_memory[key] = weights_map[key].clone()
        return in_memory[key]
    tensor = weights_map[key]
    if weights_map[key] is not tensor:
        raise ValueError(
            f"cannot write offloaded weight {key!r}: its {type(weights_map).__name__} "
            "returns a new copy on every read, so a write would be lost"
        )
    return tensor


def _real_weight(module: nn.Module, *, for_writing: bool = False) -> torch.Tensor:
    offloaded = _offloaded_weight(module, for_writing=for_writing)
    return offloaded if offloaded is not None else module.weight


def _local_target(
    module: nn.Module, index: tuple[int, int], *, for_writing: bool = False
) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The local tensor holding ``index`` and the index into it, or ``None`` off-shard."""
    weight = _real_weight(module, for_writing=for_writing)
    if not _is_dtensor(weight):
        return weight.data, index
    return _local_shard_target(weight, index)


def _local_shard_target(
    weight: torch.Tensor, index: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    from torch.distributed.tensor import Shard

    local = weight.to_local()
    placements = weight.placements
    if all(not isinstance(p, Shard) for p in placements):
        return local.data, index
    if len(placements) != 1 or not isinstance(placements[0], Shard):
        raise ValueError("only weights sharded along one dimension of a 1-D mesh are supported")
    dim = placements[0].dim
    mesh = weight.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    # torch.chunk semantics: every shard has ceil(n / world) rows but the last ones.
    chunk = -(-weight.shape[dim] // world)
    start = rank * chunk
    position = index[dim]
    if not (start <= position < start + local.shape[dim]):
        return None
    local_index = list(index)
    local_index[dim] = position - start
    return local.data, tuple(local_index)
