"""The counters of managed tables as training metrics (``dlrm train --managed-ids``).

At every log step the trainer logs, per managed table ``t``, ``managed/<t>/occupancy``,
``.../occupancy_fraction``, ``.../admitted_total``, ``.../evicted_total``,
``.../rejected_total`` and ``.../below_threshold_total`` (TensorBoard with ``--logdir``), and
says once per table when its
``rejected_total`` starts to grow: admitted ids then read the table's default row, so the table is
too small for the ids that are live at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from shardrec.modules.mc_collection import managed_table_stats

__all__ = ["ManagedWatch"]


@dataclass(slots=True)
class ManagedWatch:
    """Reads the managed tables' counters; remembers which tables it has warned about."""

    warned: set[str] = field(default_factory=set)

    def read(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        """``(metrics, warnings)``: every table's counters, and a line for each table whose
        lookups started to find it full since the last read. Empty for a model without managed
        tables."""
        metrics: dict[str, float] = {}
        warnings: list[str] = []
        for table, stats in managed_table_stats(model).items():
            for name, value in stats.as_metrics().items():
                metrics[f"managed/{table}/{name}"] = value
            if stats.rejected_total > 0 and table not in self.warned:
                self.warned.add(table)
                warnings.append(
                    f"managed table {table} is full: {stats.rejected_total} lookup(s) of admitted "
                    f"ids read its default row ({stats.occupancy} of {stats.capacity} rows held); "
                    "give it more rows (--num-embeddings-per-feature)"
                )
        return metrics, warnings
