"""One weight's address: :class:`Coordinate`, and the one normaliser that makes it.

Every weight element in this library is one :class:`Coordinate`: ``(module, row, col)`` in
``[out, in]`` order, plus the expert inside a mixture-of-experts layer, where ``module``
is either a per-expert down-projection module (``...experts.3.down_proj``) or a fused
3-D parameter (``...experts.down_proj`` of shape ``[experts, out, in]``, as transformers
5 stores experts). Users may write a coordinate as a tuple, ``(module, row, col)`` or
``(module, expert, row, col)``, or pass a ``SuperWeight``: :meth:`Coordinate.of` is the
one place that turns any of these into a :class:`Coordinate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

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
