"""``ManagedCollisionCollection``: one managed-id module per table, applied to a KJT's raw ids.

::

    tables    t0 (features f0, f1)   t1 (feature f2)
    input     KJT f0: [[9137702141], [42]]  f1: [[42, 7]]  f2: [[-5]]   raw int64 ids
    output    KJT f0: [[0], [1]]            f1: [[1, 2]]    f2: [[0]]    rows of t0 / t1

The features of one table share its module, so an id means the same row in all of them. Lengths,
weights and the batch size pass through unchanged; keys no table reads pass through as they are.

A table may be split into buckets (``num_buckets``, :mod:`shardrec.modules.mc_buckets`): each
bucket maps the ids that hash to it into its own range of rows, and a sharded module spreads the
buckets over the ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from shardrec.modules.configs import BaseEmbeddingConfig
from shardrec.modules.managed_collision import ManagedTableStats, MCHManagedCollisionModule
from shardrec.modules.mc_buckets import (
    BucketLayout,
    bucket_stats,
    counters_of,
    evicted_rows,
    held_ids,
    make_buckets,
    remap_buckets,
)
from shardrec.sparse import KeyedJaggedTensor

__all__ = [
    "ManagedCollisionCollection",
    "ManagedTableCounters",
    "TableFeatures",
    "managed_table_stats",
]


@runtime_checkable
class ManagedTableCounters(Protocol):
    """A module that holds managed tables' counters: a collection, or a sharded module's part
    of one (what :func:`managed_table_stats` looks for)."""

    def managed_table_counters(self) -> dict[str, ManagedTableStats]: ...


class ManagedCollisionCollection(nn.Module):
    """Remaps each table's features with that table's :class:`MCHManagedCollisionModule`.

    ``managed_collision_modules[table]`` must exist for every config, with ``output_size()``
    equal to the table's ``num_embeddings``; a feature may be read by one managed table only.
    ``forward(KJT) -> KJT`` (rows instead of raw ids).

    ``num_buckets`` (one number for every table, or per table name; default 1) splits a table
    into buckets (:mod:`shardrec.modules.mc_buckets`): its module is then only the template of
    the buckets' modules (its policy, interval and admission; it must be untrained). With one
    bucket the module is used as it is, under the same state-dict keys.
    """

    _managed_collision_modules: nn.ModuleDict

    def __init__(
        self,
        managed_collision_modules: Mapping[str, MCHManagedCollisionModule],
        embedding_configs: Sequence[BaseEmbeddingConfig],
        *,
        num_buckets: int | Mapping[str, int] = 1,
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
        self._layouts = {
            c.name: _layout(c.name, c.num_embeddings, num_buckets, names) for c in configs
        }
        self._buckets = {
            c.name: make_buckets(managed_collision_modules[c.name], self._layouts[c.name], c.name)
            for c in configs
        }
        # One bucket: the table's module under the table's key (the keys of unbucketed tables).
        self._managed_collision_modules = nn.ModuleDict(
            {
                t: buckets[0] if len(buckets) == 1 else nn.ModuleList(buckets)
                for t, buckets in self._buckets.items()
            }
        )
        self._features = TableFeatures({c.name: c.feature_names for c in configs})

    def embedding_configs(self) -> list[BaseEmbeddingConfig]:
        return list(self._embedding_configs)

    def modules_by_table(self) -> dict[str, MCHManagedCollisionModule]:
        """The module of each table (tables of one bucket only: see :meth:`buckets_by_table`)."""
        split = sorted(t for t, layout in self._layouts.items() if layout.num_buckets > 1)
        if split:
            raise ValueError(
                f"ManagedCollisionCollection: tables {split} are split into buckets and have no"
                " single module; use buckets_by_table()"
            )
        return {t: buckets[0] for t, buckets in self._buckets.items()}

    def buckets_by_table(self) -> dict[str, list[MCHManagedCollisionModule]]:
        """Each table's bucket modules, in bucket order (one: the table's module)."""
        return {t: list(buckets) for t, buckets in self._buckets.items()}

    def bucket_layouts(self) -> dict[str, BucketLayout]:
        return dict(self._layouts)

    def held_ids(self) -> dict[str, dict[int, int]]:
        """Per table, ``{raw id: row}`` of every id holding a row (for inspection and tests)."""
        return {
            t: held_ids(dict(enumerate(buckets)), self._layouts[t])
            for t, buckets in self._buckets.items()
        }

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        ids = self.table_ids(features)
        return self.with_rows(
            features,
            {t: remap_buckets(self._buckets[t], self._layouts[t], v) for t, v in ids.items()},
        )

    def table_ids(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Per table, the raw ids of all its features (int64, in KJT value order): what its
        module remaps."""
        return self._features.table_ids(features)

    def with_rows(
        self, features: KeyedJaggedTensor, rows_by_table: Mapping[str, torch.Tensor]
    ) -> KeyedJaggedTensor:
        """``features`` with each table's ids replaced by ``rows_by_table[table]`` (in the order
        :meth:`table_ids` gave them); lengths, weights and other keys unchanged."""
        return self._features.with_rows(features, rows_by_table)

    def table_features(self) -> TableFeatures:
        """Which features each table reads (what splits a KJT per table and puts rows back)."""
        return self._features

    def managed_table_counters(self) -> dict[str, ManagedTableStats]:
        return self.stats()

    def evict(self) -> dict[str, torch.Tensor | None]:
        """Per table, the rows evicted since the last call (see
        :meth:`MCHManagedCollisionModule.evict`), sorted (bucket by bucket, in row order)."""
        out: dict[str, torch.Tensor | None] = {}
        for t, buckets in self._buckets.items():
            found = evicted_rows(dict(enumerate(buckets)), self._layouts[t])
            out[t] = torch.cat([found[b] for b in sorted(found)]) if found else None
        return out

    def open_slots(self) -> dict[str, int]:
        return {t: sum(m.open_slots() for m in buckets) for t, buckets in self._buckets.items()}

    def stats(self) -> dict[str, ManagedTableStats]:
        """Per table: capacity, occupancy, admitted, evicted, rejected, below threshold."""
        return {
            t: bucket_stats([counters_of(m) for m in buckets], self._layouts[t])
            for t, buckets in self._buckets.items()
        }


def managed_table_stats(model: nn.Module) -> dict[str, ManagedTableStats]:
    """The counters of every managed table in ``model`` (unsharded or sharded: each holds a
    :class:`ManagedTableCounters`), by table name; ``<module path>/<table>`` where two
    collections have a table of the same name."""
    found: list[tuple[str, str, ManagedTableStats]] = []
    for path, module in model.named_modules():
        if isinstance(module, ManagedTableCounters):
            found += [
                (path, table, stats) for table, stats in module.managed_table_counters().items()
            ]
    names = [table for _, table, _ in found]
    return {
        (table if names.count(table) == 1 else f"{path}/{table}"): stats
        for path, table, stats in found
    }


class TableFeatures:
    """The features of each managed table: splits a KJT's values per table and puts rows back."""

    def __init__(self, table_features: Mapping[str, Sequence[str]]) -> None:
        self._table_features = {t: list(f) for t, f in table_features.items()}

    def table_ids(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Per table, the raw ids of all its features (int64, in KJT value order)."""
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


def _layout(
    table: str, rows: int, num_buckets: int | Mapping[str, int], tables: list[str]
) -> BucketLayout:
    if isinstance(num_buckets, Mapping):
        unknown = sorted(set(num_buckets) - set(tables))
        if unknown:
            raise ValueError(
                f"ManagedCollisionCollection: num_buckets names tables {unknown} that it does not"
                f" have (tables: {tables})"
            )
        count = num_buckets.get(table, 1)
    else:
        count = num_buckets
    try:
        return BucketLayout(rows, count)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ManagedCollisionCollection: table {table!r}: {exc}") from None


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
