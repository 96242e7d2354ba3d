"""The CPU fused update (``shardrec.kernels.cpu_update``) on MLPerf-like batches.

MLPerf-like: several tables stacked in one storage, pooling factors from 1 to tens of ids per bag
(bag lengths drawn up to twice the factor, so some bags are empty), tiny tables that every bag hits
(many duplicate ids) beside big ones, per-id weights or none. Compared with a float64 reference
that forms each touched row's dense gradient id by id and applies the textbook rule, and, at the
module level, with FBGEMM's fused kernel where it is installed.
"""

from __future__ import annotations

import pytest
import torch

from shardrec import KeyedJaggedTensor, ops
from shardrec.kernels import (
    DataType,
    FeatureSpec,
    FusedOptimizerConfig,
    OptimizerType,
    TableBatchedEmbedding,
    TableSpec,
    cpu_update,
)
from shardrec.kernels.optimizers import SparseGrad, new_state

# (rows, pooling factor) per feature: a scaled-down MLPerf mix (tables of 3 and 4 rows, a factor
# of 20 standing in for MLPerf's 100).
SHAPES = [(3, 1), (40, 3), (4, 2), (500, 20), (7, 6), (1000, 1)]
DIM = 8
BATCH = 16
LR, EPS = 0.05, 1e-8


def mlperf_like_grad(seed: int, weighted: bool) -> tuple[SparseGrad, int]:
    """Key-major ids of ``SHAPES`` over one stacked storage, each with its sample-major bag."""
    gen = torch.Generator().manual_seed(seed)
    nf = len(SHAPES)
    ids, bags = [], []
    base = 0
    for f, (rows, hot) in enumerate(SHAPES):
        lengths = torch.randint(0, 2 * hot + 1, (BATCH,), generator=gen)
        n = int(lengths.sum())
        ids.append(torch.randint(0, rows, (n,), generator=gen) + base)
        bags.append(torch.repeat_interleave(torch.arange(BATCH) * nf + f, lengths))
        base += rows
    grad_bags = torch.randn(BATCH * nf, DIM, generator=gen)
    all_ids = torch.cat(ids)
    psw = torch.rand(all_ids.numel(), generator=gen) + 0.5 if weighted else None
    return SparseGrad(ids=all_ids, grad_bags=grad_bags, bag=torch.cat(bags), psw=psw), base


class Float64Reference:
    """Weights and states in float64, updated from a dense per-row gradient built id by id."""

    def __init__(self, weight: torch.Tensor, kind: OptimizerType) -> None:
        self.kind = kind
        self.w = weight.double()
        rows, dim = weight.shape
        self.sum = torch.zeros(rows if kind is OptimizerType.ROWWISE_ADAGRAD else (rows, dim))
        self.sum = self.sum.double()
        self.m = torch.zeros(rows, dim, dtype=torch.float64)
        self.v = torch.zeros(rows, dim, dtype=torch.float64)
        self.steps = 0

    def apply(self, grad: SparseGrad, weight_dtype: torch.dtype) -> None:
        self.steps += 1
        assert grad.bag is not None
        per_id = grad.grad_bags[grad.bag].double()
        if grad.psw is not None:
            per_id = per_id * grad.psw.double().unsqueeze(1)
        dense = torch.zeros_like(self.w).index_add_(0, grad.ids, per_id)
        t = torch.unique(grad.ids)
        g = dense[t]
        if self.kind is OptimizerType.SGD:
            step = LR * g
        elif self.kind is OptimizerType.EXACT_ADAGRAD:
            self.sum[t] += g * g
            step = LR * g / (self.sum[t].sqrt() + EPS)
        elif self.kind is OptimizerType.ROWWISE_ADAGRAD:
            self.sum[t] += (g * g).mean(dim=1)
            step = LR * g / (self.sum[t].sqrt() + EPS).unsqueeze(1)
        else:
            b1, b2 = 0.9, 0.999
            self.m[t] = b1 * self.m[t] + (1 - b1) * g
            self.v[t] = b2 * self.v[t] + (1 - b2) * g * g
            m_hat = self.m[t] / (1 - b1**self.steps)
            v_hat = self.v[t] / (1 - b2**self.steps)
            step = LR * m_hat / (v_hat.sqrt() + EPS)
        # The kernel rounds the updated rows to the weight's type once per step.
        self.w[t] = (self.w[t] - step).to(weight_dtype).double()


@pytest.mark.parametrize("chunk_rows", [5, cpu_update.CHUNK_ROWS])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", list(OptimizerType))
def test_cpu_update_matches_float64_reference(
    kind: OptimizerType, weighted: bool, chunk_rows: int
) -> None:
    # A chunk of 5 rows splits every batch into many chunks (and leaves a short last one).
    config = FusedOptimizerConfig(optimizer=kind, learning_rate=LR, eps=EPS)
    _, rows = mlperf_like_grad(0, weighted)
    weight = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(7))
    state = new_state(config, rows, DIM, torch.device("cpu"))
    ref = Float64Reference(weight, kind)
    for step in range(1, 4):
        grad, _ = mlperf_like_grad(step, weighted)
        cpu_update.apply_cpu_update(config, weight, state, grad, step, chunk_rows=chunk_rows)
        ref.apply(grad, weight.dtype)
        torch.testing.assert_close(weight, ref.w.float(), rtol=1e-5, atol=1e-5)
    if kind in (OptimizerType.EXACT_ADAGRAD, OptimizerType.ROWWISE_ADAGRAD):
        torch.testing.assert_close(state["sum"], ref.sum.float(), rtol=1e-5, atol=1e-5)
    if kind is OptimizerType.ADAM:
        torch.testing.assert_close(state["exp_avg"], ref.m.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"], ref.v.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_update_rounds_half_weights_once(dtype: torch.dtype) -> None:
    config = FusedOptimizerConfig(optimizer=OptimizerType.ROWWISE_ADAGRAD, learning_rate=LR)
    _, rows = mlperf_like_grad(0, True)
    weight = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(3)).to(dtype)
    state = new_state(config, rows, DIM, torch.device("cpu"))
    ref = Float64Reference(weight, OptimizerType.ROWWISE_ADAGRAD)
    for step in range(1, 3):
        grad, _ = mlperf_like_grad(step, True)
        cpu_update.apply_cpu_update(config, weight, state, grad, step)
        ref.apply(grad, dtype)
    assert weight.dtype == dtype
    # One rounding per step, as the reference does: equal up to one unit in the last place.
    torch.testing.assert_close(weight.double(), ref.w, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(state["sum"], ref.sum.float(), rtol=1e-4, atol=1e-5)


def test_group_by_row_sums_each_rows_contributions() -> None:
    grad, rows = mlperf_like_grad(11, True)
    runs = cpu_update.group_by_row(grad)
    assert torch.equal(runs.rows, torch.unique(grad.ids))
    assert int(runs.offsets[-1]) == grad.ids.numel()
    summed = runs.gradient(grad.grad_bags, 0, runs.rows.numel())
    dense = torch.zeros(rows, DIM, dtype=torch.float64)
    assert grad.bag is not None
    assert grad.psw is not None
    dense.index_add_(
        0, grad.ids, grad.psw.double().unsqueeze(1) * grad.grad_bags[grad.bag].double()
    )
    torch.testing.assert_close(summed.double(), dense[runs.rows], rtol=1e-5, atol=1e-5)
    # One id per bag, no bag index: id i is bag i.
    plain = SparseGrad(ids=torch.tensor([4, 1, 4, 0]), grad_bags=torch.eye(4), bag=None, psw=None)
    runs = cpu_update.group_by_row(plain)
    assert runs.rows.tolist() == [0, 1, 4]
    g = runs.gradient(plain.grad_bags, 0, 3)
    assert g.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]]


def test_empty_batch_changes_nothing() -> None:
    config = FusedOptimizerConfig(optimizer=OptimizerType.EXACT_ADAGRAD, learning_rate=LR)
    weight = torch.randn(10, DIM)
    before = weight.clone()
    state = new_state(config, 10, DIM, torch.device("cpu"))
    empty = SparseGrad(
        ids=torch.zeros(0, dtype=torch.int64), grad_bags=torch.randn(4, DIM), bag=None, psw=None
    )
    cpu_update.apply_cpu_update(config, weight, state, empty, 1)
    assert torch.equal(weight, before)
    assert not state["sum"].any()


def _mlperf_like_kjt(seed: int, weighted: bool) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.randint(0, 2 * h + 1, (BATCH,), generator=gen) for _, h in SHAPES])
    values = []
    for f, (rows, _) in enumerate(SHAPES):
        n = int(lengths[f * BATCH : (f + 1) * BATCH].sum())
        values.append(torch.randint(0, rows, (n,), generator=gen))
    ids = torch.cat(values)
    weights = torch.rand(ids.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{f}" for f in range(len(SHAPES))], values=ids, lengths=lengths, weights=weights
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", [OptimizerType.EXACT_ADAGRAD, OptimizerType.ROWWISE_ADAGRAD])
def test_torch_backend_matches_fbgemm_at_mlperf_like_shapes(
    kind: OptimizerType, weighted: bool
) -> None:
    """The whole step (forward, backward, fused update) of the torch backend, which runs the CPU
    update, against FBGEMM's fused kernel on the same batches."""
    if not ops.fbgemm_available():
        pytest.skip("fbgemm_gpu is not importable here (absent or hidden by SHARDREC_HIDE_FBGEMM)")
    tables = [
        TableSpec(name=f"t{f}", num_embeddings=rows, embedding_dim=DIM, data_type=DataType.FP32)
        for f, (rows, _) in enumerate(SHAPES)
    ]
    features = [FeatureSpec(name=f"f{f}", table=f"t{f}") for f in range(len(SHAPES))]
    config = FusedOptimizerConfig(optimizer=kind, learning_rate=LR, eps=EPS)
    modules = [
        TableBatchedEmbedding(
            tables=tables, features=features, is_weighted=weighted, optimizer=config, backend=b
        )
        for b in ("torch", "fbgemm")
    ]
    init = {t.name: torch.randn(t.num_embeddings, DIM) for t in tables}
    for m in modules:
        m.load_table_weights(init)
    for step in range(3):
        kjt = _mlperf_like_kjt(step, weighted)
        outs = [m(kjt) for m in modules]
        assert isinstance(outs[0], torch.Tensor)
        assert isinstance(outs[1], torch.Tensor)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        grad = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(50 + step))
        for out in outs:
            torch.autograd.backward(out, grad)
    for t in tables:
        torch.testing.assert_close(
            modules[0].table_weights()[t.name], modules[1].table_weights()[t.name],
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        torch.testing.assert_close(
            modules[0].optimizer_states()[t.name]["sum"],
            modules[1].optimizer_states()[t.name]["sum"],
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
