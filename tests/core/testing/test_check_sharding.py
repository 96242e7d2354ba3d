"""``check_sharding`` catches a wrong sharder, naming the table, rank, step and size of the error;
and passes the same sharder when it is right."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from shardrec.distributed import LocalShard, ParameterSharding, ShardingEnv, TableShards
from shardrec.testing import EmbeddingModel, EquivalenceError, WorkerPool, check_sharding

pytestmark = pytest.mark.multiprocess

TABLES = [
    EmbeddingBagConfig(name="t0", num_embeddings=7, embedding_dim=4, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", num_embeddings=5, embedding_dim=4, feature_names=["f1"]),
]
MODEL = EmbeddingModel(
    tables=TABLES, fused_params={"optimizer": "rowwise_adagrad", "learning_rate": 0.1}
)


class _Copy(nn.Module):
    def __init__(
        self,
        module: EmbeddingBagCollection,
        bump: Mapping[str, float],
        with_state: bool,
        replicated: bool,
        grads: Mapping[str, float | None],
    ) -> None:
        super().__init__()
        self.with_state = with_state
        self.replicated = replicated
        self.copy = copy.deepcopy(module)
        for table, by in bump.items():
            with torch.no_grad():
                self.copy.lookup.table_weights()[table].add_(by)
        params = dict(self.copy.lookup.named_table_parameters())
        for table, scale in grads.items():
            if scale is None:
                params[table].register_post_accumulate_grad_hook(_drop_grad)  # type: ignore[no-untyped-call]
            else:
                scaled = functools.partial(torch.mul, other=scale)
                params[table].register_hook(scaled)  # type: ignore[no-untyped-call]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        out: KeyedTensor = self.copy(kjt)
        return out

    def local_table_shards(self) -> dict[str, TableShards]:
        states = self.copy.lookup.optimizer_states()
        return {
            name: TableShards(
                weight=[LocalShard(w, (0, 0), tuple(w.shape))],
                optimizer_state={
                    k: [LocalShard(s, (0,), tuple(s.shape))] for k, s in states[name].items()
                }
                if self.with_state
                else {},
                replicated=self.replicated,
            )
            for name, w in self.copy.lookup.table_weights().items()
        }


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


class CopySharder:
    """One whole copy of the module on each rank (right at world size 1), with ``bump`` added to
    some tables' weights (a bug in one table), without its optimizer state in
    ``local_table_shards`` unless ``with_state`` (a bug checkpoints show), not marked as
    replicas unless ``replicated`` (so that its copies overlap in a checkpoint), and with the
    gradient of plain tables scaled by ``grads[table]`` (None: dropped)."""

    def __init__(
        self,
        bump: Mapping[str, float],
        with_state: bool = True,
        replicated: bool = True,
        grads: Mapping[str, float | None] | None = None,
    ) -> None:
        self.bump = dict(bump)
        self.with_state = with_state
        self.replicated = replicated
        self.grads = dict(grads or {})

    @property
    def module_type(self) -> type[nn.Module]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return ["whole_copy"]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return ["fused"]

    def storage_usage(self, tensor: torch.Tensor, dt: str, kernel: str) -> dict[str, int]:
        return {"ddr": tensor.numel() * tensor.element_size()}

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        assert isinstance(module, EmbeddingBagCollection)
        return _Copy(module, self.bump, self.with_state, self.replicated, self.grads)


def test_a_right_sharder_passes(dist_pool: WorkerPool) -> None:
    report = check_sharding(
        MODEL, sharding_type="whole_copy", sharders=[CopySharder({})], world_size=1, pool=dist_pool
    )
    assert report.ok
    # 3 steps of outputs and dense gradients; weights and two states... of two tables.
    assert len(report.checked) >= 3 * 2 + 2 * 2
    assert "matches the unsharded module" in str(report)


def test_a_wrong_table_is_named(dist_pool: WorkerPool) -> None:
    with pytest.raises(EquivalenceError) as caught:
        check_sharding(
            MODEL,
            sharding_type="whole_copy",
            sharders=[CopySharder({"t1": 0.25})],
            world_size=1,
            pool=dist_pool,
        )
    report = caught.value.report
    weights = [m for m in report.mismatches if m.what == "weight"]
    assert {m.table for m in weights} == {"t1"}
    assert weights[0].rank == 0
    assert weights[0].max_abs_diff is not None
    assert weights[0].max_abs_diff > 0.1
    outputs = [m for m in report.mismatches if m.what == "output"]
    assert outputs
    assert outputs[0].step == 0
    message = str(caught.value)
    assert "whole_copy of an EmbeddingBagCollection at world size 1" in message
    assert "weight differs (trained at world size 1; table t1, rank 0): max abs diff" in message
    assert "table t0" not in message


def test_a_plan_or_a_sharding_type_not_both() -> None:
    with pytest.raises(ValueError, match="exactly one of plan= and sharding_type="):
        check_sharding(MODEL, world_size=1)


def test_optimizer_state_left_out_of_checkpoints_is_found(dist_pool: WorkerPool) -> None:
    report = check_sharding(
        MODEL,
        sharding_type="whole_copy",
        sharders=[CopySharder({}, with_state=False)],
        world_size=1,
        reload_world_size=2,
        pool=dist_pool,
        raise_on_mismatch=False,
    )
    assert not [m for m in report.mismatches if m.what in ("output", "weight")]
    found = {(m.what, m.phase, m.table) for m in report.mismatches}
    for table in ("t0", "t1"):
        # Training is right, but the state is not reported, so not saved: the unsharded module
        # that loads the checkpoint keeps its own.
        assert ("optimizer state 'sum'", "trained at world size 1", table) in found
        lost = ("optimizer state 'sum'", "saved at world size 1, loaded unsharded", table)
        assert lost in found


def test_a_checkpoint_that_does_not_load_is_a_difference(dist_pool: WorkerPool) -> None:
    # Copies not marked as replicas overlap in the checkpoint, and the state keys are missing.
    report = check_sharding(
        MODEL,
        sharding_type="whole_copy",
        sharders=[CopySharder({}, with_state=False, replicated=False)],
        world_size=1,
        reload_world_size=2,
        pool=dist_pool,
        raise_on_mismatch=False,
    )
    failed = [m for m in report.mismatches if m.what == "checkpoint"]
    assert (failed[0].phase, failed[0].rank) == ("saved at world size 1, loaded unsharded", None)
    assert "emb.embedding_bags.t0.weight.sum" in failed[0].detail
    assert "is missing from checkpoint" in failed[0].detail
    assert {m.phase for m in failed[1:]} == {"saved at world size 1, loaded at world size 2"}
    assert {m.rank for m in failed[1:]} == {0, 1}
    assert all("load failed" in m.detail and "overlap" in m.detail for m in failed[1:])
    assert "checkpoint differs (saved at world size 1, loaded unsharded)" in str(report)
    # Reported by the ranks, not raised: the shared workers stay up for the next test.
    assert dist_pool.started
