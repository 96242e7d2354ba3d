"""Sharders, indexed once by the module type and sharding type they own.

The plugin manager builds one :class:`SharderIndex` while plugins register (it refuses a second
owner of a sharding type there); ``DistributedModelParallel``, the planner and the default plan ask
that same index which sharder shards what, instead of each scanning the list again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final, overload

from torch import nn

from shardrec.distributed.types import ModuleSharder

__all__ = ["DEVICE_TYPES", "SharderIndex"]

DEVICE_TYPES: Final[tuple[str, ...]] = ("cpu", "cuda")
"""The compute device types the index is built for (others are answered by a scan)."""


class SharderIndex(Sequence[ModuleSharder]):
    """An immutable sequence of sharders (registration order) that knows, for a module type and
    a device type, which sharder owns each sharding-type name (the first registered wins)."""

    def __init__(self, sharders: Iterable[ModuleSharder] = ()) -> None:
        self._sharders: list[ModuleSharder] = []
        self._offered: dict[tuple[type, str], dict[str, ModuleSharder]] = {}
        for sharder in sharders:
            self._add(sharder)

    @classmethod
    def of(cls, sharders: Sequence[ModuleSharder]) -> SharderIndex:
        """``sharders`` itself when it is an index already (the plugin manager's), else one
        built from it."""
        return sharders if isinstance(sharders, SharderIndex) else cls(sharders)

    def _add(self, sharder: ModuleSharder) -> None:
        # Private: the plugin manager adds while loading, after its own checks; afterwards the
        # index does not change.
        self._sharders.append(sharder)
        for device_type in DEVICE_TYPES:
            offered = self._offered.setdefault((sharder.module_type, device_type), {})
            for name in sharder.sharding_types(device_type):
                offered.setdefault(str(name), sharder)

    # -- Sequence ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sharders)

    @overload
    def __getitem__(self, i: int) -> ModuleSharder: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[ModuleSharder]: ...

    def __getitem__(self, i: int | slice) -> ModuleSharder | Sequence[ModuleSharder]:
        if isinstance(i, slice):
            return list(self._sharders[i])
        return self._sharders[i]

    def __iter__(self) -> Iterator[ModuleSharder]:
        return iter(list(self._sharders))

    def __repr__(self) -> str:
        return f"SharderIndex({self._sharders!r})"

    # -- queries -------------------------------------------------------------------------------
    def module_types(self) -> frozenset[type[nn.Module]]:
        """Every module type some sharder shards."""
        return frozenset(s.module_type for s in self._sharders)

    def offered(self, module_type: type, device_type: str) -> Mapping[str, ModuleSharder]:
        """Sharding-type name -> the sharder that owns it for ``module_type`` on
        ``device_type`` (in registration order)."""
        found = self._offered.get((module_type, device_type))
        if found is not None or device_type in DEVICE_TYPES:
            return dict(found or {})
        out: dict[str, ModuleSharder] = {}
        for sharder in self._sharders:
            if sharder.module_type is module_type:
                for name in sharder.sharding_types(device_type):
                    out.setdefault(str(name), sharder)
        return out

    def sharder_for(
        self, module_type: type, sharding_type: str, device_type: str
    ) -> ModuleSharder | None:
        """The sharder that owns ``sharding_type`` for ``module_type``, or None."""
        return self.offered(module_type, device_type).get(str(sharding_type))
