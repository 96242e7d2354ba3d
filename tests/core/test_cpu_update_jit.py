"""The compiled CPU update (``shardrec.kernels.cpu_update_jit``) against the torch code it replaces.

Both run on the same batches from the same weights: repeated ids, weighted and unweighted bags,
empty bags, tables of several dims (a lookup's torch groups, one per dim). The compiled kernels do
the torch code's arithmetic in the same order, so the results are the same bits, except that
torch's CPU ``sqrt`` is MKL's, which is not correctly rounded on every machine (on this one it
differs from IEEE ``sqrt`` by an ulp in ~16% of the floats): the comparisons that ask for equal
bits give the torch code an IEEE ``sqrt`` (``_ieee_sqrt``); with torch's own ``sqrt`` the state
(which no square root touches) is still the same bits and the weights are within float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.kernels import (
    DataType,
    FeatureSpec,
    FusedOptimizerConfig,
    OptimizerType,
    TableBatchedEmbedding,
    TableSpec,
    cpu_update,
    cpu_update_jit,
)
from shardrec.kernels.optimizers import SparseGrad, new_state

COMPILED = [OptimizerType.SGD, OptimizerType.EXACT_ADAGRAD, OptimizerType.ROWWISE_ADAGRAD]
LR, EPS = 0.05, 1e-8


def _ieee_sqrt(self: torch.Tensor) -> torch.Tensor:
    # The float64 square root of a float32, rounded to float32, is the float32 IEEE square root.
    return self.copy_(torch.sqrt(self.double()))


@pytest.fixture
def ieee_sqrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.Tensor, "sqrt_", _ieee_sqrt)


def _spy(calls: list[bool]) -> Callable[..., bool]:
    """run_compiled, appending what each call returned (True: the kernel ran) to ``calls``."""
    real = cpu_update_jit.run_compiled

    def spy(*args: Any, **kwargs: Any) -> bool:
        ran = real(*args, **kwargs)
        calls.append(ran)
        return ran

    return spy


@pytest.fixture
def compiled_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each call of the compiled path returned."""
    calls: list[bool] = []
    monkeypatch.setattr(cpu_update, "run_compiled", _spy(calls))
    return calls


def test_kernels_load() -> None:
    # numba is a dependency of shardrec: the compiled path must be the one that runs.
    assert cpu_update_jit.update_kernels() is not None


def _grad(seed: int, rows: int, dim: int, weighted: bool) -> SparseGrad:
    """Bags of 0 to 6 ids over ``rows`` rows, a few rows hit by most bags (repeated ids)."""
    gen = torch.Generator().manual_seed(seed)
    bags = 40
    lengths = torch.randint(0, 7, (bags,), generator=gen)
    lengths[::9] = 0
    n = int(lengths.sum())
    hot = torch.randint(0, 3, (n,), generator=gen)
    ids = torch.where(
        torch.rand(n, generator=gen) < 0.4, hot, torch.randint(0, rows, (n,), generator=gen)
    )
    bag = torch.repeat_interleave(torch.arange(bags), lengths)
    psw = torch.rand(n, generator=gen) + 0.5 if weighted else None
    return SparseGrad(ids=ids, grad_bags=torch.randn(bags, dim, generator=gen), bag=bag, psw=psw)


def _run_both(
    kind: OptimizerType, dim: int, weighted: bool, steps: int = 4
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Weights and state after ``steps`` updates by the torch code [0] and the compiled one [1]."""
    rows = 50
    config = FusedOptimizerConfig(optimizer=kind, learning_rate=LR, eps=EPS)
    start = torch.randn(rows, dim, generator=torch.Generator().manual_seed(1))
    weights = [start.clone(), start.clone()]
    states = [new_state(config, rows, dim, torch.device("cpu")) for _ in range(2)]
    for step in range(1, steps + 1):
        grad = _grad(step, rows, dim, weighted)
        for path in (0, 1):
            cpu_update.apply_cpu_update(
                config, weights[path], states[path], grad, step, compiled=bool(path)
            )
    return weights, states


@pytest.mark.usefixtures("ieee_sqrt")
@pytest.mark.parametrize("dim", [3, 8, 13, 40, 128, 200, cpu_update_jit.ROWWISE_MAX_DIM])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", COMPILED)
def test_compiled_update_equals_torch_code_bit_for_bit(
    kind: OptimizerType, weighted: bool, dim: int, compiled_calls: list[bool]
) -> None:
    weights, states = _run_both(kind, dim, weighted)
    assert compiled_calls
    assert all(compiled_calls)
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(
        weights[0], torch.randn(50, dim, generator=torch.Generator().manual_seed(1))
    )
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize("kind", COMPILED)
def test_compiled_update_close_to_torch_code_with_torchs_sqrt(kind: OptimizerType) -> None:
    weights, states = _run_both(kind, 128, True)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_prefetch_distance_does_not_change_results() -> None:
    kind = OptimizerType.ROWWISE_ADAGRAD
    config = FusedOptimizerConfig(optimizer=kind, learning_rate=LR, eps=EPS)
    grad = _grad(5, 50, 16, True)
    runs = cpu_update.group_by_row(grad)
    out = []
    for ahead in (0, 1, 4, 64):
        weight = torch.ones(50, 16)
        state = new_state(config, 50, 16, torch.device("cpu"))
        assert cpu_update_jit.run_compiled(config, weight, state, runs, grad.grad_bags, ahead=ahead)
        out.append((weight, state["sum"]))
    for weight, total in out[1:]:
        assert torch.equal(weight, out[0][0])
        assert torch.equal(total, out[0][1])


def _untouched(config: FusedOptimizerConfig, weight: torch.Tensor) -> bool:
    """run_compiled declines (returns False) and changes nothing."""
    grad = _grad(3, weight.shape[0], weight.shape[1], False)
    state = new_state(config, weight.shape[0], weight.shape[1], torch.device("cpu"))
    before = weight.clone()
    runs = cpu_update.group_by_row(grad)
    ran = cpu_update_jit.run_compiled(config, weight, state, runs, grad.grad_bags.float())
    return not ran and torch.equal(weight, before) and all(not s.any() for s in state.values())


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        (OptimizerType.ADAM, lambda: torch.randn(50, 8)),
        (OptimizerType.EXACT_ADAGRAD, lambda: torch.randn(50, 8).half()),
        (OptimizerType.ROWWISE_ADAGRAD, lambda: torch.randn(50, 8).bfloat16()),
        (OptimizerType.SGD, lambda: torch.randn(8, 50).t()),  # not contiguous
        (
            OptimizerType.ROWWISE_ADAGRAD,
            lambda: torch.randn(50, cpu_update_jit.ROWWISE_MAX_DIM + 8),
        ),
    ],
)
def test_torch_code_runs_where_there_is_no_kernel(
    kind: OptimizerType, make: Callable[[], torch.Tensor]
) -> None:
    assert _untouched(FusedOptimizerConfig(optimizer=kind, learning_rate=LR), make())


def test_torch_code_runs_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_update_jit, "update_kernels", lambda: None)
    config = FusedOptimizerConfig(optimizer=OptimizerType.EXACT_ADAGRAD, learning_rate=LR)
    assert _untouched(config, torch.randn(50, 8))
    # ...and apply_cpu_update still updates, through the torch code.
    weight = torch.zeros(50, 8)
    state = new_state(config, 50, 8, torch.device("cpu"))
    cpu_update.apply_cpu_update(config, weight, state, _grad(4, 50, 8, False), 1)
    assert weight.any()


def test_rows_out_of_range_raise() -> None:
    config = FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=LR)
    grad = SparseGrad(ids=torch.tensor([2, 50]), grad_bags=torch.ones(2, 4), bag=None, psw=None)
    with pytest.raises(IndexError, match=r"row ids must lie in \[0, 50\)"):
        cpu_update.apply_cpu_update(config, torch.zeros(50, 4), {}, grad, 1)


# Tables of four dims: one group per dim in the torch backend; tiny tables give repeated ids.
TABLES = [("a", 5, 8), ("b", 300, 8), ("c", 40, 13), ("d", 200, 128), ("e", 4, 3)]


def _kjt(seed: int, weighted: bool) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    batch = 12
    lengths = torch.randint(0, 6, (len(TABLES) * batch,), generator=gen)
    lengths[::7] = 0  # empty bags
    values = []
    for f, (_, rows, _) in enumerate(TABLES):
        n = int(lengths[f * batch : (f + 1) * batch].sum())
        values.append(torch.randint(0, rows, (n,), generator=gen))
    ids = torch.cat(values)
    weights = torch.rand(ids.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f_{name}" for name, _, _ in TABLES], values=ids, lengths=lengths, weights=weights
    )


@pytest.mark.usefixtures("ieee_sqrt")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", COMPILED)
def test_torch_backend_steps_equal_with_and_without_kernels(
    kind: OptimizerType, weighted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole steps of the torch backend (forward, backward, fused update) with the compiled
    update and with the torch code: the same weights and state, bit for bit."""
    tables = [
        TableSpec(name=n, num_embeddings=r, embedding_dim=d, data_type=DataType.FP32)
        for n, r, d in TABLES
    ]
    features = [FeatureSpec(name=f"f_{n}", table=n) for n, _, _ in TABLES]
    config = FusedOptimizerConfig(optimizer=kind, learning_rate=LR, eps=EPS)
    modules = [
        TableBatchedEmbedding(
            tables=tables,
            features=features,
            is_weighted=weighted,
            optimizer=config,
            backend="torch",
        )
        for _ in range(2)
    ]
    gen = torch.Generator().manual_seed(9)
    init = {t.name: torch.randn(t.num_embeddings, t.embedding_dim, generator=gen) for t in tables}
    for m in modules:
        m.load_table_weights(init)
    ran: list[bool] = []
    for step in range(4):
        kjt = _kjt(step, weighted)
        for module, compiled in zip(modules, (False, True), strict=True):
            # The torch code, then the compiled path with each call's answer kept.
            spy = _spy(ran) if compiled else (lambda *args, **kwargs: False)
            monkeypatch.setattr(cpu_update, "run_compiled", spy)
            out = module(kjt)
            assert isinstance(out, torch.Tensor)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(50 + step))
            torch.autograd.backward(out, grad)
    assert ran
    assert all(ran)
    for t in tables:
        w0, w1 = (m.table_weights()[t.name] for m in modules)
        assert torch.equal(w0, w1), t.name
        assert not torch.equal(w0, init[t.name]), t.name
        s0, s1 = (m.optimizer_states()[t.name] for m in modules)
        for key in s0:
            assert torch.equal(s0[key], s1[key]), (t.name, key)
