"""What a sharder reads from the unsharded module: its (table, feature) lookups in output order,
the configs of the planned tables, the fused optimizer, and the weights to copy into shards."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shardrec.kernels import FusedOptimizerConfig
from shardrec.modules import EmbeddingBagCollection, EmbeddingCollection, PoolingType
from shardrec.modules.configs import BaseEmbeddingConfig, EmbeddingBagConfig

__all__ = ["EmbeddingModule", "ModuleView", "TableFeature"]

EmbeddingModule = EmbeddingBagCollection | EmbeddingCollection
"""The module types the built-in sharders shard."""


@dataclass(frozen=True, slots=True)
class TableFeature:
    """One (table, feature) lookup of the unsharded module: its output key ``name`` (``feature``,
    or ``feature@table`` when several tables read the feature), the KJT key ``source`` it reads,
    the ``table`` and that table's ``dim``."""

    name: str
    source: str
    table: str
    dim: int


@dataclass(frozen=True, slots=True)
class ModuleView:
    """The unsharded module, restricted to the tables one sharder was planned for.

    ``pairs`` are in the module's output order; ``weights``/``states`` are the module's table
    weights and fused-optimizer states (None when the module is on the meta device: shards are
    then initialised by the configs' ``init_fn``). ``check_inputs`` is the module's setting:
    check every batch before distributing it. ``need_indices`` (EmbeddingCollection): output
    JaggedTensors carry the ids as weights.
    """

    pairs: list[TableFeature]
    configs: dict[str, BaseEmbeddingConfig]
    pooled: bool
    is_weighted: bool
    need_indices: bool
    optimizer: FusedOptimizerConfig | None
    weights: dict[str, torch.Tensor] | None
    states: dict[str, dict[str, torch.Tensor]] | None
    check_inputs: bool

    @staticmethod
    def of(module: nn.Module, tables: Sequence[str]) -> ModuleView:
        """The view of ``module`` (an EmbeddingBagCollection or EmbeddingCollection) for
        ``tables``; a table the module lacks is refused, naming the module's tables."""
        if not isinstance(module, EmbeddingBagCollection | EmbeddingCollection):
            raise TypeError(f"cannot shard {type(module).__name__}")
        configs: list[BaseEmbeddingConfig]
        if isinstance(module, EmbeddingBagCollection):
            pooled, is_weighted, need_indices = True, module.is_weighted(), False
            configs = list(module.embedding_bag_configs())
        else:
            pooled, is_weighted, need_indices = False, False, module.need_indices()
            configs = list(module.embedding_configs())
        known = {c.name for c in configs}
        missing = [t for t in tables if t not in known]
        if missing:
            raise ValueError(
                f"the plan names tables {missing} that the module lacks: {sorted(known)}"
            )
        wanted = set(tables)
        pairs: list[TableFeature] = []
        for config, names in zip(configs, module.embedding_names_by_table(), strict=True):
            if config.name in wanted:
                for feature, name in zip(config.feature_names, names, strict=True):
                    pairs.append(TableFeature(name, feature, config.name, config.embedding_dim))
        lookup = module.lookup
        on_meta = lookup.device.type == "meta"
        return ModuleView(
            pairs=pairs,
            configs={c.name: c for c in configs if c.name in wanted},
            pooled=pooled,
            is_weighted=is_weighted,
            need_indices=need_indices,
            optimizer=lookup.optimizer,
            weights=None if on_meta else lookup.table_weights(),
            states=None if on_meta else lookup.optimizer_states(),
            check_inputs=module.check_inputs,
        )

    def pooling(self, table: str) -> PoolingType:
        """The table's pooling (NONE for an EmbeddingCollection's)."""
        config = self.configs[table]
        if isinstance(config, EmbeddingBagConfig):
            return PoolingType(config.pooling)
        return PoolingType.NONE

    @property
    def names(self) -> list[str]:
        """The output keys, in order."""
        return [p.name for p in self.pairs]

    @property
    def dims(self) -> list[int]:
        """The output widths, in order."""
        return [p.dim for p in self.pairs]

    def global_shape(self, table: str) -> tuple[int, int]:
        """``(num_embeddings, embedding_dim)`` of ``table``."""
        config = self.configs[table]
        return (config.num_embeddings, config.embedding_dim)
