"""DistributedModelParallel itself: discovery, planning, nested meta modules, errors.

With no plan DMP asks the planner; ``default_plan`` is the simple rule it had before.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
)
from shardrec.distributed.default_plan import default_plan
from shardrec.distributed.plugins import load_sharder_registry
from shardrec.distributed.sharding_plan import data_parallel, row_wise, table_wise

pytestmark = pytest.mark.multiprocess


def _ebc(device: str = "cpu") -> EmbeddingBagCollection:
    torch.manual_seed(7)
    return EmbeddingBagCollection(
        device=device,
        tables=[
            EmbeddingBagConfig(
                name="big", num_embeddings=1000, embedding_dim=8, feature_names=["a"]
            ),
            EmbeddingBagConfig(name="s1", num_embeddings=10, embedding_dim=8, feature_names=["b"]),
            EmbeddingBagConfig(name="s2", num_embeddings=20, embedding_dim=8, feature_names=["c"]),
        ],
        fused_params={"optimizer": "sgd", "learning_rate": 0.1},
    )


class Nested(nn.Module):
    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.sparse = nn.ModuleDict({"inner": _ebc(device)})
        self.over = nn.Linear(24, 1, device=device)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out: torch.Tensor = self.over(self.sparse["inner"](kjt).values())
        return out


def _kjt(rank: int) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["a", "b", "c"],
        values=torch.tensor([1 + rank, 999, 3, 9, 19]),
        lengths=torch.tensor([2, 0, 1, 1, 1, 0]),
    )


def case_nested_meta_default_plan(env: ShardingEnv) -> dict[str, Any]:
    model = DistributedModelParallel(Nested(device="meta"), env=env)
    out = model(_kjt(env.rank))
    out.sum().backward()
    return {
        "plan": str(model.plan),
        "types": {t: ps.sharding_type for t, ps in model.plan.plan["sparse.inner"].items()},
        "shape": tuple(out.shape),
        "on_meta": any(p.is_meta for p in model.parameters()),
        "dense_grad": model.module.over.weight.grad is not None,
    }


def test_nested_meta_module_with_the_default_plan(dist_pool: Any) -> None:
    results = dist_pool.run(2, case_nested_meta_default_plan)
    for res in results:
        assert set(res["types"]) == {"big", "s1", "s2"}
        assert set(res["types"].values()) <= {t.value for t in ShardingType}
        assert res["shape"] == (2, 1)
        assert not res["on_meta"]
        assert res["dense_grad"]
        assert f"sparse.inner  big    {res['types']['big']}" in res["plan"]
    assert results[0]["plan"] == results[1]["plan"]


def test_default_plan_spreads_small_tables() -> None:
    sharders = load_sharder_registry().sharders()
    plan = default_plan(_ebc("meta"), sharders, ShardingEnv.from_local(2, 0), torch.device("cpu"))
    tables = plan.plan[""]
    assert tables["big"] == row_wise(1000, 8, 2)
    assert {tables["s1"].ranks, tables["s2"].ranks} == {(0,), (1,)}
    single = default_plan(_ebc("meta"), sharders, ShardingEnv.from_local(1, 0), torch.device("cpu"))
    assert all(ps == table_wise(0, *_shape(t)) for t, ps in single.plan[""].items())


def _shape(table: str) -> tuple[int, int]:
    return {"big": (1000, 8), "s1": (10, 8), "s2": (20, 8)}[table]


def test_plan_prints_a_table() -> None:
    plan = ShardingPlan({"m": {"t": table_wise(1, 4, 2), "u": row_wise(5, 2, 2)}})
    lines = str(plan).splitlines()
    assert lines[0].split() == ["module", "table", "sharding", "type", "kernel", "ranks"]
    assert lines[2].split() == ["m", "t", "table_wise", "fused", "1"]
    assert lines[3].split() == ["m", "u", "row_wise", "fused", "0,1"]


def test_single_process_without_a_group_matches_unsharded() -> None:
    ebc = _ebc()
    reference = _ebc()
    model = DistributedModelParallel(ebc, env=ShardingEnv.from_local(1, 0))
    kjt = _kjt(0)
    out = model(kjt)
    assert isinstance(out, KeyedTensor)
    assert out.keys() == ["a", "b", "c"]
    torch.testing.assert_close(out.values(), reference(kjt).values())


def test_data_parallel_table_of_a_module_with_a_stateful_fused_optimizer() -> None:
    # Data-parallel tables are trained by the module's fused optimizer (row-wise Adagrad here),
    # state included, as the unsharded module trains them; no .grad is left for a dense optimizer.
    def ebc() -> EmbeddingBagCollection:
        torch.manual_seed(7)
        return EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="t", num_embeddings=10, embedding_dim=4, feature_names=["a"]
                )
            ],
            fused_params={"optimizer": "rowwise_adagrad", "learning_rate": 0.1},
        )

    plan = ShardingPlan({"": {"t": data_parallel(10, 4, 1)}})
    model = DistributedModelParallel(ebc(), env=ShardingEnv.from_local(1, 0), plan=plan)
    reference = ebc()
    kjt = KeyedJaggedTensor(
        keys=["a"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1])
    )
    torch.testing.assert_close(model(kjt).values(), reference(kjt).values())
    model(kjt).values().sum().backward()
    reference(kjt).values().sum().backward()
    assert not [p.grad for p in model.parameters() if p.grad is not None]
    shards = model.local_table_shards()[""]["t"]
    torch.testing.assert_close(shards.weight[0].tensor, reference.lookup.table_weights()["t"])
    torch.testing.assert_close(
        shards.optimizer_state["sum"][0].tensor, reference.lookup.optimizer_states()["t"]["sum"]
    )


def test_bad_plans_are_named() -> None:
    env = ShardingEnv.from_local(1, 0)
    with pytest.raises(ValueError, match=r"names module 'nope'"):
        DistributedModelParallel(_ebc(), env=env, plan=ShardingPlan({"nope": {}}))
    with pytest.raises(ValueError, match=r"tables \['s1', 's2'\] have no sharding"):
        DistributedModelParallel(
            _ebc(), env=env, plan=ShardingPlan({"": {"big": table_wise(0, 1000, 8)}})
        )
    weird = ParameterSharding(sharding_type="diagonal", compute_kernel="fused", ranks=(0,))
    plan = ShardingPlan({"": {"big": weird, "s1": weird, "s2": weird}})
    with pytest.raises(ValueError, match=r"no sharder offers sharding type 'diagonal'"):
        DistributedModelParallel(_ebc(), env=env, plan=plan)
    plan = ShardingPlan({"": {t: table_wise(3, *_shape(t)) for t in ("big", "s1", "s2")}})
    with pytest.raises(ValueError, match=r"ranks \[3\] outside world size 1"):
        DistributedModelParallel(_ebc(), env=env, plan=plan)


def test_sharding_types_are_strings() -> None:
    assert ShardingType.ROW_WISE == "row_wise"
    assert table_wise(0, 3, 2).sharding_type == "table_wise"
