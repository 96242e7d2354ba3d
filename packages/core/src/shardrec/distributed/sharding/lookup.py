"""Stage 2, the local lookup: one fused ``TableBatchedEmbedding`` over the pieces of tables this
rank holds, filled from the unsharded module, and typed calls of it on stacked input.

::

    StackedInput (F' keys x W*B_max bags, ids local to each piece)
        pooled:   lookup_pooled   -> [W*B_max, sum of the keys' piece widths]
        sequence: lookup_sequence -> per key, [ids of the key, piece width]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardrec.distributed.sharding.geometry import LocalTable
from shardrec.distributed.sharding.input_dist import StackedInput
from shardrec.distributed.sharding.module_view import ModuleView
from shardrec.kernels import FeatureSpec, FusedOptimizerConfig, TableBatchedEmbedding, TableSpec
from shardrec.modules import PoolingType

__all__ = ["build_local_lookup", "lookup_pooled", "lookup_sequence"]


def build_local_lookup(
    view: ModuleView,
    local_tables: Sequence[LocalTable],
    features: Sequence[tuple[str, str]],
    *,
    pooling_sum: bool,
    device: torch.device,
    optimizer: FusedOptimizerConfig | None,
    check_inputs: bool = True,
    deferred_update: bool = False,
) -> TableBatchedEmbedding | None:
    """The fused kernel over this rank's pieces, filled from the unsharded module.

    ``features`` are (kernel feature name, local table name), in the order the stacked input
    lists its keys. Returns None when the rank holds nothing. Each piece's weights (and every
    fused-optimizer state of the table: row-wise states by rows, element-wise ones by the whole
    rectangle, per-table scalars as they are) are copied from ``view``; on meta the pieces are
    initialised by their tables' ``init_fn``. ``pooling_sum`` forces SUM pooling (a row-split
    table pools partial sums; MEAN is applied after they are added up). ``check_inputs``: whether
    the kernel checks the (piece-local) ids it gets; a sharded module that checks the user's
    batch with a :class:`~shardrec.distributed.sharding.BatchGuard` before distributing it
    passes False. ``deferred_update``: backward leaves the gradients to the caller, which
    applies the fused optimizer later (a data-parallel replica, after summing them over ranks).
    """
    if not local_tables:
        return None
    specs = []
    for lt in local_tables:
        config = view.configs[lt.table]
        pooling = view.pooling(lt.table)
        if pooling is PoolingType.MEAN and pooling_sum:
            pooling = PoolingType.SUM
        specs.append(
            TableSpec(
                name=lt.name,
                num_embeddings=lt.rect.rows,
                embedding_dim=lt.rect.cols,
                pooling=pooling,
                data_type=config.data_type,
                storage=config.storage,
            )
        )
    tbe = TableBatchedEmbedding(
        tables=specs,
        features=[FeatureSpec(name=n, table=t) for n, t in features],
        pooled=view.pooled,
        is_weighted=view.is_weighted,
        optimizer=optimizer,
        device=device,
        check_inputs=check_inputs,
        deferred_update=deferred_update,
    )
    if view.weights is None:
        init = {}
        for lt in local_tables:
            fn = view.configs[lt.table].init_fn
            if fn is not None:
                init[lt.name] = fn
        tbe.reset_parameters(init_fns=init, device=device)
        return tbe
    tbe.load_table_weights(
        {lt.name: lt.rect.of_table(view.weights[lt.table]) for lt in local_tables}
    )
    if view.states is not None:
        tbe.load_optimizer_states(_piece_states(view.states, local_tables, tbe))
    return tbe


def _piece_states(
    states: dict[str, dict[str, torch.Tensor]],
    local_tables: Sequence[LocalTable],
    tbe: TableBatchedEmbedding,
) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    local_views = tbe.optimizer_states()
    for lt in local_tables:
        for name, src in states.get(lt.table, {}).items():
            target = local_views.get(lt.name, {}).get(name)
            if target is None:
                # A lookup without that state (a data-parallel table, trained by the dense
                # optimizer) keeps none of the fused optimizer's.
                continue
            if src.dim() == 0:
                # A per-table scalar (Adam's step): the same on every piece of the table.
                if target.dim() == 0:
                    out.setdefault(lt.name, {})[name] = src
                continue
            piece = (
                lt.rect.of_table(src)
                if target.dim() == 2
                else src[lt.rect.row_offset : lt.rect.row_end]
            )
            if tuple(piece.shape) == tuple(target.shape):
                out.setdefault(lt.name, {})[name] = piece
    return out


def lookup_pooled(tbe: TableBatchedEmbedding, stacked: StackedInput) -> torch.Tensor:
    """Pooled lookup of stacked input: ``(F', W*B_max, L) -> [W*B_max, sum of widths]``."""
    out = tbe.lookup(
        values=stacked.values,
        offsets=stacked.offsets,
        length_per_feature=stacked.length_per_feature,
        batch_size=stacked.bags_per_key,
        weights=stacked.weights,
    )
    if not isinstance(out, torch.Tensor):
        raise TypeError("lookup_pooled needs a pooled TableBatchedEmbedding (pooled=True)")
    return out


def lookup_sequence(tbe: TableBatchedEmbedding, stacked: StackedInput) -> list[torch.Tensor]:
    """Sequence lookup of stacked input: per key ``f``, ``[ids of f, width of f's piece]``."""
    out = tbe.lookup(
        values=stacked.values,
        offsets=stacked.offsets,
        length_per_feature=stacked.length_per_feature,
        batch_size=stacked.bags_per_key,
        weights=stacked.weights,
    )
    if isinstance(out, torch.Tensor):
        raise TypeError("lookup_sequence needs a sequence TableBatchedEmbedding (pooled=False)")
    return out
