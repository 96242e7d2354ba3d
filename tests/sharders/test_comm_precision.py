"""Compressed output communication (fp16, bf16) against the same sharding in fp32, on gloo groups
of 2 processes and of 4 laid out as 2 nodes of 2.

The bound. Rounding an fp32 number ``x`` to the wire dtype gives ``x(1 + d)``, ``|d| <= u`` (the
unit roundoff: ``2**-11`` for fp16, ``2**-8`` for bf16), plus for fp16 an absolute ``2**-25``
below its normal range. A pooled output is a sum of partial sums ``p_i`` (one per rank holding
rows of the bag); each is rounded once per hop (one hop, two for the two-level types) and the
receiver adds them in fp32, so::

    |out_q - out_fp32| <= ((1 + u)**hops - 1) * sum_i |p_i| + fp32 slack
                       <= ((1 + u)**hops - 1) * A,   A = the bag's sum of |weight rows|

The loss is ``sum(rows * R)`` with a fixed ``R``, so the gradient reaching the rows is ``R`` in
both runs and each row's gradient is ``sum over bags of R`` rounded the same way: after ``S``
steps of fused SGD the tables differ by at most ``lr * ((1 + u)**hops - 1) * sum_s G_s``, ``G_s``
the gradient computed with ``|R|``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.qcomm import CommType, QCommsConfig, with_qcomms
from shardrec.distributed.sharding_plan import column_wise, row_wise, table_wise
from shardrec.testing import EMBEDDING_FQN, GlobalBatch

from ._two_level import TABLES, dims, model
from .test_grid import grid_plan
from .test_table_column_wise import make_plan as table_column_wise_plan
from .test_table_row_wise import SPEC
from .test_table_row_wise import make_plan as table_row_wise_plan

pytestmark = pytest.mark.multiprocess

STEPS = 3
LR = 0.05
Block = tuple[torch.Tensor, tuple[int, ...]]
WIDTH = sum(d * len(fs) for _, _, d, fs in TABLES)
# fp32 reassociation and update rounding, far below either wire dtype's roundoff.
FP32_SLACK = 2.0**-18


def r_matrix(step: int, sizes: list[int], rank: int | None) -> torch.Tensor:
    """The fixed gradient of the rows at ``step``: the global batch's (rank None) or a rank's."""
    g = torch.Generator().manual_seed(3000 + step)
    full = torch.randn(sum(sizes), WIDTH, generator=g)
    if rank is None:
        return full
    lo = sum(sizes[:rank])
    return full[lo : lo + sizes[rank]]


def build() -> Any:
    return model("ebc").build(seed=7)


def batch_sizes(world: int) -> list[int]:
    return [2 + r for r in range(world)]


def make_batch(step: int, sizes: list[int], rank: int | None) -> KeyedJaggedTensor:
    return GlobalBatch.random(model("ebc").feature_rows, sizes, seed=2000 + step).kjt(rank)


def local_shards(dmp: DistributedModelParallel) -> dict[str, list[Block]]:
    return {
        table: [(s.tensor.clone(), s.offsets) for s in held.weight]
        for table, held in dmp.local_table_shards()[EMBEDDING_FQN].items()
    }


def assemble(like: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
    """A tensor shaped like ``like`` from blocks at their offsets; NaN where none lies."""
    out = torch.full_like(like, float("nan"))
    for tensor, (row, col) in blocks:
        out[row : row + tensor.shape[0], col : col + tensor.shape[1]] = tensor
    return out


def case_both(env: ShardingEnv, plan: ShardingPlan, precision: str) -> Any:
    """The same steps under ``plan`` in fp32 and with pooled outputs sent in ``precision``."""
    sizes = batch_sizes(env.world_size)
    runs = {}
    for name, config in (("fp32", None), ("q", QCommsConfig.both(precision))):
        dmp = DistributedModelParallel(build(), env=env, plan=with_qcomms(plan, config))
        outputs = []
        for step in range(STEPS):
            rows, loss = dmp(make_batch(step, sizes, env.rank))
            # The head's loss rides at weight zero so that every dense parameter has a gradient.
            ((rows * r_matrix(step, sizes, env.rank)).sum() + 0.0 * loss).backward()
            outputs.append(rows.detach().clone())
            dmp.zero_grad()
        runs[name] = {"outputs": outputs, "shards": local_shards(dmp)}
    return runs


def pairs() -> list[tuple[str, str, int, int]]:
    """(table, feature, first column, dim) of each output pair, in the module's order."""
    out, col = [], 0
    for t, _, d, fs in TABLES:
        for f in fs:
            out.append((t, f, col, d))
            col += d
    return out


def bag_of_each_id(kjt: KeyedJaggedTensor, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
    jt = kjt[feature]
    bags = torch.repeat_interleave(torch.arange(jt.lengths().numel()), jt.lengths())
    return bags, jt.values()


def abs_pooled(weights: dict[str, torch.Tensor], kjt: KeyedJaggedTensor) -> torch.Tensor:
    """``A``: each output element's sum of ``|weight|`` over its bag."""
    out = torch.zeros(kjt.stride(), WIDTH)
    for t, f, col, d in pairs():
        bags, ids = bag_of_each_id(kjt, f)
        out[:, col : col + d].index_add_(0, bags, weights[t][ids].abs())
    return out


def abs_grad(kjt: KeyedJaggedTensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """``G``: each table's gradient under ``sum(rows * |R|)``."""
    out = {t: torch.zeros(rows, d) for t, (rows, d) in dims("ebc").items()}
    for t, f, col, d in pairs():
        bags, ids = bag_of_each_id(kjt, f)
        out[t].index_add_(0, ids, r[bags, col : col + d].abs())
    return out


def check(dist_pool: Any, plan: ShardingPlan, precision: str, hops: int, world: int) -> None:
    local = 2 if world == 4 else None
    results = dist_pool.run(
        world, case_both, local_world_size=local, plan=plan, precision=precision
    )
    u = CommType(precision).unit_roundoff
    factor = (1 + u) ** hops - 1 + FP32_SLACK
    tiny = hops * world * 2.0**-25  # fp16 below its normal range; 0 would do for bf16
    sizes = batch_sizes(world)
    lo = [sum(sizes[:r]) for r in range(world)]

    # Forward, first step (both runs start from the same tables).
    a = abs_pooled(build().emb.lookup.table_weights(), make_batch(0, sizes, None))
    worst = 0.0
    for r, result in enumerate(results):
        err = (result["q"]["outputs"][0] - result["fp32"]["outputs"][0]).abs()
        bound = factor * a[lo[r] : lo[r] + sizes[r]] + tiny
        assert bool((err <= bound).all()), (
            f"rank {r}: output error {float((err - bound).max())} past the bound"
        )
        worst = max(worst, float(err.max()))
    assert worst > 0, "the compressed run sent exact fp32 values: nothing was compressed"

    # Backward: the tables after the steps.
    g_sum = {t: torch.zeros(rows, d) for t, (rows, d) in dims("ebc").items()}
    for step in range(STEPS):
        full = make_batch(step, sizes, None)
        for t, g in abs_grad(full, r_matrix(step, sizes, None)).items():
            g_sum[t] += g
    start = build().emb.lookup.table_weights()
    moved = 0.0
    for t in g_sum:
        q = assemble(start[t], [b for res in results for b in res["q"]["shards"][t]])
        ref = assemble(start[t], [b for res in results for b in res["fp32"]["shards"][t]])
        bound = LR * factor * g_sum[t] + FP32_SLACK * start[t].abs() + tiny * LR
        err = (q - ref).abs()
        assert bool((err <= bound).all()), (
            f"table {t}: weight error {float((err - bound).max())} past the bound"
        )
        moved = max(moved, float(err.max()))
    assert moved > 0, "the gradients travelled in exact fp32: nothing was compressed"


def two_process_plan(kind: str) -> ShardingPlan:
    d = dims("ebc")
    if kind == "table_wise":
        plan = {t: table_wise(i % 2, *d[t]) for i, t in enumerate(d)}
    elif kind == "column_wise":
        plan = {t: column_wise(*d[t], [0, 1]) for t in d if d[t][1] > 1}
        plan["t3"] = column_wise(*d["t3"], [1, 0])
    elif kind == "row_wise":
        # Every rank holds rows of every row-wise table: the reduce-scatter path.
        plan = {t: row_wise(*d[t], 2) for t in ("t0", "t1", "t2")}
        plan["t3"] = table_wise(1, *d["t3"])
    else:
        # t3 has one row, on rank 0 only: the all-to-all-and-sum path.
        plan = {t: row_wise(*d[t], 2) for t in d}
    return ShardingPlan({"emb": plan})


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["table_wise", "column_wise", "row_wise", "row_wise_uneven"])
def test_two_processes_within_the_bound_of_fp32(dist_pool: Any, kind: str, precision: str) -> None:
    check(dist_pool, two_process_plan(kind), precision, hops=1, world=2)


TWO_LEVEL = {
    "table_row_wise": (lambda: table_row_wise_plan(SPEC), 2),
    "grid_shard": (grid_plan, 2),
    "table_column_wise": (lambda: table_column_wise_plan("ebc"), 1),
}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", sorted(TWO_LEVEL))
def test_two_nodes_of_two_within_the_bound_of_fp32(
    dist_pool: Any, kind: str, precision: str
) -> None:
    plan, hops = TWO_LEVEL[kind]
    check(dist_pool, plan(), precision, hops=hops, world=4)


def test_tables_of_one_part_must_agree() -> None:
    d = dims("ebc")
    plan = ShardingPlan({"emb": {t: table_wise(0, *d[t]) for t in d}})
    mixed = with_qcomms(plan, QCommsConfig.both("bf16"))
    tables = dict(mixed.plan["emb"])
    tables["t0"] = plan.plan["emb"]["t0"]
    with pytest.raises(ValueError, match="qcomms must agree"):
        DistributedModelParallel(
            build(), env=ShardingEnv.from_local(1, 0), plan=ShardingPlan({"emb": tables})
        )


def test_config_names_bad_precision() -> None:
    with pytest.raises(ValueError, match="forward_precision: 'fp8' is not one of fp32, fp16, bf16"):
        QCommsConfig(forward_precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"modules \['nope'\] are not in the plan"):
        with_qcomms(ShardingPlan({"emb": {}}), QCommsConfig.both("fp16"), ["nope"])


def case_sequence(env: ShardingEnv, plan: ShardingPlan, precision: str) -> Any:
    """An EmbeddingCollection under ``plan`` in fp32 and in ``precision``; the rows' gradient is
    positive, so that each table row's gradient is a sum of same-signed terms."""
    sizes = batch_sizes(env.world_size)
    runs = {}
    for name, config in (("fp32", None), ("q", QCommsConfig.both(precision))):
        dmp = DistributedModelParallel(
            model("ec").build(seed=7), env=env, plan=with_qcomms(plan, config)
        )
        outputs = []
        for step in range(STEPS):
            rows, loss = dmp(make_batch(step, sizes, env.rank))
            g = torch.Generator().manual_seed(4000 + 10 * step + env.rank)
            r = torch.rand(rows.shape, generator=g) + 0.5
            ((rows * r).sum() + 0.0 * loss).backward()
            outputs.append(rows.detach().clone())
            dmp.zero_grad()
        runs[name] = {"outputs": outputs, "shards": local_shards(dmp)}
    return runs


@pytest.mark.parametrize("kind", ["table_wise", "row_wise"])
def test_sequence_embeddings_within_the_bound_of_fp32(dist_pool: Any, kind: str) -> None:
    """One rounding per element each way: ``|out_q - out| <= u |out|``; with same-signed
    gradients, ``|w_q - w| <= u |w - w_start|`` after the steps."""
    d = dims("ec")
    if kind == "table_wise":
        plan = {t: table_wise(i % 2, *d[t]) for i, t in enumerate(d)}
    else:
        plan = {t: row_wise(*d[t], 2) for t in d}
    results = dist_pool.run(2, case_sequence, plan=ShardingPlan({"emb": plan}), precision="bf16")
    factor = CommType.BF16.unit_roundoff + FP32_SLACK
    for r, result in enumerate(results):
        ref = result["fp32"]["outputs"][0]
        err = (result["q"]["outputs"][0] - ref).abs()
        assert bool((err <= factor * ref.abs()).all()), f"rank {r}: output past the bound"
        assert float(err.max()) > 0
    start = model("ec").build(seed=7).emb.lookup.table_weights()
    for t, w0 in start.items():
        q = assemble(w0, [b for res in results for b in res["q"]["shards"][t]])
        ref = assemble(w0, [b for res in results for b in res["fp32"]["shards"][t]])
        bound = factor * (ref - w0).abs() + FP32_SLACK * w0.abs()
        assert bool(((q - ref).abs() <= bound).all()), f"table {t}: weights past the bound"


def test_torchrec_import_path_names_the_same_types() -> None:
    from shardrec.distributed import fbgemm_qcomm_codec, qcomm

    assert fbgemm_qcomm_codec.QCommsConfig is qcomm.QCommsConfig
    assert fbgemm_qcomm_codec.CommType is qcomm.CommType
    config = fbgemm_qcomm_codec.QCommsConfig(
        forward_precision=fbgemm_qcomm_codec.CommType.FP16,
        backward_precision=fbgemm_qcomm_codec.CommType.BF16,
    )
    assert (config.forward_precision.dtype, config.backward_precision.dtype) == (
        torch.float16,
        torch.bfloat16,
    )
