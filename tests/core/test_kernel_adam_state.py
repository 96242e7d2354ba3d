"""Fused Adam's step counter is an optimizer state: saved and loaded, a run resumes exactly.

Adam's bias correction divides by ``1 - beta**t``; a module that resumed with the moments but not
``t`` would apply a different update. Tables stored together (one group) share the counter.
"""

from __future__ import annotations

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.kernels import (
    FeatureSpec,
    FusedOptimizerConfig,
    OptimizerType,
    TableBatchedEmbedding,
    TableSpec,
)

# t0 and t1 share a dim (one torch group), t2 has its own: two step counters.
TABLES = [("t0", 9, 4), ("t1", 6, 4), ("t2", 5, 8)]
KEYS = ["f0", "f1", "f2"]
STEPS = 3


def make_lookup(seed: int) -> TableBatchedEmbedding:
    torch.manual_seed(seed)
    tbe = TableBatchedEmbedding(
        tables=[TableSpec(name=n, num_embeddings=r, embedding_dim=d) for n, r, d in TABLES],
        features=[FeatureSpec(name=k, table=n) for k, (n, _, _) in zip(KEYS, TABLES, strict=True)],
        optimizer=FusedOptimizerConfig(
            optimizer=OptimizerType.ADAM, learning_rate=0.05, beta1=0.8, beta2=0.9
        ),
        backend="torch",
    )
    tbe.reset_parameters()
    return tbe


def batch(seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (len(KEYS) * 3,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, rows, (int(lengths[f * 3 : (f + 1) * 3].sum()),), generator=g)
            for f, (_, rows, _) in enumerate(TABLES)
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths)


def train_step(tbe: TableBatchedEmbedding, seed: int) -> None:
    out = tbe(batch(seed))
    assert isinstance(out, torch.Tensor)
    (out * torch.arange(out.shape[1], dtype=out.dtype)).sum().backward()


def snapshot(tbe: TableBatchedEmbedding) -> dict[str, torch.Tensor]:
    out = {f"{n}.weight": w.clone() for n, w in tbe.table_weights().items()}
    for table, states in tbe.optimizer_states().items():
        out |= {f"{table}.{name}": t.clone() for name, t in states.items()}
    return out


def test_adam_step_is_an_optimizer_state_and_resumes_exactly() -> None:
    original = make_lookup(seed=0)
    for step in range(STEPS):
        train_step(original, step)
    states = {
        t: {k: v.clone() for k, v in s.items()} for t, s in original.optimizer_states().items()
    }
    for table in states:
        assert set(states[table]) == {"exp_avg", "exp_avg_sq", "step"}
        assert states[table]["step"].shape == ()
        assert states[table]["step"].dtype == torch.int64
        assert int(states[table]["step"]) == STEPS
    weights = {n: w.clone() for n, w in original.table_weights().items()}

    resumed = make_lookup(seed=1)
    resumed.load_table_weights(weights)
    resumed.load_optimizer_states(states)
    assert all(int(s["step"]) == STEPS for s in resumed.optimizer_states().values())
    # Loading only the moments leaves the counter at 0: the next update differs.
    stale = make_lookup(seed=2)
    stale.load_table_weights(weights)
    stale.load_optimizer_states(
        {t: {k: v for k, v in s.items() if k != "step"} for t, s in states.items()}
    )

    for tbe in (original, resumed, stale):
        train_step(tbe, STEPS)
    want, got, off = snapshot(original), snapshot(resumed), snapshot(stale)
    assert want.keys() == got.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert int(want["t0.step"]) == STEPS + 1
    assert not torch.equal(off["t0.weight"], want["t0.weight"])


def test_tables_of_one_group_share_the_step() -> None:
    tbe = make_lookup(seed=0)
    tbe.load_optimizer_states({"t0": {"step": torch.tensor(7)}})
    steps = {t: int(s["step"]) for t, s in tbe.optimizer_states().items()}
    assert steps == {"t0": 7, "t1": 7, "t2": 0}
    with pytest.raises(ValueError, match="'t0' and 't1' share one Adam step counter"):
        tbe.load_optimizer_states(
            {"t0": {"step": torch.tensor(2)}, "t1": {"step": torch.tensor(3)}}
        )


def test_reset_parameters_zeroes_the_step() -> None:
    tbe = make_lookup(seed=0)
    train_step(tbe, 0)
    assert int(tbe.optimizer_states()["t2"]["step"]) == 1
    tbe.reset_parameters()
    assert all(int(s["step"]) == 0 for s in tbe.optimizer_states().values())
