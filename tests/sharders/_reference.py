"""Hand-written comparisons with the unsharded module: the model, slices of a global batch, and
the checks. Only tests/sharders/test_managed_sharded.py still imports it (its managed-collision
modules are not an ``EmbeddingModel``); the other tests it served now use ``shardrec.testing``,
whose ``check_sharding`` takes hand-laid ``batches=`` and a ``dense_optimizer=`` and compares
plain tables' gradients. Delete this file when that last user moves.

A case trains a small model on each rank of a gloo group on that rank's samples; the reference
trains the same model, unsharded, on the concatenation of every rank's samples (the global batch).
Tables are given as ``(name, rows, dim, features)``. Test files import this module relatively
(``from ._reference import ...``); so do the pool's workers, which load each test module under its
own name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)
from shardrec.distributed import DistributedModelParallel

Table = tuple[str, int, int, list[str]]
Block = tuple[torch.Tensor, tuple[int, int]]
TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}


def ebc_configs(tables: Sequence[Table], pooling: str = "SUM") -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=n,
            num_embeddings=r,
            embedding_dim=d,
            feature_names=f,
            pooling=PoolingType(pooling),
        )
        for n, r, d, f in tables
    ]


def ec_configs(tables: Sequence[Table], dim: int | None = None) -> list[EmbeddingConfig]:
    """Every table at ``dim``, or at its own dim where ``dim`` is None."""
    return [
        EmbeddingConfig(
            name=n,
            num_embeddings=r,
            embedding_dim=d if dim is None else dim,
            feature_names=f,
        )
        for n, r, d, f in tables
    ]


class Model(nn.Module):
    """An embedding module under a linear head: ``forward`` gives the output rows and the loss.

    The rows are the EBC's pooled values ``[B, sum of dims]``, or the EC's values of every output
    name (sorted) one after another. ``squash`` puts a tanh between the rows and the head, so that
    the gradients depend on the rows looked up, not only on the head.
    """

    def __init__(self, emb: nn.Module, dense: nn.Linear, squash: bool = False) -> None:
        super().__init__()
        self.emb = emb
        self.dense = dense
        self.squash = squash

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.emb(kjt)
        if isinstance(out, dict):
            rows = torch.cat([out[k].values() for k in sorted(out)])
        else:
            rows = out.values()
        return rows, self.dense(torch.tanh(rows) if self.squash else rows).sum()


def build_model(
    kind: str,
    tables: Sequence[Table],
    *,
    seed: int,
    fused: dict[str, Any] | None,
    pooling: str = "SUM",
    weighted: bool = False,
    ec_dim: int = 4,
    squash: bool = False,
) -> Model:
    """An EBC of ``tables`` (``kind="ebc"``) or an EC with every table at ``ec_dim`` (``"ec"``),
    with ``fused`` as its fused_params (None: tables are plain parameters), under a linear head;
    the same numbers for the same ``seed``."""
    torch.manual_seed(seed)
    emb: nn.Module
    if kind == "ebc":
        emb = EmbeddingBagCollection(
            tables=ebc_configs(tables, pooling), is_weighted=weighted, fused_params=fused
        )
        width = sum(d * len(f) for _, _, d, f in tables)
    else:
        emb = EmbeddingCollection(tables=ec_configs(tables, ec_dim), fused_params=fused)
        width = ec_dim
    return Model(emb, nn.Linear(width, 1), squash=squash)


def _bounds(sizes: Sequence[int], rank: int | None) -> tuple[int, int]:
    lo = 0 if rank is None else sum(sizes[:rank])
    return lo, sum(sizes) if rank is None else lo + sizes[rank]


def rank_entries(
    lengths: torch.Tensor, per_key: Sequence[torch.Tensor], sizes: Sequence[int], rank: int | None
) -> torch.Tensor:
    """Rank ``rank``'s entries (all for None) of a global batch, key-major: ``per_key[k]`` holds
    feature ``k``'s ids (or weights, or their gradient) in sample order, ``lengths`` is
    ``[F, sum(sizes)]`` and ``sizes[r]`` rank ``r``'s number of samples."""
    lo, hi = _bounds(sizes, rank)
    parts = []
    for k, entries in enumerate(per_key):
        first = int(lengths[k, :lo].sum())
        parts.append(entries[first : first + int(lengths[k, lo:hi].sum())])
    return torch.cat(parts)


def rank_kjt(
    keys: list[str],
    lengths: torch.Tensor,
    ids: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None,
    sizes: Sequence[int],
    rank: int | None,
    *,
    weights_need_grad: bool = False,
) -> KeyedJaggedTensor:
    """Rank ``rank``'s KJT (the global batch for None), from the global batch's per-feature ids
    and per-id weights (``rank_entries``); ``weights`` None gives an unweighted KJT."""
    lo, hi = _bounds(sizes, rank)
    w = None
    if weights is not None:
        w = rank_entries(lengths, weights, sizes, rank).requires_grad_(weights_need_grad)
    return KeyedJaggedTensor(
        keys=keys,
        values=rank_entries(lengths, ids, sizes, rank),
        lengths=lengths[:, lo:hi].reshape(-1),
        weights=w,
    )


def rows_per_rank(
    kind: str,
    rows: torch.Tensor,
    full: KeyedJaggedTensor,
    sizes: Sequence[int],
    tables: Sequence[Table],
) -> list[torch.Tensor]:
    """The unsharded module's output ``rows`` for the global batch ``full``, split by rank.

    EBC: one row per sample. EC: one block per output name (sorted), each name's ids in sample
    order; a feature read by several tables is named ``feature@table``.
    """
    if kind == "ebc":
        return list(torch.split(rows, list(sizes)))
    readers = Counter(f for *_, fs in tables for f in fs)
    names = sorted(f"{f}@{t}" if readers[f] > 1 else f for t, _, _, fs in tables for f in fs)
    features = [n.split("@")[0] for n in names]
    lpk = dict(zip(full.keys(), full.length_per_key(), strict=True))
    by_name = torch.split(rows, [lpk[f] for f in features])
    per_rank = []
    for r in range(len(sizes)):
        lo, hi = _bounds(sizes, r)
        parts = []
        for f, block in zip(features, by_name, strict=True):
            lengths = full[f].lengths()
            first = int(lengths[:lo].sum())
            parts.append(block[first : first + int(lengths[lo:hi].sum())])
        per_rank.append(torch.cat(parts))
    return per_rank


def local_shards(dmp: DistributedModelParallel) -> dict[str, list[Block]]:
    """This rank's shards of the ``emb`` tables after training: ``(tensor, (row, col))`` each."""
    return {
        table: [(s.tensor.clone(), s.offsets) for s in ts.weight]
        for table, ts in dmp.local_table_shards()["emb"].items()
    }


def assemble(like: torch.Tensor, blocks: Iterable[Block]) -> torch.Tensor:
    """A tensor shaped like ``like`` from blocks at their ``(row, col)``; NaN where none lies."""
    out = torch.full_like(like, float("nan"))
    for tensor, (row, col) in blocks:
        out[row : row + tensor.shape[0], col : col + tensor.shape[1]] = tensor
    return out


def assert_outputs_match(
    results: Sequence[dict[str, Any]], expected: Sequence[Sequence[torch.Tensor]]
) -> None:
    """Rank ``r``'s output at step ``s`` is ``expected[s][r]``."""
    for step, per_rank in enumerate(expected):
        for r, result in enumerate(results):
            torch.testing.assert_close(
                result["outputs"][step], per_rank[r], **TOL, msg=f"output, rank {r}, step {step}"
            )


def assert_dense_grads_match(
    results: Sequence[dict[str, Any]], expected: Sequence[torch.Tensor]
) -> None:
    """Rank ``r``'s dense gradient at step ``s``, scaled from DDP's average back to the sum over
    ranks, is ``expected[s]`` (the reference's loss is the sum over every rank's samples)."""
    for step, grad in enumerate(expected):
        for r, result in enumerate(results):
            torch.testing.assert_close(
                result["dense_grads"][step], grad, **TOL, msg=f"dense grad, rank {r}, step {step}"
            )


def assert_tables_match(
    results: Sequence[dict[str, Any]], weights: dict[str, torch.Tensor]
) -> None:
    """The ranks' shards (``local_shards``) together are the reference's tables, every row."""
    for table, weight in weights.items():
        rebuilt = assemble(weight, [b for result in results for b in result["shards"][table]])
        torch.testing.assert_close(rebuilt, weight, **TOL, msg=f"table {table} after training")
