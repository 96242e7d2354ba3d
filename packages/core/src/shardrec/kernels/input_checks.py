"""Checks of a batch before a lookup: integer ids, no negative length, every id inside its table.

A batch is key-major, as in a KJT: ``values`` (the ids of feature 0, then feature 1, ...),
``lengths`` (``F * batch`` bag sizes) and the host list ``length_per_feature``. The check runs in
two steps, so that a distributed caller can agree on the outcome before any id moves:

- :meth:`BatchChecker.problem_flag` reduces the batch to a 0-d bool tensor on its device, with no
  host read: one ``aminmax`` over the ids seen as ``[F, ids per feature]`` when every feature has
  as many ids (fixed-size batches), else (on CPU, up to 128 features) one ``aminmax`` per feature,
  or one pass that compares each id with its table's rows; and one ``min`` over the lengths.
- :meth:`BatchChecker.find_problem` reads the contents on the host and names the first problem
  (feature, table, id, its position among the feature's ids and its sample). It is only called once
  the flag said something is wrong, so it may be slow.

:meth:`BatchChecker.check` does both in one process: one host read of the flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import torch

__all__ = ["BadBatchError", "BatchChecker"]

# Up to this many features of unequal id counts, a CPU batch is checked one feature at a time
# (one small call each, ~5 us); beyond it, in one pass over per-id limits.
_PER_FEATURE_MAX: Final = 128


class BadBatchError(ValueError):
    """A batch a lookup refuses: ids that are not integers, a negative length, an id out of range.

    ``ranks`` lists the ranks whose batch was bad when the error comes from a distributed module
    (raised on every rank alike); it is empty in a single process.
    """

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


class BatchChecker:
    """Checks batches of the features ``features`` (in this order), each reading ``tables[i]`` of
    ``rows[i]`` rows. ``owner`` starts every message (e.g. ``"EmbeddingBagCollection"``)."""

    def __init__(
        self,
        owner: str,
        features: Sequence[str],
        tables: Sequence[str],
        rows: Sequence[int],
    ) -> None:
        if not len(features) == len(tables) == len(rows):
            raise ValueError("BatchChecker: features, tables and rows must have one entry each")
        self.owner = owner
        self.features = tuple(features)
        self.tables = tuple(tables)
        self.rows = tuple(int(r) for r in rows)
        self._rows_on: dict[torch.device, torch.Tensor] = {}

    def _rows(self, device: torch.device) -> torch.Tensor:
        found = self._rows_on.get(device)
        if found is None:
            found = torch.tensor(self.rows, dtype=torch.int64, device=device)
            self._rows_on[device] = found
        return found

    def dtype_problem(self, values: torch.Tensor) -> str | None:
        """Why ``values`` cannot be ids (a host-side look at the dtype only), or None."""
        dtype = values.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            pairs = dict.fromkeys(zip(self.features, self.tables, strict=True))
            names = ", ".join(f"{f!r} (table {t!r})" for f, t in pairs)
            return (
                f"{self.owner}: the KJT's values have dtype {dtype}, but the ids of features"
                f" {names} must be integers (a float tensor of ids would be truncated into rows"
                " silently; per-id floats belong in weights=)"
            )
        return None

    def problem_flag(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        length_per_feature: Sequence[int],
    ) -> torch.Tensor:
        """A 0-d bool on ``values``' device: True when a length is negative or an id is outside
        its table (no host read). Call :meth:`dtype_problem` first: float ids are not compared."""
        device = values.device
        flags: list[torch.Tensor] = []
        if lengths.numel():
            flags.append(lengths.min() < 0)
        n = values.numel()
        if n:
            lpk = list(length_per_feature)
            rows = self._rows(device)
            if len(set(lpk)) == 1:
                lows, highs = values.view(len(lpk), -1).aminmax(dim=1)
                flags.append(((lows < 0) | (highs >= rows)).any())
            elif values.device.type == "cpu" and len(lpk) <= _PER_FEATURE_MAX:
                # Feature by feature: no id-sized temporary, which a CPU page-faults in afresh
                # on every batch once the heap was trimmed (a few ms at MLPerf's 219k ids).
                parts = torch.split(values, lpk)
                found = [(f, part.aminmax()) for f, part in enumerate(parts) if lpk[f]]
                lows = torch.stack([m.min for _, m in found])
                highs = torch.stack([m.max for _, m in found])
                limit = rows[[f for f, _ in found]]
                flags.append(((lows < 0) | (highs >= limit)).any())
            else:
                counts = torch.tensor(lpk, dtype=torch.int64, device=device)
                limit = rows.repeat_interleave(counts, output_size=n)
                # Negative exactly when an id is < 0 or >= its limit: one pass, one reduction.
                flags.append(torch.bitwise_or(values, limit - 1 - values).min() < 0)
        if not flags:
            return torch.zeros((), dtype=torch.bool, device=device)
        if len(flags) == 1:
            return flags[0]
        return torch.stack(flags).any()

    def find_problem(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        length_per_feature: Sequence[int],
        batch_size: int,
    ) -> str | None:
        """The first problem of the batch, named (reads the contents on the host), or None."""
        dtype = self.dtype_problem(values)
        if dtype is not None:
            return dtype
        lengths = lengths.detach().cpu().to(torch.int64)
        if lengths.numel() and int(lengths.min()) < 0:
            at = int(torch.nonzero(lengths < 0)[0, 0])
            f, sample = divmod(at, batch_size) if batch_size else (0, at)
            return (
                f"{self.owner}: negative length {int(lengths[at])} for feature"
                f" {self.features[f]!r} (table {self.tables[f]!r}) at sample {sample}"
            )
        values = values.detach().cpu().to(torch.int64)
        start = 0
        for f, n in enumerate(length_per_feature):
            ids = values[start : start + n]
            bad = torch.nonzero((ids < 0) | (ids >= self.rows[f]))
            if bad.numel():
                position = int(bad[0, 0])
                per_sample = lengths[f * batch_size : (f + 1) * batch_size]
                sample = int(torch.searchsorted(per_sample.cumsum(0), position, right=True))
                return (
                    f"{self.owner}: id {int(ids[position])} of feature {self.features[f]!r}"
                    f" (position {position} of its ids, sample {sample}) is out of range for"
                    f" table {self.tables[f]!r} (num_embeddings={self.rows[f]}; ids must be in"
                    f" [0, {self.rows[f]}))"
                )
            start += n
        return None

    def check(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        length_per_feature: Sequence[int],
        batch_size: int,
    ) -> None:
        """Raise :class:`BadBatchError` naming the first problem; one host read of the flag."""
        problem = self.dtype_problem(values)
        if problem is None and bool(self.problem_flag(values, lengths, length_per_feature)):
            problem = self.find_problem(values, lengths, length_per_feature, batch_size)
            if problem is None:  # cannot happen: the flag and the search test the same things
                problem = f"{self.owner}: the batch failed its checks"
        if problem is not None:
            raise BadBatchError(problem)
