"""Read and write single weight elements through the right API.

Every weight element in this library is one :class:`Coordinate`: ``(module, row, col)`` in
``[out, in]`` order, plus the expert inside a mixture-of-experts layer, where ``module``
is either a per-expert down-projection module (``...experts.3.down_proj``) or a fused
3-D parameter (``...experts.down_proj`` of shape ``[experts, out, in]``, as transformers
5 stores experts). Users may write a coordinate as a tuple, ``(module, row, col)`` or
``(module, expert, row, col)``, or pass a ``SuperWeight``: :meth:`Coordinate.of` is the
one place that turns any of these into a :class:`Coordinate`.

:class:`WeightElement` turns a coordinate into the stored parameter's own index (GPT-2's
``Conv1D`` is transposed), and reads and writes it whether the parameter is a plain
tensor, a sharded FSDP2 ``DTensor`` (each rank touches only the shard it holds) or an
accelerate-offloaded weight (the offload map is the source of truth).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import nn

from sw_hooks.core.locate import is_transposed

if TYPE_CHECKING:
    from sw_hooks.core.results import SuperWeight

CoordinateTuple: TypeAlias = tuple[str, int, int] | tuple[str, int, int, int]


@dataclass(frozen=True, eq=False)
class Coordinate:
    """One weight element: ``module.weight[row, col]`` in ``[out, in]`` order, in ``expert`` if set.

    A coordinate equals, hashes and unpacks like the tuple a user writes for it,
    ``(module, row, col)`` or, inside an expert, ``(module, expert, row, col)``, so a
    tuple finds a coordinate in a set or dict and the other way round.

    Example:
        >>> Coordinate.of(("model.layers.1.mlp.experts.down_proj", 3, 5, 7))
        Coordinate(module='model.layers.1.mlp.experts.down_proj', row=5, col=7, expert=3)
        >>> Coordinate("model.layers.1.mlp.down_proj", 5, 7) == ("model.layers.1.mlp.down_proj", 5, 7)
        True
    """

    module: str
    row: int
    col: int
    expert: int | None = None

    def __post_init__(self) -> None:
        shown = (self.module, self.row, self.col, self.expert)
        if not isinstance(self.module, str) or not self.module:
            raise TypeError(f"a coordinate's module must be a non-empty str, got {self.module!r}")
        if not _is_int(self.row) or not _is_int(self.col):
            raise TypeError(f"a coordinate's row and col must be ints, got {shown!r}")
        if self.expert is not None and not _is_int(self.expert):
            raise TypeError(f"a coordinate's expert must be an int or None, got {self.expert!r}")
        if min(self.row, self.col, self.expert or 0) < 0:
            where = "" if self.expert is None else f" of expert {self.expert}"
            raise ValueError(
                f"[{self.row}, {self.col}]{where} is outside every weight: indices count from 0"
            )

    @classmethod
    def of(cls, value: CoordinateLike) -> Coordinate:
        """The coordinate a user means: a tuple, a ``SuperWeight`` or a :class:`Coordinate`.

        Raises:
            TypeError: ``value`` is none of those, or a field has the wrong type.
            ValueError: a tuple of the wrong length, or a negative index.
        """
        if isinstance(value, Coordinate):
            return value
        if isinstance(value, tuple):
            return cls._of_tuple(value)
        carried = getattr(value, "coordinate", None)  # a SuperWeight carries its own
        if isinstance(carried, Coordinate):
            return carried
        raise TypeError(
            "expected a coordinate: (module, row, col), (module, expert, row, col), "
            f"a SuperWeight or a Coordinate, got {type(value).__name__}"
        )

    @classmethod
    def _of_tuple(cls, value: tuple[Any, ...]) -> Coordinate:
        if len(value) == 3:
            module, row, col = value
            return cls(module, row, col)
        if len(value) == 4:
            module, expert, row, col = value
            return cls(module, row, col, expert)
        raise ValueError(
            f"a weight coordinate is (module, row, col) or (module, expert, row, col), got {value!r}"
        )

    def as_tuple(self) -> CoordinateTuple:
        """``(module, row, col)``, or ``(module, expert, row, col)`` inside an expert."""
        if self.expert is None:
            return (self.module, self.row, self.col)
        return (self.module, self.expert, self.row, self.col)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Coordinate):
            return self.as_tuple() == other.as_tuple()
        if isinstance(other, tuple):
            return self.as_tuple() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.as_tuple())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.as_tuple())


CoordinateLike: TypeAlias = "Coordinate | CoordinateTuple | SuperWeight"
"""What users pass for one weight element: a :class:`Coordinate`, a tuple or a ``SuperWeight``."""


def coordinates_of(weights: Iterable[CoordinateLike] | CoordinateLike) -> list[Coordinate]:
    """One coordinate or an iterable of them, as a list of :class:`Coordinate` (all checked).

    Example:
        >>> coordinates_of(("model.layers.1.mlp.down_proj", 5, 7))
        [Coordinate(module='model.layers.1.mlp.down_proj', row=5, col=7, expert=None)]
    """
    if _is_one_coordinate(weights):
        return [Coordinate.of(weights)]
    if isinstance(weights, str | bytes) or not isinstance(weights, Iterable):
        raise TypeError(
            f"expected a coordinate or an iterable of coordinates, got {type(weights).__name__}"
        )
    return [Coordinate.of(weight) for weight in weights]


def _is_one_coordinate(value: object) -> bool:
    if isinstance(value, Coordinate) or isinstance(getattr(value, "coordinate", None), Coordinate):
        return True
    # A tuple of coordinates is many; a tuple starting with a module name is one.
    return isinstance(value, tuple) and len(value) in (3, 4) and isinstance(value[0], str)


def as_triple(coordinate: CoordinateLike) -> tuple[str, int, int]:
    """``(module, row, col)`` of :meth:`Coordinate.of`, the expert left out.

    For code that addresses 2-D weights by module name (a per-expert module names its
    own weight).
    """
    found = Coordinate.of(coordinate)
    return found.module, found.row, found.col


def _fields(coordinate: Coordinate) -> tuple[str, int, int, int | None]:
    return coordinate.module, coordinate.row, coordinate.col, coordinate.expert


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
