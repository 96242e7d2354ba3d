"""From a module's table configs to the kernel's features, and from an input KJT to kernel order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardrec.kernels import FeatureSpec, PoolingType, TableSpec
from shardrec.modules.configs import BaseEmbeddingConfig, EmbeddingBagConfig
from shardrec.sparse import KeyedJaggedTensor

__all__ = ["KernelInput", "Routing"]


@dataclass(frozen=True, slots=True)
class KernelInput:
    """A KJT's tensors in the kernel's feature order (one entry per (table, feature) pair)."""

    values: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None
    length_per_feature: list[int]
    batch_size: int


class Routing:
    """Which KJT key feeds which table, and the output name of each (table, feature) pair.

    Output names follow TorchRec: the feature name, or ``feature@table`` when several tables read
    the same feature. Pairs are ordered table by table, features in each table's order.
    """

    def __init__(self, tables: Sequence[BaseEmbeddingConfig], *, kind: str) -> None:
        if not tables:
            raise ValueError(f"{kind} needs at least one table")
        names: set[str] = set()
        readers: dict[str, list[str]] = {}
        for config in tables:
            if not isinstance(config, BaseEmbeddingConfig):
                raise TypeError(f"{kind} tables must be embedding configs, got {config!r}")
            if not config.name:
                raise ValueError(f"{kind}: every table needs a name, got {config!r}")
            if config.name in names:
                raise ValueError(f"{kind}: duplicate table name {config.name!r}")
            names.add(config.name)
            if not config.feature_names:
                raise ValueError(f"{kind}: table {config.name!r} has no feature_names")
            if len(set(config.feature_names)) != len(config.feature_names):
                raise ValueError(
                    f"{kind}: table {config.name!r} lists a feature twice: {config.feature_names}"
                )
            for feature in config.feature_names:
                readers.setdefault(feature, []).append(config.name)
        self.kind = kind
        self.readers = readers
        self.sources: list[str] = []  # KJT key feeding each pair
        self.tables_of_pairs: list[str] = []
        self.embedding_names: list[str] = []
        self.names_by_table: list[list[str]] = []
        for config in tables:
            per_table: list[str] = []
            for feature in config.feature_names:
                shared = len(readers[feature]) > 1
                name = f"{feature}@{config.name}" if shared else feature
                self.sources.append(feature)
                self.tables_of_pairs.append(config.name)
                self.embedding_names.append(name)
                per_table.append(name)
            self.names_by_table.append(per_table)
        self._cache: dict[tuple[str, ...], list[int] | None] = {}

    def kernel_specs(
        self, tables: Sequence[BaseEmbeddingConfig], *, pooled: bool
    ) -> tuple[list[TableSpec], list[FeatureSpec]]:
        specs = []
        for config in tables:
            if pooled:
                assert isinstance(config, EmbeddingBagConfig)
                if config.pooling is PoolingType.NONE:
                    raise ValueError(
                        f"{self.kind}: table {config.name!r} has pooling NONE; use an"
                        " EmbeddingCollection for unpooled lookups"
                    )
                pooling: PoolingType = config.pooling
            else:
                pooling = PoolingType.NONE
            specs.append(
                TableSpec(
                    name=config.name,
                    num_embeddings=config.num_embeddings,
                    embedding_dim=config.embedding_dim,
                    pooling=pooling,
                    data_type=config.data_type,
                )
            )
        features = [
            FeatureSpec(name=name, table=table)
            for name, table in zip(self.embedding_names, self.tables_of_pairs, strict=True)
        ]
        return specs, features

    def _permutation(self, keys: list[str]) -> list[int] | None:
        """Indices of KJT keys in pair order; None when the KJT is already in pair order."""
        key = tuple(keys)
        if key in self._cache:
            return self._cache[key]
        index = {k: i for i, k in enumerate(keys)}
        unknown = [k for k in keys if k not in self.readers]
        if unknown:
            raise ValueError(
                f"{self.kind}: KJT keys {unknown} are not read by any table"
                f" (features served: {sorted(self.readers)})"
            )
        for source, table in zip(self.sources, self.tables_of_pairs, strict=True):
            if source not in index:
                raise ValueError(
                    f"{self.kind}: feature {source!r} of table {table!r} is missing from the KJT"
                    f" (keys: {keys})"
                )
        order = [index[s] for s in self.sources]
        result = None if order == list(range(len(keys))) else order
        self._cache[key] = result
        return result

    def check_keys(self, features: KeyedJaggedTensor, *, weighted: bool) -> list[int] | None:
        """Check what the KJT's metadata says (type, keys, weights); return the permutation
        that puts its keys in pair order (None: already in order)."""
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(
                f"{self.kind}.forward expects a KeyedJaggedTensor, got {type(features).__name__}"
            )
        if features.variable_stride_per_key():
            raise ValueError(f"{self.kind}: variable batch size per feature is not supported")
        if weighted and features.weights_or_none() is None:
            raise ValueError(
                f"{self.kind} is weighted (is_weighted=True) but the KJT has no weights"
            )
        return self._permutation(features.keys())

    def route(self, features: KeyedJaggedTensor, *, weighted: bool) -> KernelInput:
        order = self.check_keys(features, weighted=weighted)
        if features.device().type == "meta" and features.length_per_key_or_none() is None:
            raise ValueError(
                f"{self.kind}: the KJT is on the meta device and has no length_per_key; a meta"
                " batch has no lengths to count ids from, so give them"
                " (KeyedJaggedTensor(..., length_per_key=[...])) to get the output shapes"
            )
        if order is not None:
            features = features.permute(order)
        return KernelInput(
            values=features.values(),
            offsets=features.offsets(),
            lengths=features.lengths(),
            weights=features.weights_or_none() if weighted else None,
            length_per_feature=features.length_per_key(),
            batch_size=features.stride(),
        )
