"""From a module's table configs to the kernel's features, and from an input KJT to kernel order.

:class:`FeatureRouter` is the one router of shardrec: the unsharded collections route their input
with it, and so does every sharded module (it is public as
``shardrec.distributed.sharding.FeatureRouter``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from shardrec.kernels import FeatureSpec, PoolingType, TableSpec
from shardrec.modules.configs import BaseEmbeddingConfig, EmbeddingBagConfig
from shardrec.sparse import KeyedJaggedTensor
from shardrec.sparse.variable_batch import pad_to_max_stride

__all__ = ["FeatureRouter", "KernelInput", "Routing"]


@dataclass(frozen=True, slots=True)
class KernelInput:
    """A KJT's tensors in the kernel's feature order (one entry per (table, feature) pair)."""

    values: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None
    length_per_feature: list[int]
    batch_size: int


class FeatureRouter:
    """Picks the keys a module reads out of an input KJT, in the module's lookup order.

    ``sources[i]`` is the KJT key that lookup ``i`` reads; a key read by two tables appears twice::

        input KJT keys   [f_a, f_b, f_c]
        sources          [f_c, f_a, f_a]       (f_a feeds two tables, f_b is not read here)
        route(kjt) keys  [f_c, f_a, f_a]       (F routed keys, same batch B, same ids)

    The permutation is worked out once per input key order and kept. ``owner`` names the module
    in errors; ``tables[i]`` (optional) names the table of lookup ``i`` in them. With
    ``known_keys`` every input key must be one of them (the unsharded collections refuse a key
    no table reads); without, other keys are ignored (a sharded part reads a subset).
    """

    def __init__(
        self,
        sources: Sequence[str],
        *,
        owner: str,
        tables: Sequence[str] | None = None,
        known_keys: Collection[str] | None = None,
    ) -> None:
        if tables is not None and len(tables) != len(sources):
            raise ValueError(f"{owner}: {len(sources)} sources but {len(tables)} tables")
        self.sources = list(sources)
        self.tables = None if tables is None else list(tables)
        self.owner = owner
        self.known_keys = None if known_keys is None else frozenset(known_keys)
        self._cache: dict[tuple[str, ...], list[int] | None] = {}

    def permutation(self, keys: Sequence[str]) -> list[int] | None:
        """Indices of the input ``keys`` in lookup order; None when ``keys`` already are."""
        key = tuple(keys)
        if key in self._cache:
            return self._cache[key]
        index = {k: i for i, k in enumerate(keys)}
        if self.known_keys is not None:
            unknown = [k for k in keys if k not in self.known_keys]
            if unknown:
                raise ValueError(
                    f"{self.owner}: KJT keys {unknown} are not read by any table"
                    f" (features served: {sorted(self.known_keys)})"
                )
        absent = [i for i, s in enumerate(self.sources) if s not in index]
        if absent:
            if self.tables is not None:
                i = absent[0]
                raise ValueError(
                    f"{self.owner}: feature {self.sources[i]!r} of table {self.tables[i]!r} is"
                    f" missing from the KJT (keys: {list(keys)})"
                )
            missing = list(dict.fromkeys(self.sources[i] for i in absent))
            raise ValueError(
                f"{self.owner}: features {missing} missing from the KJT (keys: {list(keys)})"
            )
        order = [index[s] for s in self.sources]
        result = None if order == list(range(len(keys))) else order
        self._cache[key] = result
        return result

    def check(self, kjt: KeyedJaggedTensor) -> list[int] | None:
        """Checks what the KJT's metadata says (its type) and returns :meth:`permutation` of its
        keys."""
        if not isinstance(kjt, KeyedJaggedTensor):
            raise TypeError(f"{self.owner}: expected a KeyedJaggedTensor, got {type(kjt).__name__}")
        return self.permutation(kjt.keys())

    def route(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``kjt`` with the keys this module reads, in lookup order (``kjt`` itself when it
        already is): ``(keys, B, L) -> (sources, B, L)``.

        A variable batch per key (``docs/vbe.md``) comes out as its unique samples, a plain batch
        of the largest key's size that carries the inverse indices (``pad_to_max_stride``): the
        module sends and pools only those, and its pooled output is expanded to the full batch
        at the end (``expand_pooled``)."""
        order = self.check(kjt)
        routed = kjt if order is None else kjt.permute(order)
        return pad_to_max_stride(routed)


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
        self.router = FeatureRouter(
            self.sources, owner=kind, tables=self.tables_of_pairs, known_keys=readers
        )

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
                    storage=config.storage,
                )
            )
        features = [
            FeatureSpec(name=name, table=table)
            for name, table in zip(self.embedding_names, self.tables_of_pairs, strict=True)
        ]
        return specs, features

    def check_keys(self, features: KeyedJaggedTensor, *, weighted: bool) -> list[int] | None:
        """Check what the KJT's metadata says (type, keys, weights); return the permutation
        that puts its keys in pair order (None: already in order)."""
        order = self.router.check(features)
        if weighted and features.weights_or_none() is None:
            raise ValueError(
                f"{self.kind} is weighted (is_weighted=True) but the KJT has no weights"
            )
        return order

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
