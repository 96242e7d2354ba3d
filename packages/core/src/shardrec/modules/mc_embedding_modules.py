"""Embedding modules behind a :class:`ManagedCollisionCollection` (TorchRec's names).

``ManagedCollisionEmbeddingBagCollection(ebc, mcc)`` and ``ManagedCollisionEmbeddingCollection
(ec, mcc)``: ``forward(KJT of raw ids)`` remaps the ids (training: admission, eviction), resets the
rows evicted by that remapping, then looks the rows up::

    raw ids ──mcc──▶ rows ──reset evicted rows──▶ EBC / EC lookup ──▶ (embeddings, remapped KJT?)

A reset row gets fresh weights from its table's ``init_fn`` (the config's, uniform by default)
and zero fused-optimizer state (Adagrad sums, Adam moments). The fresh weights are drawn from a
random stream of this module (seeded by ``seed``, its state a buffer), not from torch's global
generator, so a run resumed from a checkpoint draws the same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import nn

from shardrec.modules.configs import BaseEmbeddingConfig
from shardrec.modules.embedding_bag_collection import EmbeddingBagCollection
from shardrec.modules.embedding_collection import EmbeddingCollection
from shardrec.modules.managed_collision import ManagedTableStats
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

__all__ = [
    "ManagedCollisionEmbeddingBagCollection",
    "ManagedCollisionEmbeddingCollection",
    "reset_rows",
]

ModuleT = TypeVar("ModuleT", EmbeddingBagCollection, EmbeddingCollection)


def reset_rows(
    embedding_module: EmbeddingBagCollection | EmbeddingCollection,
    rows_by_table: dict[str, torch.Tensor | None],
    rng_state: torch.Tensor,
) -> None:
    """Give ``rows_by_table[table]`` fresh weights and zero optimizer state, in place.

    Weights come from each table's ``init_fn`` run under ``rng_state`` (a CPU generator state,
    advanced in place); torch's global generator is left as it was.
    """
    pending = {t: r for t, r in rows_by_table.items() if r is not None and r.numel() > 0}
    if not pending:
        return
    configs = {c.name: c for c in _configs(embedding_module)}
    lookup = embedding_module.lookup
    weights = lookup.table_weights()
    states = lookup.optimizer_states()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state.cpu())
        for table, rows in pending.items():
            weight = weights[table]
            fresh = torch.empty(rows.numel(), weight.shape[1], dtype=weight.dtype)
            _init_fn(configs[table])(fresh)
            weight.index_copy_(0, rows.to(weight.device), fresh.to(weight.device))
            for state in states[table].values():
                # A 0-d state (Adam's step) is shared by the tables stored together: kept.
                if state.dim() > 0:
                    state.index_fill_(0, rows.to(state.device), 0)
        rng_state.copy_(torch.get_rng_state())


def _configs(
    module: EmbeddingBagCollection | EmbeddingCollection,
) -> list[BaseEmbeddingConfig]:
    if isinstance(module, EmbeddingBagCollection):
        return list(module.embedding_bag_configs())
    return list(module.embedding_configs())


def _init_fn(config: BaseEmbeddingConfig) -> Callable[[torch.Tensor], object]:
    if config.init_fn is not None:
        return config.init_fn
    bound = (1.0 / config.num_embeddings) ** 0.5
    return lambda t: t.uniform_(-bound, bound)


class _ManagedCollisionEmbeddings(nn.Module, Generic[ModuleT]):
    """The shared part: checks, remap, reset, stats."""

    _reset_rng_state: torch.Tensor
    _embedding_module: ModuleT
    _managed_collision_collection: ManagedCollisionCollection

    def __init__(
        self,
        embedding_module: ModuleT,
        managed_collision_collection: ManagedCollisionCollection,
        return_remapped_features: bool,
        seed: int,
        kind: str,
    ) -> None:
        super().__init__()
        if not isinstance(managed_collision_collection, ManagedCollisionCollection):
            raise TypeError(
                f"{kind}: managed_collision_collection must be a ManagedCollisionCollection, got"
                f" {type(managed_collision_collection).__name__}"
            )
        tables = {c.name: c.num_embeddings for c in _configs(embedding_module)}
        managed = {
            c.name: c.num_embeddings for c in managed_collision_collection.embedding_configs()
        }
        if tables != managed:
            raise ValueError(
                f"{kind}: the embedding module's tables {tables} (name: rows) differ from the"
                f" managed collision collection's {managed}"
            )
        self._embedding_module = embedding_module
        self._managed_collision_collection = managed_collision_collection
        self._return_remapped_features = return_remapped_features
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("_reset_rng_state", generator.get_state())

    def _remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        remapped: KeyedJaggedTensor = self._managed_collision_collection(features)
        reset_rows(
            self._embedding_module,
            self._managed_collision_collection.evict(),
            self._reset_rng_state,
        )
        return remapped

    @property
    def embedding_module(self) -> ModuleT:
        return self._embedding_module

    @property
    def managed_collision_collection(self) -> ManagedCollisionCollection:
        return self._managed_collision_collection

    def stats(self) -> dict[str, ManagedTableStats]:
        """Per table: capacity, occupancy, admitted, evicted, rejected, below threshold."""
        return self._managed_collision_collection.stats()


class ManagedCollisionEmbeddingBagCollection(_ManagedCollisionEmbeddings[EmbeddingBagCollection]):
    """An :class:`EmbeddingBagCollection` fed through a :class:`ManagedCollisionCollection`.

    ``forward(KJT of raw ids) -> (KeyedTensor, remapped KJT or None)`` (TorchRec's pair; the KJT
    only with ``return_remapped_features=True``). ``seed`` seeds the fresh weights of evicted rows.
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        managed_collision_collection: ManagedCollisionCollection,
        return_remapped_features: bool = False,
        *,
        seed: int = 0,
    ) -> None:
        if not isinstance(embedding_bag_collection, EmbeddingBagCollection):
            raise TypeError(
                "ManagedCollisionEmbeddingBagCollection needs an EmbeddingBagCollection, got"
                f" {type(embedding_bag_collection).__name__}"
            )
        super().__init__(
            embedding_bag_collection,
            managed_collision_collection,
            return_remapped_features,
            seed,
            kind="ManagedCollisionEmbeddingBagCollection",
        )

    def forward(self, features: KeyedJaggedTensor) -> tuple[KeyedTensor, KeyedJaggedTensor | None]:
        remapped = self._remap(features)
        pooled = self._embedding_module(remapped)
        return pooled, remapped if self._return_remapped_features else None


class ManagedCollisionEmbeddingCollection(_ManagedCollisionEmbeddings[EmbeddingCollection]):
    """An :class:`EmbeddingCollection` fed through a :class:`ManagedCollisionCollection`.

    ``forward(KJT of raw ids) -> (dict[str, JaggedTensor], remapped KJT or None)``.
    """

    def __init__(
        self,
        embedding_collection: EmbeddingCollection,
        managed_collision_collection: ManagedCollisionCollection,
        return_remapped_features: bool = False,
        *,
        seed: int = 0,
    ) -> None:
        if not isinstance(embedding_collection, EmbeddingCollection):
            raise TypeError(
                "ManagedCollisionEmbeddingCollection needs an EmbeddingCollection, got"
                f" {type(embedding_collection).__name__}"
            )
        super().__init__(
            embedding_collection,
            managed_collision_collection,
            return_remapped_features,
            seed,
            kind="ManagedCollisionEmbeddingCollection",
        )

    def forward(
        self, features: KeyedJaggedTensor
    ) -> tuple[dict[str, JaggedTensor], KeyedJaggedTensor | None]:
        remapped = self._remap(features)
        out = self._embedding_module(remapped)
        return out, remapped if self._return_remapped_features else None
