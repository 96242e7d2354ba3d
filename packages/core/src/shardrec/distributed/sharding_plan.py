"""Helpers to write plans by hand, and to find what in a model can be sharded.

``table_wise(rank, rows, cols)``, ``row_wise(rows, cols, world_size)``,
``column_wise(rows, cols, ranks)`` and ``data_parallel(rows, cols, world_size)`` each return one
:class:`ParameterSharding` with its shard rectangles::

    plan = ShardingPlan({"sparse.ebc": {"t_user": table_wise(1, 1000, 64),
                                        "t_item": row_wise(10**6, 64, world_size=4)}})
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from shardrec.distributed.sharder_index import SharderIndex
from shardrec.distributed.types import (
    EmbeddingComputeKernel,
    ModuleSharder,
    ParameterSharding,
    ShardingType,
    ShardMetadata,
    shard_ranks,
)

__all__ = [
    "column_wise",
    "data_parallel",
    "even_splits",
    "row_wise",
    "shardable_modules",
    "table_shapes",
    "table_wise",
]

_FUSED = EmbeddingComputeKernel.FUSED.value


def even_splits(total: int, parts: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of ``parts`` nearly equal pieces; the first ``total % parts`` get one
    more."""
    base, extra = divmod(total, parts)
    out: list[tuple[int, int]] = []
    offset = 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((offset, size))
        offset += size
    return out


def table_wise(rank: int, rows: int, cols: int, *, kernel: str = _FUSED) -> ParameterSharding:
    shard = ShardMetadata((0, 0), (rows, cols), rank)
    return ParameterSharding(
        sharding_type=ShardingType.TABLE_WISE.value,
        compute_kernel=kernel,
        ranks=(rank,),
        shards=(shard,),
    )


def row_wise(rows: int, cols: int, world_size: int, *, kernel: str = _FUSED) -> ParameterSharding:
    """Blocks of rows differing by at most one, on ranks 0..world_size-1 (empty blocks dropped)."""
    shards = [
        ShardMetadata((at, 0), (n, cols), r)
        for r, (at, n) in enumerate(even_splits(rows, world_size))
        if n
    ]
    return ParameterSharding(
        sharding_type=ShardingType.ROW_WISE.value,
        compute_kernel=kernel,
        ranks=shard_ranks(shards),
        shards=tuple(shards),
    )


def column_wise(
    rows: int, cols: int, ranks: Sequence[int], *, kernel: str = _FUSED
) -> ParameterSharding:
    """One column slice per entry of ``ranks`` (widths differing by at most one)."""
    if not ranks or len(ranks) > cols:
        raise ValueError(f"column_wise: need 1..{cols} ranks for {cols} columns, got {list(ranks)}")
    shards = [
        ShardMetadata((0, at), (rows, n), r)
        for r, (at, n) in zip(ranks, even_splits(cols, len(ranks)), strict=True)
    ]
    return ParameterSharding(
        sharding_type=ShardingType.COLUMN_WISE.value,
        compute_kernel=kernel,
        ranks=shard_ranks(shards),
        shards=tuple(shards),
    )


def data_parallel(rows: int, cols: int, world_size: int) -> ParameterSharding:
    shards = tuple(ShardMetadata((0, 0), (rows, cols), r) for r in range(world_size))
    return ParameterSharding(
        sharding_type=ShardingType.DATA_PARALLEL.value,
        compute_kernel=EmbeddingComputeKernel.DENSE.value,
        ranks=shard_ranks(shards),
        shards=shards,
    )


def shardable_modules(
    module: nn.Module, sharders: Sequence[ModuleSharder]
) -> Iterator[tuple[str, nn.Module]]:
    """``(fqn, submodule)`` for every submodule (the root included) some sharder can shard.

    A shardable module's own children are not searched.
    """
    types = SharderIndex.of(sharders).module_types()

    def walk(prefix: str, m: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        if type(m) in types:
            yield prefix, m
            return
        for name, child in m.named_children():
            yield from walk(f"{prefix}.{name}" if prefix else name, child)

    yield from walk("", module)


def table_shapes(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Table name -> (rows, cols, bytes) of an embedding module (from its configs; meta is fine)."""
    # Imported here: the sharding package builds on this module (even_splits).
    from shardrec.distributed.sharding.contract import embedding_tables

    found = embedding_tables(module)
    if found is None:
        raise TypeError(f"{type(module).__name__} has no embedding configs")
    out: dict[str, tuple[int, int, int]] = {}
    for c in found[0]:
        size = torch.empty((), dtype=_dtype(c.data_type)).element_size()
        out[c.name] = (c.num_embeddings, c.embedding_dim, c.num_embeddings * c.embedding_dim * size)
    return out


def _dtype(data_type: object) -> torch.dtype:
    from shardrec.modules.configs import DataType, data_type_to_dtype

    return data_type_to_dtype(DataType(str(getattr(data_type, "value", data_type))))
