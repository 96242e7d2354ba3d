"""``check_sharding`` catches a wrong sharder, naming the table, rank, step and size of the error;
and passes the same sharder when it is right."""

from __future__ import annotations

import copy
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
    def __init__(self, module: EmbeddingBagCollection, bump: Mapping[str, float]) -> None:
        super().__init__()
        self.copy = copy.deepcopy(module)
        for table, by in bump.items():
            with torch.no_grad():
                self.copy.lookup.table_weights()[table].add_(by)

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
                },
            )
            for name, w in self.copy.lookup.table_weights().items()
        }


class CopySharder:
    """One whole copy of the module on each rank (right at world size 1), with ``bump`` added to
    some tables' weights: a sharder with a bug in one table."""

    def __init__(self, bump: Mapping[str, float]) -> None:
        self.bump = dict(bump)

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
        return _Copy(module, self.bump)


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
