"""The typed vocabulary of sharding: sharding types, plans, the environment, the sharder protocol.

Everything here is plain data or a Protocol, so that the planner, the checkpoint code, the built-in
sharders and third-party plugins can all code against it without importing each other.

A plan maps, for every sharded submodule (by its fully qualified name in the model) and every table
of it, one :class:`ParameterSharding`::

    ShardingPlan
      "sparse_arch.ebc" -> {"t_user":    ParameterSharding(table_wise, fused, ranks=(1,)),
                            "t_product": ParameterSharding(row_wise,   fused, ranks=(0, 1))}

A shard is a rectangle of the table's ``(num_embeddings, embedding_dim)`` weight: its ``offsets``
(first row, first column) and ``sizes`` (rows, columns) in the global table, and its rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import TypeVar

from shardrec.distributed.group_ref import GroupRef
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

if TYPE_CHECKING:
    from shardrec.distributed.qcomm import QCommsConfig

__all__ = [
    "Awaitable",
    "EmbeddingComputeKernel",
    "EmbeddingModuleShardingPlan",
    "LocalShard",
    "ModuleSharder",
    "ParameterSharding",
    "ParameterStorage",
    "PipelinableModule",
    "ShardMetadata",
    "ShardRect",
    "ShardedEmbeddingModule",
    "ShardingEnv",
    "ShardingPlan",
    "ShardingType",
    "TableShards",
]


class ShardingType(StrEnum):
    """The built-in sharding types. Plugins may add their own: plans store the names as ``str``."""

    TABLE_WISE = "table_wise"
    """Each table lives whole on one rank."""
    ROW_WISE = "row_wise"
    """Each table is cut into contiguous blocks of rows, one block per rank."""
    COLUMN_WISE = "column_wise"
    """Each table is cut into blocks of columns (embedding dimensions), each block on one rank."""
    DATA_PARALLEL = "data_parallel"
    """Each table is replicated on every rank; gradients are all-reduced."""
    TABLE_ROW_WISE = "table_row_wise"
    """Each table lives on one node, cut into blocks of rows across that node's ranks."""
    TABLE_COLUMN_WISE = "table_column_wise"
    """Each table lives on one node, cut into blocks of columns across that node's ranks."""
    GRID_SHARD = "grid_shard"
    """Each table is cut into column blocks across nodes, each block into rows within its node."""


class EmbeddingComputeKernel(StrEnum):
    """How a shard is looked up locally. Plugins may add their own names (plans store ``str``)."""

    DENSE = "dense"
    """Plain autograd parameter with ``.grad``: data-parallel, trained by a torch optimizer."""
    FUSED = "fused"
    """Table-batched lookup with the optimizer fused into backward (no ``.grad``)."""


class ParameterStorage(StrEnum):
    """Where a shard's bytes live, as reported by :meth:`ModuleSharder.storage_usage`."""

    HBM = "hbm"
    """Accelerator memory."""
    DDR = "ddr"
    """Host memory."""


@dataclass(frozen=True, slots=True)
class ShardRect:
    """A rectangle of a table's ``[num_embeddings, embedding_dim]`` weight: rows
    ``[row_offset, row_offset + rows)`` by columns ``[col_offset, col_offset + cols)``::

                  col_offset   col_offset + cols
                       v           v
        row_offset  -> +-----------+
                       |   shard   |  rows
                       +-----------+
                           cols

    The one shape of a shard that the planner (its pieces), the sharders (what a rank holds) and
    the checkpoints (where a local tensor sits) all pass around; ``offsets`` and ``sizes`` give
    the ``(row, col)`` pairs that TorchRec's and torch's shard metadata use.
    """

    row_offset: int
    col_offset: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if min(self.row_offset, self.col_offset, self.rows, self.cols) < 0:
            raise ValueError(f"{self!r}: offsets and sizes must be >= 0")

    @classmethod
    def whole(cls, rows: int, cols: int) -> ShardRect:
        """The whole ``rows x cols`` table."""
        return cls(0, 0, rows, cols)

    @classmethod
    def of(cls, offsets: Sequence[int], sizes: Sequence[int]) -> ShardRect:
        """From ``(first row, first col)`` and ``(rows, cols)``."""
        if len(offsets) != 2 or len(sizes) != 2:
            raise ValueError(
                f"a shard rectangle needs 2-d offsets and sizes, got {offsets}, {sizes}"
            )
        return cls(int(offsets[0]), int(offsets[1]), int(sizes[0]), int(sizes[1]))

    @property
    def offsets(self) -> tuple[int, int]:
        return (self.row_offset, self.col_offset)

    @property
    def sizes(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def row_end(self) -> int:
        return self.row_offset + self.rows

    @property
    def col_end(self) -> int:
        return self.col_offset + self.cols

    def of_table(self, table: torch.Tensor) -> torch.Tensor:
        """This rectangle of ``table`` (a view): ``[R, C] -> [rows, cols]``; a 1-D per-row tensor
        ``[R] -> [rows]``."""
        rows = table[self.row_offset : self.row_end]
        return rows[:, self.col_offset : self.col_end] if table.dim() == 2 else rows

    def intersection(self, other: ShardRect) -> ShardRect | None:
        """The overlap of two rectangles of the same table (None when they do not overlap)."""
        r0, c0 = max(self.row_offset, other.row_offset), max(self.col_offset, other.col_offset)
        r1, c1 = min(self.row_end, other.row_end), min(self.col_end, other.col_end)
        if r1 <= r0 or c1 <= c0:
            return None
        return ShardRect(r0, c0, r1 - r0, c1 - c0)


@dataclass(frozen=True, slots=True)
class ShardMetadata:
    """A rectangle of a table on a rank: ``offsets`` = (first row, first col), ``sizes`` = (rows,
    cols), the fields of a serialised plan (TorchRec's names); :attr:`rect` is the same rectangle
    as a :class:`ShardRect`."""

    offsets: tuple[int, int]
    sizes: tuple[int, int]
    rank: int

    @classmethod
    def placed(cls, rect: ShardRect, rank: int) -> ShardMetadata:
        """``rect`` on ``rank``."""
        return cls(rect.offsets, rect.sizes, rank)

    @property
    def rect(self) -> ShardRect:
        return ShardRect.of(self.offsets, self.sizes)


@dataclass(frozen=True, kw_only=True, slots=True)
class ParameterSharding:
    """How one table is sharded.

    ``ranks`` lists the ranks that hold a shard, in shard order. ``shards`` gives each shard's
    rectangle. For data-parallel every rank holds a full replica: ``shards`` has one full-size
    rectangle per rank. ``qcomms``: the wire dtypes of the table's pooled outputs and their
    gradients (None: fp32); the tables of one module that share a sharding type must agree.
    """

    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    shards: tuple[ShardMetadata, ...] = ()
    qcomms: QCommsConfig | None = None

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ValueError(f"ParameterSharding({self.sharding_type!r}) needs at least one rank")
        if self.shards and tuple(s.rank for s in self.shards) != self.ranks:
            raise ValueError(
                f"ParameterSharding({self.sharding_type!r}): shard ranks "
                f"{[s.rank for s in self.shards]} differ from ranks {list(self.ranks)}"
            )


EmbeddingModuleShardingPlan = dict[str, ParameterSharding]
"""Table name -> how that table is sharded, for one module."""


@dataclass(slots=True)
class ShardingPlan:
    """Module FQN -> table name -> :class:`ParameterSharding`. ``str(plan)`` is a readable table."""

    plan: dict[str, EmbeddingModuleShardingPlan] = field(default_factory=dict)

    def get_plan_for_module(self, module_path: str) -> EmbeddingModuleShardingPlan | None:
        return self.plan.get(module_path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(module, table, sharding type, compute kernel, ranks) for every table, in plan order."""
        out: list[tuple[str, str, str, str, str]] = []
        for module_fqn, tables in self.plan.items():
            for table, ps in tables.items():
                ranks = ",".join(str(r) for r in ps.ranks)
                out.append(
                    (module_fqn or "<root>", table, str(ps.sharding_type), ps.compute_kernel, ranks)
                )
        return out

    def __str__(self) -> str:
        header = ("module", "table", "sharding type", "kernel", "ranks")
        rows = self.rows()
        if not rows:
            return "ShardingPlan (empty)"
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        head = "  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([head, rule, *lines])

    def __repr__(self) -> str:
        return f"ShardingPlan({self.plan!r})"


@dataclass(frozen=True, slots=True, init=False, repr=False)
class ShardingEnv:
    """Who we are in the sharding group: ``world_size``, ``rank`` and the process group ``pg``.

    ``pg=None`` means no collectives (planning, or a single process). The env refers to its group
    weakly (``shardrec.distributed.group_ref`` says why): ``torch.distributed`` owns it until
    ``destroy_process_group``, after which ``pg`` raises ``GroupDestroyedError`` rather than let a
    model that outlived its group keep the group's threads alive.
    """

    world_size: int
    rank: int
    _group: GroupRef | None

    def __init__(self, world_size: int, rank: int, pg: dist.ProcessGroup | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"ShardingEnv: world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardingEnv: rank {rank} outside [0, {world_size})")
        owner = f"ShardingEnv (rank {rank} of {world_size})"
        object.__setattr__(self, "world_size", world_size)
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "_group", None if pg is None else GroupRef.to(pg, owner))

    @property
    def pg(self) -> dist.ProcessGroup | None:
        return None if self._group is None else self._group()

    def __repr__(self) -> str:
        if self._group is None:
            group = "None"
        else:
            group = "<ProcessGroup>" if self._group.alive else "<destroyed ProcessGroup>"
        return f"ShardingEnv(world_size={self.world_size}, rank={self.rank}, pg={group})"

    @classmethod
    def from_process_group(cls, pg: dist.ProcessGroup | None = None) -> ShardingEnv:
        """The env of ``pg`` (default: the initialised default group)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ShardingEnv.from_process_group: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group(...) first, or use ShardingEnv.from_local"
            )
        group = pg if pg is not None else dist.group.WORLD
        assert group is not None
        return cls(world_size=dist.get_world_size(group), rank=dist.get_rank(group), pg=group)

    @classmethod
    def from_local(cls, world_size: int, rank: int) -> ShardingEnv:
        """An env with no process group: for planning, or for one process (``world_size == 1``)."""
        return cls(world_size=world_size, rank=rank, pg=None)


@dataclass(frozen=True, slots=True)
class LocalShard:
    """A tensor held by this rank and where it sits in the global tensor.

    ``tensor`` is a view of the live storage (writing into it in place changes the model),
    ``offsets`` its first index in every dimension of the global tensor, ``global_shape`` the shape
    of the whole (unsharded) tensor.
    """

    tensor: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TableShards:
    """This rank's part of one table: weight shards and fused-optimizer state shards.

    ``optimizer_state`` maps a state name (e.g. ``"momentum1"`` for Adagrad's sum of squares) to
    its shards; a row-wise state is 1-D (one value per row), an element-wise one has the weight's
    shape, a per-table scalar (Adam's ``step``) is 0-D with offsets ``()``: every shard of the table
    holds the same value. ``replicated`` is True for data-parallel tables: every rank holds the
    same full copy.
    """

    weight: list[LocalShard]
    optimizer_state: dict[str, list[LocalShard]] = field(default_factory=dict)
    replicated: bool = False


@runtime_checkable
class ShardedEmbeddingModule(Protocol):
    """What every sharded embedding module exposes for checkpoints and introspection."""

    def local_table_shards(self) -> dict[str, TableShards]:
        """Table name -> this rank's shards (weights, fused optimizer state)."""
        ...


T_co = TypeVar("T_co", covariant=True)
C = TypeVar("C")
# What a pipelined module's forward returns: the embeddings unless the module says otherwise.
Out_co = TypeVar("Out_co", covariant=True, default=KeyedTensor | dict[str, JaggedTensor])


@runtime_checkable
class Awaitable(Protocol[T_co]):
    """Communication in flight: ``advance()`` moves it on, ``wait()`` returns its result.

    An input distribution is often two dependent collectives (the split exchange, then the ids it
    sized): ``advance()`` waits for what must arrive before the next collective can be issued and
    issues it, without waiting for that one; a pipeline calls it between a batch's forward and
    backward so the ids travel during the backward. ``wait()`` finishes (calling ``advance()``
    itself when needed) and may raise: a bad batch raises here, on every rank alike. Both are
    collective in the sense that every rank calls them, in the same order.
    """

    def advance(self) -> None: ...

    def wait(self) -> T_co: ...


@runtime_checkable
class PipelinableModule(Protocol[C, Out_co]):
    """A sharded module whose forward splits into input distribution and the rest.

    ``forward(kjt)`` must equal ``compute_and_output_dist(input_dist(kjt).wait())``. A training
    pipeline (:class:`shardrec.distributed.train_pipeline.TrainPipelineSparseDist`) calls
    ``input_dist`` on the next batch's KJT while the current batch trains, and
    ``compute_and_output_dist`` in the next batch's forward. ``input_dist`` must not read or
    change the module's weights (the current batch's backward updates them in between); ``C``,
    the context, carries whatever ``compute_and_output_dist`` needs (the routed KJT, the ids
    received). A sharded module without these two methods still works: it is not pipelined.

    ``Out_co`` is what the forward returns, which the pipeline hands back from the forward
    untouched: by default the embeddings (``KeyedTensor`` or ``dict[str, JaggedTensor]``), as a
    sharded EBC / EC returns them; a sharded managed-collision module returns its forward's pair
    ``(embeddings, remapped KJT or None)``, so it is a
    ``PipelinableModule[RoutedFeatures, ManagedOutput]``.
    """

    def input_dist(self, kjt: KeyedJaggedTensor) -> Awaitable[C]: ...

    def compute_and_output_dist(self, ctx: C) -> Out_co: ...


# The module type a sharder shards; a bare ``ModuleSharder`` means ``ModuleSharder[nn.Module]``.
M = TypeVar("M", bound=nn.Module, default=nn.Module)


@runtime_checkable
class ModuleSharder(Protocol[M]):
    """What a plugin registers: something that shards one module type with some sharding types.

    Several sharders may serve one module type, each owning different sharding-type names; a module
    whose tables use several sharding types is sharded by each owning sharder for its own tables,
    and the host stitches the parts together. Generic in the module type, as TorchRec's is:
    ``ModuleSharder[EmbeddingBagCollection]``.

    ``shard`` receives only the tables in ``params`` (a subset of the module's tables) and returns a
    module whose ``forward(kjt)`` takes the unsharded module's input KJT (it picks its tables'
    features from it) and returns the unsharded module's output structure for those tables
    (``KeyedTensor`` for an ``EmbeddingBagCollection``, ``dict[str, JaggedTensor]`` for an
    ``EmbeddingCollection``) for the batch this rank passed in. It should implement
    :class:`ShardedEmbeddingModule`.
    """

    @property
    def module_type(self) -> type[M]:
        """The module class this sharder shards (exact type: subclasses need their own sharder)."""
        ...

    def sharding_types(self, compute_device_type: str) -> list[str]:
        """The sharding-type names implemented on ``compute_device_type`` ("cpu", "cuda", ...)."""
        ...

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        """The compute kernels offered for ``sharding_type`` on that device, preferred first."""
        ...

    def storage_usage(
        self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
    ) -> dict[str, int]:
        """Bytes ``tensor`` (a table or shard, maybe meta) takes, by :class:`ParameterStorage`."""
        ...

    def shard(
        self,
        module: M,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        """The sharded replacement of ``module`` for the tables in ``params``."""
        ...


def shard_ranks(shards: Sequence[ShardMetadata]) -> tuple[int, ...]:
    """The ranks of ``shards``, in order: the ``ranks`` field of a :class:`ParameterSharding`."""
    return tuple(s.rank for s in shards)


DEFAULT_COMPUTE_KERNEL: Final[str] = EmbeddingComputeKernel.FUSED
