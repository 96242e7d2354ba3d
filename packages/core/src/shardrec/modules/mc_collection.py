"""``ManagedCollisionCollection``: one managed-id module per table, applied to a KJT's raw ids.

::

    tables    t0 (features f0, f1)   t1 (feature f2)
    input     KJT f0: [[9137702141], [42]]  f1: [[42, 7]]  f2: [[-5]]   raw int64 ids
    output    KJT f0: [[0], [1]]            f1: [[1, 2]]    f2: [[0]]    rows of t0 / t1

The features of one table share its module, so an id means the same row in all of them. Lengths,
weights and the batch size pass through unchanged; keys no table reads pass through as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from shardrec.modules.configs import BaseEmbeddingConfig
from shardrec.modules.managed_collision import ManagedTableStats, MCHManagedCollisionModule
from shardrec.sparse import KeyedJaggedTensor

__all__ = ["ManagedCollisionCollection", "managed_table_stats"]


class ManagedCollisionCollection(nn.Module):
    """Remaps each table's features with that table's :class:`MCHManagedCollisionModule`.

    ``managed_collision_modules[table]`` must exist for every config, with ``output_size()``
    equal to the table's ``num_embeddings``; a feature may be read by one managed table only.
    ``forward(KJT) -> KJT`` (rows instead of raw ids).
    """

    _managed_collision_modules: nn.ModuleDict

    def __init__(
        self,
        managed_collision_modules: Mapping[str, MCHManagedCollisionModule],
        embedding_configs: Sequence[BaseEmbeddingConfig],
    ) -> None:
        super().__init__()
        configs = list(embedding_configs)
        names = [c.name for c in configs]
        extra = sorted(set(managed_collision_modules) - set(names))
        if extra:
            raise ValueError(
                f"ManagedCollisionCollection: modules for tables {extra} that no embedding config"
                f" names (tables: {names})"
            )
        owner: dict[str, str] = {}
        for config in configs:
            module = managed_collision_modules.get(config.name)
            if module is None:
                raise ValueError(
                    f"ManagedCollisionCollection: table {config.name!r} has no managed collision"
                    " module"
                )
            if not isinstance(module, MCHManagedCollisionModule):
                raise TypeError(
                    f"ManagedCollisionCollection: the module of table {config.name!r} must be an"
                    f" MCHManagedCollisionModule, got {type(module).__name__}"
                )
            if module.output_size() != config.num_embeddings:
                raise ValueError(
                    f"ManagedCollisionCollection: table {config.name!r} has num_embeddings"
                    f" {config.num_embeddings} but its module maps into {module.output_size()}"
                    " rows (zch_size must equal num_embeddings)"
                )
            for feature in config.feature_names:
                if feature in owner:
                    raise ValueError(
                        f"ManagedCollisionCollection: feature {feature!r} is read by tables"
                        f" {owner[feature]!r} and {config.name!r}; each managed table maps ids its"
                        " own way, so a feature can feed one managed table only"
                    )
                owner[feature] = config.name
        self._embedding_configs = configs
        self._managed_collision_modules = nn.ModuleDict(
            {c.name: managed_collision_modules[c.name] for c in configs}
        )
        self._table_features = {c.name: list(c.feature_names) for c in configs}

    def embedding_configs(self) -> list[BaseEmbeddingConfig]:
        return list(self._embedding_configs)

    def modules_by_table(self) -> dict[str, MCHManagedCollisionModule]:
        out: dict[str, MCHManagedCollisionModule] = {}
        for name, module in self._managed_collision_modules.items():
            assert isinstance(module, MCHManagedCollisionModule)
            out[name] = module
        return out

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        ids = self.table_ids(features)
        modules = self.modules_by_table()
        return self.with_rows(features, {t: modules[t](v) for t, v in ids.items()})

    def table_ids(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Per table, the raw ids of all its features (int64, in KJT value order): what its
        module remaps. Sharded modules gather these over ranks before remapping."""
        values = self._check(features).values().to(torch.int64)
        out: dict[str, torch.Tensor] = {}
        for table, spans in self._spans(features).items():
            if len(spans) == 1:
                a, b = spans[0]
                out[table] = values[a:b]
            else:
                out[table] = torch.cat([values[a:b] for a, b in spans])
        return out

    def with_rows(
        self, features: KeyedJaggedTensor, rows_by_table: Mapping[str, torch.Tensor]
    ) -> KeyedJaggedTensor:
        """``features`` with each table's ids replaced by ``rows_by_table[table]`` (in the order
        :meth:`table_ids` gave them); lengths, weights and other keys unchanged."""
        values = features.values()
        pieces: list[tuple[int, int, torch.Tensor]] = []
        for table, spans in self._spans(features).items():
            rows = rows_by_table[table]
            start = 0
            for a, b in spans:
                pieces.append((a, b, rows[start : start + b - a]))
                start += b - a
        pieces.sort(key=lambda piece: piece[0])
        if _tiles(pieces, values.numel()):
            # Every value belongs to a managed table (the usual case): the rows in value order.
            out = torch.cat([rows for *_, rows in pieces]) if pieces else values.to(torch.int64)
        else:
            out = values.to(torch.int64, copy=True)
            for a, b, rows in pieces:
                out[a:b] = rows
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=out,
            weights=features.weights_or_none(),
            lengths=features.lengths(),
            stride=features.stride(),
            offset_per_key=features.offset_per_key(),
        )

    def _check(self, features: object) -> KeyedJaggedTensor:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(
                "ManagedCollisionCollection.forward expects a KeyedJaggedTensor, got"
                f" {type(features).__name__}"
            )
        return features

    def _spans(self, features: KeyedJaggedTensor) -> dict[str, list[tuple[int, int]]]:
        """Per table, the value ranges of its features (adjacent ranges joined)."""
        keys = features.keys()
        index = {k: i for i, k in enumerate(keys)}
        offsets = features.offset_per_key()
        out: dict[str, list[tuple[int, int]]] = {}
        for table, features_of in self._table_features.items():
            spans: list[tuple[int, int]] = []
            for feature in features_of:
                if feature not in index:
                    raise ValueError(
                        f"ManagedCollisionCollection: feature {feature!r} of table {table!r} is"
                        f" missing from the KJT (keys: {keys})"
                    )
                i = index[feature]
                spans.append((offsets[i], offsets[i + 1]))
            out[table] = _merge(sorted(spans))
        return out

    def evict(self) -> dict[str, torch.Tensor | None]:
        """Per table, the rows evicted since the last call (see
        :meth:`MCHManagedCollisionModule.evict`)."""
        return {name: m.evict() for name, m in self.modules_by_table().items()}

    def open_slots(self) -> dict[str, int]:
        return {name: m.open_slots() for name, m in self.modules_by_table().items()}

    def stats(self) -> dict[str, ManagedTableStats]:
        """Per table: capacity, occupancy, admitted, evicted, rejected, below threshold."""
        return {name: m.stats() for name, m in self.modules_by_table().items()}


def managed_table_stats(model: nn.Module) -> dict[str, ManagedTableStats]:
    """The counters of every managed table in ``model`` (unsharded or sharded: each holds a
    :class:`ManagedCollisionCollection`), by table name; ``<module path>/<table>`` where two
    collections have a table of the same name."""
    found: list[tuple[str, str, ManagedTableStats]] = []
    for path, module in model.named_modules():
        if isinstance(module, ManagedCollisionCollection):
            found += [(path, table, stats) for table, stats in module.stats().items()]
    names = [table for _, table, _ in found]
    return {
        (table if names.count(table) == 1 else f"{path}/{table}"): stats
        for path, table, stats in found
    }


def _tiles(pieces: list[tuple[int, int, torch.Tensor]], total: int) -> bool:
    """Whether the sorted value ranges cover ``[0, total)`` exactly."""
    at = 0
    for a, b, _ in pieces:
        if a != at:
            return False
        at = b
    return at == total


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent value ranges joined (a table's features are usually next to each other)."""
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged
