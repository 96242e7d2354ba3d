"""The typed contract between shardrec and a sharder: what a sharder, a sharded module and the
unsharded module it came from declare, each as a Protocol (no base class needed).

A sharded module runs three stages per batch; each is one method, and a pipeline may run the
first for batch ``n + 1`` while batch ``n`` trains::

    input_dist(kjt) -> Awaitable[C]          ids to the ranks owning their rows  (F, B, L)
    compute_and_output_dist(ctx: C) -> Out   local lookup, then each sender's rows back to it
        Out: what the forward returns; the embeddings by default,
             KeyedTensor (B, D) | dict[str, JaggedTensor] (B, L, D);
             a managed-collision module's (embeddings, remapped KJT or None)

The pipeline protocol itself is :class:`~shardrec.distributed.types.PipelinableModule` and its
communication handle :class:`~shardrec.distributed.types.Awaitable`; the protocols here add what
DistributedModelParallel, the planner and the checkpoints ask of modules and sharders, so that
none of them reads an undeclared attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import nn
from typing_extensions import TypeVar

from shardrec.distributed.types import (
    Awaitable,
    ModuleSharder,
    Out_co,
    PipelinableModule,
    ShardedEmbeddingModule,
)
from shardrec.kernels import TableBatchedEmbedding
from shardrec.modules.configs import BaseEmbeddingConfig

if TYPE_CHECKING:
    from shardrec.distributed.planner.layouts import ShardLayout

__all__ = [
    "AsyncOutputModule",
    "Awaitable",
    "HasFusedLookup",
    "HasPlannerLayout",
    "ModuleSharder",
    "NamedEmbeddingOutputs",
    "PipelinableModule",
    "PooledEmbeddingTables",
    "ReplicatedModule",
    "SequenceEmbeddingTables",
    "ShardedEmbeddingModule",
    "ShardedModule",
    "TableKeyPrefixed",
    "UnshardedTypeAware",
    "embedding_tables",
]

C = TypeVar("C")
C_contra = TypeVar("C_contra", contravariant=True)


# -- what a sharded module declares --------------------------------------------------------------


@runtime_checkable
class TableKeyPrefixed(Protocol):
    """A sharded module that says where the unsharded module kept its tables in the state dict:
    ``"embedding_bags"`` (EmbeddingBagCollection) or ``"embeddings"`` (EmbeddingCollection), so
    table ``t`` of the sharded module at ``path`` is ``<path>.<prefix>.t.weight``."""

    @property
    def table_key_prefix(self) -> str: ...


@runtime_checkable
class UnshardedTypeAware(Protocol):
    """A sharded module that names the module class it replaces (the checkpoints derive the
    :class:`TableKeyPrefixed` prefix from it when the module does not give one)."""

    @property
    def unsharded_module_type(self) -> type[nn.Module]: ...


@runtime_checkable
class ReplicatedModule(Protocol):
    """A sharded module (or a submodule of one) whose parameters are a plain replica on every
    rank, trained like dense layers: ``replicated`` True makes DistributedModelParallel hand them
    to DistributedDataParallel (a data-parallel table without a fused optimizer)."""

    @property
    def replicated(self) -> bool: ...


@runtime_checkable
class ShardedModule(PipelinableModule[C], ShardedEmbeddingModule, TableKeyPrefixed, Protocol[C]):
    """Everything a built-in sharded module offers, and what a plugin's should: the pipeline
    split (:class:`PipelinableModule`), its shards for checkpoints
    (:class:`ShardedEmbeddingModule`), its state-dict prefix (:class:`TableKeyPrefixed`), and the
    unsharded module's ``check_inputs`` switch (set it alike on every rank)."""

    check_inputs: bool


@runtime_checkable
class AsyncOutputModule(Protocol[C_contra, Out_co]):
    """A sharded module whose output distribution can be left in flight: the lookup runs and
    its rows are sent, and ``wait()`` gives what ``compute_and_output_dist(ctx)`` returns. A
    module split between several sharders starts every part's output distribution before it
    waits for any, so one part computes while another's rows travel.

    ``Out_co`` is that output, as in :class:`PipelinableModule`: the embeddings by default; a
    sharded managed-collision module's is its pair ``(embeddings, remapped KJT or None)``."""

    def compute_and_start_output_dist(self, ctx: C_contra) -> Awaitable[Out_co]: ...


# -- what the unsharded module declares ----------------------------------------------------------


@runtime_checkable
class PooledEmbeddingTables(Protocol):
    """A pooled embedding module's tables (TorchRec's accessor of an EmbeddingBagCollection)."""

    def embedding_bag_configs(self) -> Sequence[BaseEmbeddingConfig]: ...


@runtime_checkable
class SequenceEmbeddingTables(Protocol):
    """A sequence embedding module's tables (TorchRec's accessor of an EmbeddingCollection)."""

    def embedding_configs(self) -> Sequence[BaseEmbeddingConfig]: ...


@runtime_checkable
class NamedEmbeddingOutputs(Protocol):
    """A module whose output keys are known before a batch: DistributedModelParallel puts the
    outputs of a module split between several sharders back in this order."""

    def embedding_names(self) -> list[str]: ...


@runtime_checkable
class HasFusedLookup(Protocol):
    """A module whose tables live in one fused ``TableBatchedEmbedding`` (its optimizer is the
    one the planner budgets state for)."""

    @property
    def lookup(self) -> TableBatchedEmbedding: ...


def embedding_tables(module: object) -> tuple[list[BaseEmbeddingConfig], bool] | None:
    """The table configs of ``module`` and whether it pools (True: ``embedding_bag_configs``,
    False: ``embedding_configs``); None when it declares neither."""
    if isinstance(module, PooledEmbeddingTables):
        return list(module.embedding_bag_configs()), True
    if isinstance(module, SequenceEmbeddingTables):
        return list(module.embedding_configs()), False
    return None


# -- what a sharder may declare --------------------------------------------------------------------


@runtime_checkable
class HasPlannerLayout(Protocol):
    """A sharder that tells the planner how its own sharding types cut a table (None: it has no
    layout for ``sharding_type``, and the planner prices one whole-table shard)."""

    def planner_layout(self, sharding_type: str) -> ShardLayout | None: ...
