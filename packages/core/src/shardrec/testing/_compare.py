"""Comparisons of a sharded run's per-rank results with the reference, as Mismatch lists."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardrec.testing._ranks import GradHeld, Held, RankResult
from shardrec.testing._report import EquivalenceReport, Mismatch, Tolerance

__all__ = [
    "compare_outputs",
    "compare_steps",
    "compare_table_grads",
    "compare_tables",
    "compare_whole",
]


def _check(
    report: EquivalenceReport,
    tol: Tolerance,
    got: torch.Tensor,
    want: torch.Tensor,
    **where: object,
) -> None:
    differs, diff, detail = tol.difference(got, want)
    report.checked.append(", ".join(f"{k} {v}" for k, v in where.items() if v is not None))
    if differs:
        report.mismatches.append(Mismatch(max_abs_diff=diff, detail=detail, **where))  # type: ignore[arg-type]


def compare_outputs(
    report: EquivalenceReport,
    tol: Tolerance,
    phase: str,
    results: Sequence[RankResult],
    expected: Sequence[Sequence[torch.Tensor]],
) -> None:
    """Rank ``r``'s output at step ``s`` is ``expected[s][r]``."""
    for step, per_rank in enumerate(expected):
        for rank, result in enumerate(results):
            _check(
                report, tol, result.outputs[step], per_rank[rank],
                what="output", phase=phase, rank=rank, step=step,
            )  # fmt: skip


def compare_steps(
    report: EquivalenceReport,
    tol: Tolerance,
    phase: str,
    results: Sequence[RankResult],
    dense_grads: Sequence[torch.Tensor],
    weight_grads: Sequence[Sequence[torch.Tensor]],
) -> None:
    """The dense head's gradient (every rank, every step), and the per-id weights' gradient."""
    for step, grad in enumerate(dense_grads):
        for rank, result in enumerate(results):
            _check(
                report, tol, result.dense_grads[step], grad,
                what="dense gradient", phase=phase, rank=rank, step=step,
            )  # fmt: skip
    for step, per_rank in enumerate(weight_grads):
        for rank, result in enumerate(results):
            if len(result.weight_grads) <= step:
                report.mismatches.append(
                    Mismatch("per-id weights' gradient", phase, rank=rank, step=step,
                             detail="(none: the weights got no gradient)")
                )  # fmt: skip
                continue
            _check(
                report, tol, result.weight_grads[step], per_rank[rank],
                what="per-id weights' gradient", phase=phase, rank=rank, step=step,
            )  # fmt: skip


def _piece(whole: torch.Tensor, tensor: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    if len(offsets) != tensor.dim() or tensor.dim() > whole.dim():
        return whole.new_full((0,), float("nan"))
    index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))
    return whole[index]


def compare_table_grads(
    report: EquivalenceReport,
    tol: Tolerance,
    phase: str,
    results: Sequence[RankResult],
    expected: Sequence[dict[str, torch.Tensor]],
) -> None:
    """At every step, every shard of a table that gets a gradient in the reference (a table
    without a fused optimizer) gets its piece of it: a zero block where its rows were not
    looked up, never none (an optimizer with weight decay or momentum skips a parameter without
    a gradient). Only shards that are a trainable parameter's storage are seen."""
    for step, grads in enumerate(expected):
        for table, grad in grads.items():
            for rank, result in enumerate(results):
                held: GradHeld = result.table_grads[step].get(table, [])
                for got, offsets in held:
                    if got is None:
                        report.mismatches.append(
                            Mismatch("table gradient", phase, table=table, rank=rank, step=step,
                                     detail="(none: the shard got no gradient)")
                        )  # fmt: skip
                        continue
                    _check(
                        report, tol, got, _piece(grad, got, offsets),
                        what="table gradient", phase=phase, table=table, rank=rank, step=step,
                    )  # fmt: skip


def compare_tables(
    report: EquivalenceReport,
    tol: Tolerance,
    phase: str,
    results: Sequence[RankResult],
    weights: dict[str, torch.Tensor],
    states: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Every shard any rank holds equals its piece of the reference's table (and optimizer
    state), and the shards cover every table entirely.

    A row-wise optimizer state (one value per row) of a shard that holds only some columns is
    the shard's own mean over its columns, not the table's: it is left to the checkpoint
    comparison, which rebuilds the table's state from every column shard."""
    for table, weight in weights.items():
        covered = torch.zeros(weight.shape, dtype=torch.bool)
        for rank, result in enumerate(results):
            held: Held = result.weights.get(table, [])
            for tensor, offsets in held:
                _check(
                    report, tol, tensor, _piece(weight, tensor, offsets),
                    what="weight", phase=phase, table=table, rank=rank,
                )  # fmt: skip
                if len(offsets) == 2:
                    index = tuple(
                        slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True)
                    )
                    covered[index] = True
            _compare_states(report, tol, phase, table, rank, result, weight, states.get(table, {}))
        if not bool(covered.all()):
            missing = torch.nonzero(~covered.all(dim=1)).flatten().tolist()
            report.mismatches.append(
                Mismatch("weight", phase, table=table,
                         detail=f"(rows {missing[:10]} are held by no rank)")
            )  # fmt: skip


def _compare_states(
    report: EquivalenceReport,
    tol: Tolerance,
    phase: str,
    table: str,
    rank: int,
    result: RankResult,
    weight: torch.Tensor,
    states: dict[str, torch.Tensor],
) -> None:
    got_states = result.states.get(table, {})
    for name in sorted(set(states) | set(got_states)):
        what = f"optimizer state {name!r}"
        if name not in got_states or name not in states:
            if result.weights.get(table):
                side = "the sharded table" if name not in got_states else "the reference"
                report.mismatches.append(
                    Mismatch(what, phase, table=table, rank=rank, detail=f"(missing in {side})")
                )
            continue
        shards = result.weights.get(table, [])
        for i, (tensor, offsets) in enumerate(got_states[name]):
            want = states[name]
            if tensor.dim() == 1 and want.dim() == 1 and i < len(shards):
                cols = shards[i][0].shape[1] if shards[i][0].dim() == 2 else weight.shape[1]
                if cols != weight.shape[1]:
                    continue  # a column shard's own mean: see compare_tables
            piece = want if tensor.dim() == 0 else _piece(want, tensor, offsets)
            _check(report, tol, tensor, piece, what=what, phase=phase, table=table, rank=rank)


def compare_whole(
    report: EquivalenceReport,
    tol: Tolerance,
    phase: str,
    got: tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]],
    want: tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]],
) -> None:
    """Whole tables and their optimizer states (an unsharded module that loaded a checkpoint)."""
    for table, weight in want[0].items():
        _check(report, tol, got[0][table], weight, what="weight", phase=phase, table=table)
        for name, state in want[1].get(table, {}).items():
            found = got[1].get(table, {}).get(name)
            if found is None:
                report.mismatches.append(
                    Mismatch(f"optimizer state {name!r}", phase, table=table, detail="(missing)")
                )
                continue
            _check(
                report, tol, found, state,
                what=f"optimizer state {name!r}", phase=phase, table=table,
            )  # fmt: skip
