"""Fused optimizer updates on CPU: one pass over the distinct rows, in cache-sized chunks.

The batch's gradient arrives as a :class:`~shardrec.kernels.optimizers.SparseGrad` (each id's bag
and weight). The ids are sorted once (``torch.sort`` of int64 ids is cheap next to moving rows);
each distinct row then owns the run of its contributions. Its gradient is the weighted sum of its
contributions' bag gradients, which is exactly an ``embedding_bag`` whose "table" is the output
gradient, whose "ids" are the bags of the run and whose bags are the runs: torch's CPU
``embedding_bag`` does that sum at the machine's gather speed without materialising one gradient
row per id.

The update then walks the distinct rows ``CHUNK_ROWS`` at a time: the rule reads the chunk's
optimizer state, writes the new state and returns each row's change, which ``index_add_`` adds to
the fp32 weights (fp16/bf16 weights are gathered, updated in fp32, rounded once and written back).
Every temporary is a chunk (a megabyte), so it stays in the caches and its memory is reused from
one chunk to the next; a whole-batch temporary (tens of megabytes at MLPerf shapes) is a fresh
allocation each step whose pages the kernel faults in, which cost more than the arithmetic. Each
row's update is the one a dense optimizer makes from that row's summed gradient.

What is left is memory latency: torch has no scatter that prefetches, so each distinct row's
read-modify-write waits on memory (see :func:`_gather` for the part prefetching recovers). So for
SGD, exact and row-wise Adagrad on fp32 weights, after the sort, a compiled kernel
(:mod:`shardrec.kernels.cpu_update_jit`, numba) sums, updates and writes each distinct row in one
pass that prefetches the rows ahead, with the torch code's arithmetic in its order (the same bits
but for torch's ``sqrt``, see there); the torch code below runs where there is no kernel (Adam,
fp16/bf16 weights, no numba). docs/benchmarks.md, the MLPerf kernel section, measures both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import torch
import torch.nn.functional as F

from shardrec.kernels.cpu_update_jit import run_compiled
from shardrec.kernels.specs import FusedOptimizerConfig, OptimizerType

if TYPE_CHECKING:
    from shardrec.kernels.optimizers import SparseGrad

__all__ = ["CHUNK_ROWS", "RowRuns", "apply_cpu_update", "group_by_row"]

#: Distinct rows updated together: 2,048 rows of dim 128 are 1 MiB of fp32 per temporary.
CHUNK_ROWS: Final = 2048


@dataclass(frozen=True, slots=True)
class RowRuns:
    """The contributions of a batch grouped by the row they update.

    Row ``rows[u]`` gets ``sum(weights[k] * grad_bags[bags[k]])`` over ``k`` in
    ``offsets[u] : offsets[u + 1]``; ``rows`` ascend and are distinct; ``weights`` None means 1.
    """

    rows: torch.Tensor
    offsets: torch.Tensor
    bags: torch.Tensor
    weights: torch.Tensor | None

    def gradient(self, grad_bags: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The summed fp32 gradients of distinct rows ``lo:hi`` (``[hi - lo, dim]``)."""
        offsets = self.offsets[lo : hi + 1]
        first = int(offsets[0])
        last = int(offsets[-1])
        weights = None if self.weights is None else self.weights[first:last]
        return F.embedding_bag(
            self.bags[first:last],
            grad_bags,
            offsets - first,
            mode="sum",
            per_sample_weights=weights,
            include_last_offset=True,
        )


def group_by_row(grad: SparseGrad) -> RowRuns:
    """Sort ``grad``'s ids once and group each id's bag and weight under its row."""
    ids, order = torch.sort(grad.ids)
    rows, counts = torch.unique_consecutive(ids, return_counts=True)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    bags = order if grad.bag is None else grad.bag.index_select(0, order)
    weights = None
    if grad.psw is not None:
        weights = grad.psw.to(torch.float32).index_select(0, order)
    return RowRuns(rows=rows, offsets=offsets, bags=bags, weights=weights)


def apply_cpu_update(
    config: FusedOptimizerConfig,
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    grad: SparseGrad,
    step: int,
    *,
    chunk_rows: int = CHUNK_ROWS,
    compiled: bool = True,
) -> None:
    """Update ``weight`` (``[rows, dim]``, CPU) and ``state`` in place from ``grad``.

    The same rules as :func:`~shardrec.kernels.optimizers.apply_fused_update` (``step`` is the
    1-based number of this update, for Adam's bias correction); fp16/bf16 weights are updated in
    fp32 and rounded once. ``chunk_rows``: distinct rows updated together by the torch code.
    ``compiled``: run the compiled kernel where there is one for the rule and the weights
    (:func:`~shardrec.kernels.cpu_update_jit.run_compiled`: same bits); False: the torch code.
    """
    if grad.ids.numel() == 0:
        return
    runs = group_by_row(grad)
    grad_bags = grad.grad_bags if grad.grad_bags.dtype == torch.float32 else grad.grad_bags.float()
    if compiled and run_compiled(config, weight, state, runs, grad_bags):
        return
    count = runs.rows.numel()
    rule = _RULES[config.optimizer]
    for lo in range(0, count, chunk_rows):
        hi = min(lo + chunk_rows, count)
        rows = runs.rows[lo:hi]
        delta = rule(config, state, rows, runs.gradient(grad_bags, lo, hi), step)
        if weight.dtype == torch.float32:
            _gather(weight, rows)  # into the cache, for index_add_ (see _gather)
            weight.index_add_(0, rows, delta)
        else:
            updated = weight.index_select(0, rows).float().add_(delta)
            weight.index_copy_(0, rows, updated.to(weight.dtype))


def _gather(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` (fp32 2-D), read by embedding_bag with one row per bag.

    ``index_select`` and ``index_add_`` walk the rows one after another without prefetching, so
    each row waits for memory; embedding_bag's gather prefetches the rows ahead. Reading a chunk's
    rows with it first leaves them in the cache for the ``index_add_`` that writes them:
    measured faster than ``index_select`` + ``index_copy_`` and than ``index_add_`` alone.
    """
    offsets = torch.arange(rows.numel() + 1, device=rows.device)
    return F.embedding_bag(rows, table, offsets, mode="sum", include_last_offset=True)


# A rule updates the optimizer state of ``rows`` from their summed gradients ``g`` (a chunk of its
# own, free to overwrite) and returns each row's fp32 weight change.
Rule = Callable[
    [FusedOptimizerConfig, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int],
    torch.Tensor,
]


def _sgd(
    config: FusedOptimizerConfig,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    g: torch.Tensor,
    step: int,
) -> torch.Tensor:
    return g.mul_(-config.learning_rate)


def _exact_adagrad(
    config: FusedOptimizerConfig,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    g: torch.Tensor,
    step: int,
) -> torch.Tensor:
    total = state["sum"]
    square = g.square()
    # Both sides add the same two floats, so the state and the copy used below agree bit for bit.
    s = _gather(total, rows).add_(square)
    total.index_add_(0, rows, square)
    return g.div_(s.sqrt_().add_(config.eps)).mul_(-config.learning_rate)


def _rowwise_adagrad(
    config: FusedOptimizerConfig,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    g: torch.Tensor,
    step: int,
) -> torch.Tensor:
    total = state["sum"]
    s = total.index_select(0, rows).add_(g.square().mean(dim=1))
    total.index_copy_(0, rows, s)
    scale = s.sqrt_().add_(config.eps).reciprocal_().mul_(-config.learning_rate)
    return g.mul_(scale.unsqueeze(1))


def _adam(
    config: FusedOptimizerConfig,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    g: torch.Tensor,
    step: int,
) -> torch.Tensor:
    b1, b2 = config.beta1, config.beta2
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    m = exp_avg.index_select(0, rows).mul_(b1).add_(g, alpha=1.0 - b1)
    v = exp_avg_sq.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1.0 - b2)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    denom = v.div_(1.0 - b2**step).sqrt_().add_(config.eps)
    return m.div_(denom).mul_(-config.learning_rate / (1.0 - b1**step))


_RULES: Final[dict[OptimizerType, Rule]] = {
    OptimizerType.SGD: _sgd,
    OptimizerType.EXACT_ADAGRAD: _exact_adagrad,
    OptimizerType.ROWWISE_ADAGRAD: _rowwise_adagrad,
    OptimizerType.ADAM: _adam,
}
