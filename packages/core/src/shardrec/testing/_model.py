"""The model a check trains: an embedding collection under a small dense head.

``EmbeddingModel(tables, fused_params=..., weighted=..., max_lengths=...)`` describes it (and how
long its batches' bags are) as plain data, so it travels to the workers; ``build(seed)`` makes the
same numbers for the same seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardrec.modules import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
)
from shardrec.sparse import KeyedJaggedTensor

__all__ = ["EMBEDDING_FQN", "EmbeddingModel", "HeadModel"]

EMBEDDING_FQN = "emb"
"""Where the embedding module sits in :class:`HeadModel` (the module path of its plans)."""


class HeadModel(nn.Module):
    """``emb`` under a linear head: ``forward(kjt)`` returns ``(rows, loss)``.

    ``rows`` are the EBC's pooled values ``[B, sum of dims]``, or the EC's values of every output
    name (sorted) one after another. The loss is ``dense(tanh(rows)).sum()``: a sum over samples,
    so that the sharded ranks' losses add up to the reference's, and curved, so that gradients
    depend on the rows looked up.
    """

    def __init__(self, emb: nn.Module, dense: nn.Linear) -> None:
        super().__init__()
        self.emb = emb
        self.dense = dense

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.emb(kjt)
        if isinstance(out, dict):
            rows = torch.cat([out[k].values() for k in sorted(out)])
        else:
            rows = out.values()
        return rows, self.dense(torch.tanh(rows)).sum()


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbeddingModel:
    """An EmbeddingBagCollection (``EmbeddingBagConfig`` tables) or an EmbeddingCollection
    (``EmbeddingConfig`` tables, one dim), with ``fused_params`` (None: plain parameters).

    ``max_lengths``: feature -> most ids in one of its bags in the check's batches (each bag's
    length is drawn from 0 to it); a feature not named gets up to 3. Multi-hot shapes (MLPerf's
    pooling factors run to 100) are checked by naming large ones.
    """

    tables: Sequence[EmbeddingBagConfig] | Sequence[EmbeddingConfig]
    fused_params: Mapping[str, Any] | None = field(
        default_factory=lambda: {"optimizer": "sgd", "learning_rate": 0.05}
    )
    weighted: bool = False
    max_lengths: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("EmbeddingModel needs at least one table")
        features = {f for t in self.tables for f in t.feature_names}
        for name, most in self.max_lengths.items():
            if name not in features:
                raise ValueError(
                    f"EmbeddingModel: max_lengths names {name!r}, which no table reads"
                    f" (features: {sorted(features)})"
                )
            if most < 0:
                raise ValueError(f"EmbeddingModel: max_lengths[{name!r}] is {most}, below 0")
        bags = [isinstance(t, EmbeddingBagConfig) for t in self.tables]
        if any(bags) and not all(bags):
            raise ValueError("EmbeddingModel: tables mix EmbeddingBagConfig and EmbeddingConfig")
        if not self.pooled and self.weighted:
            raise ValueError("EmbeddingModel: weighted inputs need EmbeddingBagConfig tables")
        if not self.pooled and len({t.embedding_dim for t in self.tables}) != 1:
            raise ValueError("EmbeddingModel: an EmbeddingCollection's tables share one dim")

    @property
    def pooled(self) -> bool:
        """An EmbeddingBagCollection (True) or an EmbeddingCollection."""
        return isinstance(self.tables[0], EmbeddingBagConfig)

    @property
    def feature_rows(self) -> dict[str, int]:
        """Each feature and the fewest rows of the tables that read it (its ids stay below)."""
        out: dict[str, int] = {}
        for t in self.tables:
            for f in t.feature_names:
                out[f] = min(out.get(f, t.num_embeddings), t.num_embeddings)
        return out

    @property
    def width(self) -> int:
        if self.pooled:
            return sum(t.embedding_dim * len(t.feature_names) for t in self.tables)
        return self.tables[0].embedding_dim

    def build(self, seed: int) -> HeadModel:
        torch.manual_seed(seed)
        fused = dict(self.fused_params) if self.fused_params is not None else None
        emb: nn.Module
        if self.pooled:
            bags = [t for t in self.tables if isinstance(t, EmbeddingBagConfig)]
            emb = EmbeddingBagCollection(tables=bags, is_weighted=self.weighted, fused_params=fused)
        else:
            seqs = [t for t in self.tables if isinstance(t, EmbeddingConfig)]
            emb = EmbeddingCollection(tables=seqs, fused_params=fused)
        return HeadModel(emb, nn.Linear(self.width, 1))

    def output_names(self) -> list[str]:
        """An EmbeddingCollection's output names, sorted: ``feature``, or ``feature@table`` for
        a feature read by several tables."""
        readers = Counter(f for t in self.tables for f in t.feature_names)
        return sorted(
            f"{f}@{t.name}" if readers[f] > 1 else f for t in self.tables for f in t.feature_names
        )
