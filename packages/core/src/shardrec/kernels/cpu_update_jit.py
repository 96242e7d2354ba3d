"""The CPU fused update of SGD, exact and row-wise Adagrad as one compiled pass (numba).

:mod:`shardrec.kernels.cpu_update` sorts the ids and groups them by row (:class:`RowRuns`); the
kernels here then walk the distinct rows once: each row's gradient is summed from its run of bag
gradients into a buffer of one row, its state read, updated and written, and its weights written,
while the rows a few places ahead (``ahead``) have their weights, state and bag gradients
prefetched, so that several rows' cache misses are in flight while one row computes. The torch
code reads and writes each distinct row in separate passes (an ``embedding_bag`` gather, then an
``index_add_`` that waits on memory row by row); this moves each row's bytes once.

The arithmetic is the torch code's, in the same order: a row's gradient is the sum of its
contributions in id-sorted order from zero, with one fused multiply-add per weighted contribution,
as torch's CPU ``embedding_bag`` (FBGEMM's kernel inside torch) sums a bag; the rules round each
operation as torch's elementwise ops do (``g * g`` then ``+``, ``sqrt``, ``+ eps``, ``/``,
``* -lr``); row-wise Adagrad's ``mean`` of the squares follows torch's CPU sum of a contiguous row
of up to :data:`ROWWISE_MAX_DIM` floats: four accumulators of 8 lanes, combined, then the lanes in
order, divided by the dim (wider rows take the torch code). One difference: the kernels' ``sqrt``
is the IEEE one (correctly rounded), torch's CPU ``sqrt`` is MKL's, which is not on every machine
(on the AMD EPYC of docs/benchmarks.md it is an ulp off for ~16% of floats). So the state comes out
the same bits and so do SGD's weights; Adagrad's weights are the same bits as the torch code given
an IEEE ``sqrt``, else within an ulp of each step. tests/core/test_cpu_update_jit.py checks both on
the machine that runs it.

numba is a dependency of shardrec; where it cannot be imported, :func:`update_kernels` returns None
and the torch code runs. Kernels compile once per process and are cached on disk (``cache=True``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

import numpy as np
import numpy.typing as npt
import torch

from shardrec.kernels.jit_intrinsics import (
    fma32,
    prefetch_read,
    prefetch_write,
    register_intrinsics,
)
from shardrec.kernels.specs import FusedOptimizerConfig, OptimizerType

if TYPE_CHECKING:
    from shardrec.kernels.cpu_update import RowRuns

__all__ = ["PREFETCH_ROWS", "ROWWISE_MAX_DIM", "UpdateKernels", "run_compiled", "update_kernels"]

F32s = npt.NDArray[np.float32]
I64s = npt.NDArray[np.int64]

#: Distinct rows ahead of the one being updated whose bytes are prefetched (measured best of
#: 0, 2, 4, 8, 16 at MLPerf shapes; docs/benchmarks.md).
PREFETCH_ROWS: Final = 4
# torch's CPU sum of a contiguous row: 4 accumulators of one 8-float vector each, summed row-wise
# in order while a row has at most 16 groups of 4 vectors (beyond that it cascades).
_LANES: Final = 8
_ILP: Final = 4
#: Widest row row-wise Adagrad's compiled kernel takes (the torch sum's order is followed to here).
ROWWISE_MAX_DIM: Final = _LANES * _ILP * 16
# Floats per 64-byte cache line.
_LINE: Final = 16
# Contributions (bag gradient rows) prefetched ahead, per distinct row of ``ahead``.
_BAGS_PER_ROW: Final = 2


def _prefetch_row(weight: F32s, state: F32s, row: int) -> None:
    """Prefetch a row's weights and state for writing; ``state``: 2-D (a row per row), 1-D (a
    float per row) or 0-D (none)."""
    for off in range(0, weight.shape[1], _LINE):
        prefetch_write(weight[row], off)
    if state.ndim == 2:
        for off in range(0, state.shape[1], _LINE):
            prefetch_write(state[row], off)
    elif state.ndim == 1 and state.size > 0:
        prefetch_write(state, row)


def _prefetch_bags(grad: F32s, bags: I64s, lo: int, hi: int) -> int:
    """Prefetch the gradient rows of bags ``bags[lo:hi]`` (clipped) for reading; returns the end."""
    hi = min(hi, bags.size)
    for k in range(lo, hi):
        g = grad[bags[k]]
        for off in range(0, g.size, _LINE):
            prefetch_read(g, off)
    return max(hi, lo)


def _row_gradient(acc: F32s, grad: F32s, bags: I64s, weights: F32s, lo: int, hi: int) -> None:
    """``acc``: the sum of the rows ``grad[bags[lo:hi]]`` (times ``weights[k]`` when ``weights``
    is not empty), in order from zero, as ``embedding_bag`` sums a bag."""
    # Indexed [row, counter of a range]: the counter is known non-negative, so the loops compile
    # to vector instructions (a computed flat index would be checked for wraparound).
    dim = acc.size
    for d in range(dim):
        acc[d] = np.float32(0.0)
    if weights.size == 0:
        for k in range(lo, hi):
            b = bags[k]
            for d in range(dim):
                acc[d] += grad[b, d]
    else:
        for k in range(lo, hi):
            b = bags[k]
            w = weights[k]
            for d in range(dim):
                acc[d] = fma32(w, grad[b, d], acc[d])


def _square_mean(acc: F32s, parts: F32s) -> np.float32:
    """``mean(acc ** 2)`` summed in the order of torch's CPU sum of a contiguous row (see
    :data:`ROWWISE_MAX_DIM`); ``parts``: scratch of ``_ILP * _LANES`` floats."""
    dim = acc.size
    total = np.float32(0.0)
    if dim >= _LANES:
        vectors = dim // _LANES
        groups = vectors // _ILP
        for j in range(_ILP * _LANES):
            parts[j] = np.float32(0.0)
        # ``parts.size`` (not the constant) as the bound: a loop of a known 32 steps is unrolled
        # into scalar code that cannot be vectorized (parts and acc might overlap); this one is,
        # behind a run-time overlap check.
        width = parts.size
        for i in range(groups):
            block = acc[i * width : (i + 1) * width]
            for j in range(width):
                parts[j] += block[j] * block[j]
        for v in range(groups * _ILP, vectors):
            vector = acc[v * _LANES : (v + 1) * _LANES]
            for lane in range(_LANES):
                parts[lane] += vector[lane] * vector[lane]
        for k in range(1, _ILP):
            for lane in range(_LANES):
                parts[lane] += parts[k * _LANES + lane]
        for d in range(vectors * _LANES, dim):
            total += acc[d] * acc[d]
        for lane in range(_LANES):
            total += parts[lane]
    else:
        # Rows shorter than a vector: 4 scalar accumulators.
        for k in range(_ILP):
            parts[k] = np.float32(0.0)
        groups = dim // _ILP
        for i in range(groups):
            for k in range(_ILP):
                parts[k] += acc[i * _ILP + k] * acc[i * _ILP + k]
        for d in range(groups * _ILP, dim):
            parts[0] += acc[d] * acc[d]
        for k in range(1, _ILP):
            parts[0] += parts[k]
        total = parts[0]
    return np.float32(total / np.float32(dim))


def _sgd(
    weight: F32s,
    rows: I64s,
    offsets: I64s,
    bags: I64s,
    weights: F32s,
    grad: F32s,
    lr: np.float32,
    ahead: int,
) -> None:
    """``weight[r] += g * -lr`` for each distinct row ``r`` of summed gradient ``g``.

    ``weight``: ``[rows, dim]``; ``grad``: the bags' gradients ``[bags, dim]``; distinct row
    ``rows[u]`` sums ``grad[bags[k]]`` (times ``weights[k]``; ``weights`` empty: 1) over ``k`` in
    ``offsets[u] : offsets[u + 1]``; ``ahead``: rows prefetched ahead (0: none)."""
    acc = np.empty(weight.shape[1], dtype=np.float32)
    none = np.empty(0, dtype=np.float32)
    neg = -lr
    n = rows.size
    fetched = 0
    for u in range(n):
        if ahead > 0:
            if u + ahead < n:
                _prefetch_row(weight, none, rows[u + ahead])
            fetched = _prefetch_bags(grad, bags, fetched, offsets[u + 1] + _BAGS_PER_ROW * ahead)
        _row_gradient(acc, grad, bags, weights, offsets[u], offsets[u + 1])
        r = rows[u]
        for d in range(acc.size):
            weight[r, d] += acc[d] * neg


def _exact_adagrad(
    weight: F32s,
    total: F32s,
    rows: I64s,
    offsets: I64s,
    bags: I64s,
    weights: F32s,
    grad: F32s,
    lr: np.float32,
    eps: np.float32,
    ahead: int,
) -> None:
    """Exact Adagrad: ``s = total[r] + g * g``, ``weight[r] += g / (sqrt(s) + eps) * -lr``
    (``total``: ``[rows, dim]``; the rest as :func:`_sgd`)."""
    acc = np.empty(weight.shape[1], dtype=np.float32)
    neg = -lr
    n = rows.size
    fetched = 0
    for u in range(n):
        if ahead > 0:
            if u + ahead < n:
                _prefetch_row(weight, total, rows[u + ahead])
            fetched = _prefetch_bags(grad, bags, fetched, offsets[u + 1] + _BAGS_PER_ROW * ahead)
        _row_gradient(acc, grad, bags, weights, offsets[u], offsets[u + 1])
        r = rows[u]
        for d in range(acc.size):
            g = acc[d]
            s = total[r, d] + g * g
            total[r, d] = s
            weight[r, d] += g / (np.sqrt(s) + eps) * neg


def _rowwise_adagrad(
    weight: F32s,
    total: F32s,
    rows: I64s,
    offsets: I64s,
    bags: I64s,
    weights: F32s,
    grad: F32s,
    lr: np.float32,
    eps: np.float32,
    ahead: int,
) -> None:
    """Row-wise Adagrad: ``s = total[r] + mean(g * g)``,
    ``weight[r] += g * (1 / (sqrt(s) + eps) * -lr)`` (``total``: ``[rows]``; the rest as
    :func:`_sgd`)."""
    acc = np.empty(weight.shape[1], dtype=np.float32)
    parts = np.empty(_ILP * _LANES, dtype=np.float32)
    neg = -lr
    one = np.float32(1.0)
    n = rows.size
    fetched = 0
    for u in range(n):
        if ahead > 0:
            if u + ahead < n:
                _prefetch_row(weight, total, rows[u + ahead])
            fetched = _prefetch_bags(grad, bags, fetched, offsets[u + 1] + _BAGS_PER_ROW * ahead)
        _row_gradient(acc, grad, bags, weights, offsets[u], offsets[u + 1])
        r = rows[u]
        s = total[r] + _square_mean(acc, parts)
        total[r] = s
        scale = one / (np.sqrt(s) + eps) * neg
        for d in range(acc.size):
            weight[r, d] += acc[d] * scale


def run_compiled(
    config: FusedOptimizerConfig,
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    runs: RowRuns,
    grad_bags: torch.Tensor,
    *,
    ahead: int = PREFETCH_ROWS,
) -> bool:
    """Update ``weight`` and ``state`` from ``runs`` (bags of ``grad_bags``, fp32) with the
    compiled kernel; False, with nothing changed, where there is none: numba absent, weights not
    fp32, contiguous and on CPU, Adam, or a row-wise Adagrad row wider than
    :data:`ROWWISE_MAX_DIM`. ``ahead``: distinct rows prefetched ahead (0: none)."""
    kind = config.optimizer
    if (
        kind is OptimizerType.ADAM
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or not weight.is_contiguous()
        or (kind is OptimizerType.ROWWISE_ADAGRAD and weight.shape[1] > ROWWISE_MAX_DIM)
    ):
        return False
    kernels = update_kernels()
    if kernels is None:
        return False
    dim = weight.shape[1]
    if runs.rows.numel() == 0:
        return True
    # The kernels do not check bounds: a row or bag out of range would write past the tables.
    if int(runs.rows[0]) < 0 or int(runs.rows[-1]) >= weight.shape[0]:
        raise IndexError(
            f"fused update: row ids must lie in [0, {weight.shape[0]}), "
            f"got {int(runs.rows[0])}..{int(runs.rows[-1])}"
        )
    low, high = torch.aminmax(runs.bags)
    if int(low) < 0 or int(high) >= grad_bags.shape[0] or grad_bags.shape[1] != dim:
        raise IndexError(
            f"fused update: bags must lie in [0, {grad_bags.shape[0]}) with rows of {dim}, got "
            f"{int(low)}..{int(high)} and gradient rows of {grad_bags.shape[1]}"
        )
    w = _view(weight)
    g = _view(grad_bags.contiguous())
    rows, offsets, bags = runs.rows.numpy(), runs.offsets.numpy(), runs.bags.contiguous().numpy()
    empty = np.empty(0, dtype=np.float32)
    weights = empty if runs.weights is None else runs.weights.contiguous().numpy()
    lr = np.float32(config.learning_rate)
    if kind is OptimizerType.SGD:
        kernels.sgd(w, rows, offsets, bags, weights, g, lr, ahead)
        return True
    total = _view(state["sum"])
    eps = np.float32(config.eps)
    rule = kernels.exact_adagrad if kind is OptimizerType.EXACT_ADAGRAD else kernels.rowwise_adagrad
    rule(w, total, rows, offsets, bags, weights, g, lr, eps, ahead)
    return True


def _view(t: torch.Tensor) -> F32s:
    """A numpy view of a contiguous fp32 tensor (its memory, not a copy)."""
    if not t.is_contiguous() or t.dtype != torch.float32:
        raise ValueError(
            f"fused update: expected a contiguous fp32 tensor, got {t.dtype} {t.shape}"
        )
    return cast(F32s, t.detach().numpy())


SgdKernel = Callable[[F32s, I64s, I64s, I64s, F32s, F32s, np.float32, int], None]
AdagradKernel = Callable[
    [F32s, F32s, I64s, I64s, I64s, F32s, F32s, np.float32, np.float32, int], None
]


@dataclass(frozen=True, slots=True)
class UpdateKernels:
    """The compiled kernels (arguments as the functions of the same name in this module)."""

    sgd: SgdKernel
    exact_adagrad: AdagradKernel
    rowwise_adagrad: AdagradKernel


@functools.cache
def update_kernels() -> UpdateKernels | None:
    """The kernels, compiled on the first call of the process; None without numba."""
    try:
        import numba
    except ImportError:
        return None
    _register_primitives()
    # error_model="numpy": a float division is the machine's (no zero check, which would keep the
    # loops from compiling to vector instructions).
    jit = functools.partial(numba.njit, cache=True, nogil=True, error_model="numpy")
    return UpdateKernels(
        sgd=cast(SgdKernel, jit(_sgd)),
        exact_adagrad=cast(AdagradKernel, jit(_exact_adagrad)),
        rowwise_adagrad=cast(AdagradKernel, jit(_rowwise_adagrad)),
    )


def _register_primitives() -> None:
    """Give the compiled kernels the LLVM intrinsics (:mod:`shardrec.kernels.jit_intrinsics`) and
    the helper functions as compiled functions."""
    from numba.extending import register_jitable

    register_intrinsics()
    for helper in (_prefetch_row, _prefetch_bags, _row_gradient, _square_mean):
        register_jitable(helper)
