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

from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

import torch
from torch import nn

from shardrec.kernels import TableBatchedEmbedding
from shardrec.modules.configs import (
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    EmbeddingConfig,
    data_type_to_dtype,
)
from shardrec.modules.embedding_bag_collection import EmbeddingBagCollection
from shardrec.modules.embedding_collection import EmbeddingCollection
from shardrec.modules.managed_collision import ManagedTableStats
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

__all__ = [
    "ManagedCollisionEmbeddingBagCollection",
    "ManagedCollisionEmbeddingCollection",
    "fresh_rows",
    "reset_rows",
]

ModuleT = TypeVar("ModuleT", EmbeddingBagCollection, EmbeddingCollection)


def fresh_rows(
    configs: Sequence[BaseEmbeddingConfig],
    rows_by_table: Mapping[str, torch.Tensor | None],
    rng_state: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per table with rows to reset, a block ``[len(rows), embedding_dim]`` of fresh weights.

    Each block comes from its table's ``init_fn`` run under ``rng_state`` (a CPU generator state,
    advanced in place), tables in ``rows_by_table`` order; torch's global generator is left as it
    was. A sharded module draws the whole block and keeps the part its shards hold, so every rank
    draws what the unsharded module draws.
    """
    pending = {t: r for t, r in rows_by_table.items() if r is not None and r.numel() > 0}
    if not pending:
        return {}
    by_name = {c.name: c for c in configs}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state.cpu())
        for table, rows in pending.items():
            config = by_name[table]
            fresh = torch.empty(
                rows.numel(), config.embedding_dim, dtype=data_type_to_dtype(config.data_type)
            )
            _init_fn(config)(fresh)
            out[table] = fresh
        rng_state.copy_(torch.get_rng_state())
    return out


def reset_rows(
    embedding_module: EmbeddingBagCollection | EmbeddingCollection,
    rows_by_table: dict[str, torch.Tensor | None],
    rng_state: torch.Tensor,
) -> None:
    """Give ``rows_by_table[table]`` fresh weights (:func:`fresh_rows`) and zero optimizer
    state, in place."""
    fresh = fresh_rows(_configs(embedding_module), rows_by_table, rng_state)
    if not fresh:
        return
    lookup = embedding_module.lookup
    weights = lookup.table_weights()
    states = lookup.optimizer_states()
    with torch.no_grad():
        for table, block in fresh.items():
            rows = rows_by_table[table]
            assert rows is not None
            weight = weights[table]
            weight.index_copy_(0, rows.to(weight.device), block.to(weight.device, weight.dtype))
            for state in states[table].values():
                # A 0-d state (Adam's step) is shared by the tables stored together: kept.
                if state.dim() > 0:
                    state.index_fill_(0, rows.to(state.device), 0)


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
        self._seed = seed
        self.register_buffer("_reset_rng_state", self.initial_reset_rng_state())

    def _remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not isinstance(self._embedding_module, EmbeddingBagCollection | EmbeddingCollection):
            # DistributedModelParallel sharded the tables without this module (no sharder for
            # it was loaded): each rank would remap its own ids with its own map, and the
            # ranks' maps would drift apart while every step still ran.
            raise TypeError(
                f"{type(self).__name__}: its tables were replaced by a"
                f" {type(self._embedding_module).__name__} without it; shard a managed module"
                " whole (the 'managed_collision' entry point of shardrec-sharders, or a"
                " ManagedCollisionSharder in DistributedModelParallel's sharders)"
            )
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

    @property
    def return_remapped_features(self) -> bool:
        return self._return_remapped_features

    @property
    def reset_rng_state(self) -> torch.Tensor:
        """The state of the random stream that draws evicted rows' fresh weights (a buffer)."""
        return self._reset_rng_state

    def initial_reset_rng_state(self) -> torch.Tensor:
        """The reset stream's state at construction (from ``seed``, a new CPU tensor): what a
        sharder starts from when this module's state is on the meta device."""
        return torch.Generator().manual_seed(self._seed).get_state()

    def stats(self) -> dict[str, ManagedTableStats]:
        """Per table: capacity, occupancy, admitted, evicted, rejected, below threshold."""
        return self._managed_collision_collection.stats()

    def embedding_names(self) -> list[str]:
        """The embedding module's output names (what a planner and a sharder read)."""
        return list(self._embedding_module.embedding_names())


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

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The tables (the planner plans a managed module by these, as it plans the EBC)."""
        return list(self._embedding_module.embedding_bag_configs())

    @property
    def lookup(self) -> TableBatchedEmbedding:
        """The EBC's lookup (its fused optimizer tells a planner what state the tables carry)."""
        return self._embedding_module.lookup

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

    def embedding_configs(self) -> list[EmbeddingConfig]:
        """The tables (the planner plans a managed module by these, as it plans the EC)."""
        return list(self._embedding_module.embedding_configs())

    @property
    def lookup(self) -> TableBatchedEmbedding:
        """The EC's lookup (its fused optimizer tells a planner what state the tables carry)."""
        return self._embedding_module.lookup

    def forward(
        self, features: KeyedJaggedTensor
    ) -> tuple[dict[str, JaggedTensor], KeyedJaggedTensor | None]:
        remapped = self._remap(features)
        out = self._embedding_module(remapped)
        return out, remapped if self._return_remapped_features else None
