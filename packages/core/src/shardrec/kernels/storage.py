"""Storage backends: where a table's rows live and how its fused lookup-and-update runs.

A :class:`StorageBackend` is the second plugin hook (beside sharders): it stores a group of tables
and looks them up with the fused optimizer in backward, whatever the sharding type. The sharders
build one :class:`~shardrec.kernels.TableBatchedEmbedding` over each rank's shards; that lookup
asks each table's backend for the group that stores it. So a new storage (a file-backed table, a
hashed or a quantized one) is written once, not once per sharding type.

A table picks its backend with ``storage=StorageChoice("name", {"option": "value"})`` in its
``EmbeddingBagConfig`` / ``EmbeddingConfig`` (or its kernel :class:`TableSpec`); without one it
gets today's choice, the lookup's ``backend=`` (``torch``, ``fbgemm`` or ``auto``). The built-in
backends, ``torch`` and ``fbgemm``, are plugins registered through the same hook as a third
party's (``shardrec_register_storage_backends``).

A backend may also say which of a table's bytes it keeps in the rank's memory
(:class:`DeclaresStorageMemory`, answering a :class:`StorageMemory`); the planner counts only
those against a rank's HBM or DDR. A backend that says nothing keeps all of them there.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

import torch

from shardrec.kernels.group import LookupGroup
from shardrec.kernels.specs import FusedOptimizerConfig, StorageChoice, TableSpec

__all__ = [
    "IN_MEMORY",
    "DeclaresStorageMemory",
    "GroupRequest",
    "StorageBackend",
    "StorageChoice",
    "StorageMemory",
    "UnknownStorageBackendError",
    "storage_memory",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupRequest:
    """What a lookup asks a backend to store: tables that the backend's ``group_key`` put
    together, and how they are looked up.

    ``feature_tables[i]`` is the index in ``tables`` of the table that the group's i-th feature
    reads. ``pooled``: bags (``pooled()``) or one row per id (``sequence()``). ``optimizer``: the
    update fused into backward, or None for plain mode (the per-table parameters get ``.grad``).
    ``deferred_update``: backward keeps gradients for the lookup's ``apply_update`` instead of
    stepping (data-parallel replicas); only backends whose groups are
    :class:`~shardrec.kernels.TorchGroup` can. ``device`` may be meta (allocate nothing yet).
    ``options``: the tables' :attr:`StorageChoice.options` (empty for the default choice).
    """

    tables: tuple[TableSpec, ...]
    feature_tables: tuple[int, ...]
    pooled: bool
    is_weighted: bool
    optimizer: FusedOptimizerConfig | None
    device: torch.device
    deferred_update: bool = False
    options: Mapping[str, str] = field(default_factory=dict)

    def table_names(self) -> str:
        """``'t0', 't1'``: for error messages."""
        return ", ".join(repr(t.name) for t in self.tables)


@runtime_checkable
class StorageBackend(Protocol):
    """Stores tables and runs their fused lookup-and-update (a plugin implements this).

    The group it builds (a :class:`~shardrec.kernels.LookupGroup`) owns the storage and the
    optimizer state of its tables and gives:

    - forward: ``pooled(inp, params)`` / ``sequence(inp, params)``, whose autograd backward applies
      the fused optimizer to the rows the batch touched (or, in plain mode, returns the tables'
      gradients for ``params``);
    - state access: ``table_weights()`` and ``table_states()``, one ``[rows, dim]`` tensor per table
      (and per optimizer state) that ALIASES the storage. The lookup's ``state_dict``, its
      ``load_table_weights``/``load_optimizer_states`` and shardrec's checkpoints read and write
      row ranges of a table through these tensors (a checkpoint saved at one sharding and loaded
      at another copies the overlapping rows into them), so writes into them must reach the table;
    - ``move_to(device)`` (allocation from meta included) and ``set_optimizer`` (new
      hyper-parameters).
    """

    @property
    def name(self) -> str:
        """The name tables choose it by (``StorageChoice(name)``); unique among plugins."""
        ...

    def group_key(self, table: TableSpec, pooled: bool) -> Hashable:
        """Tables of one lookup with equal keys are stored together in one group."""
        ...

    def unsupported_reason(self, request: GroupRequest) -> str | None:
        """Why this backend cannot store and look up ``request`` (an unknown option, a device,
        an optimizer it lacks), or None when it can. The lookup raises it, naming the tables."""
        ...

    def build_group(self, request: GroupRequest) -> LookupGroup:
        """The group that stores ``request.tables`` on ``request.device`` (uninitialised: the
        lookup initialises or loads the weights and zeroes the optimizer state after)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageMemory:
    """Which of a table's bytes a backend keeps in the rank's memory (HBM or DDR, whichever the
    rank computes in), so the planner counts them against that rank's capacity.

    ``weights``: the rows; ``optimizer_state``: the fused optimizer's state. False: the backend
    keeps them elsewhere (a file, a remote store), and the planner counts none of them. The
    lookup's ids and outputs (and a replica's dense gradient) are always in memory.
    """

    weights: bool = True
    optimizer_state: bool = True


IN_MEMORY: Final = StorageMemory()
"""Everything in the rank's memory: the built-in backends, and any backend that declares nothing."""


@runtime_checkable
class DeclaresStorageMemory(Protocol):
    """The optional member of a :class:`StorageBackend` that tells the planner where its bytes
    live. Without it the planner counts all of a table's bytes (:data:`IN_MEMORY`)."""

    def memory(self, options: Mapping[str, str]) -> StorageMemory:
        """Which bytes of a table stored with ``options`` (its :attr:`StorageChoice.options`)
        count against the rank's memory. Called while planning, before anything is built."""
        ...


def storage_memory(backend: StorageBackend, options: Mapping[str, str]) -> StorageMemory:
    """What ``backend`` declares for a table stored with ``options`` (:data:`IN_MEMORY` when it
    declares nothing); a :class:`TypeError` naming the backend when its answer is not a
    :class:`StorageMemory`."""
    if not isinstance(backend, DeclaresStorageMemory):
        return IN_MEMORY
    declared = backend.memory(options)
    if not isinstance(declared, StorageMemory):
        raise TypeError(
            f"storage backend {backend.name!r} ({type(backend).__qualname__}).memory() returned"
            f" {declared!r}, not a shardrec.kernels.StorageMemory"
        )
    return declared


class UnknownStorageBackendError(ValueError):
    """A table names a storage backend that no loaded plugin registered."""

    def __init__(self, table: str, backend: str, available: Sequence[str]) -> None:
        self.table = table
        self.backend = backend
        self.available = tuple(available)
        super().__init__(
            f"table {table!r} asks for storage backend {backend!r}, which no plugin registered;"
            f" available: {', '.join(sorted(available)) or 'none'} (a plugin registers one with"
            " the shardrec_register_storage_backends hook; is its distribution installed, and not"
            " filtered out by $SHARDREC_PLUGINS / $SHARDREC_DISABLE_PLUGINS?)"
        )
