"""The collectives of ``shardrec.distributed.comm`` on gloo, forward and backward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec.distributed import ShardingEnv, comm

pytestmark = pytest.mark.multiprocess


def _rows_for(src: int, dst: int) -> int:
    return (src + 2 * dst) % 3  # uneven, sometimes zero


def case_all_to_all(env: ShardingEnv) -> dict[str, Any]:
    w, r = env.world_size, env.rank
    in_rows = [_rows_for(r, d) for d in range(w)]
    out_rows = [_rows_for(s, r) for s in range(w)]
    # Row j of the block for d encodes (src, dst, j).
    x = torch.cat(
        [
            torch.tensor([[100.0 * r + 10 * d + j, 1.0] for j in range(n)]).view(n, 2)
            for d, n in enumerate(in_rows)
        ]
    ).requires_grad_()
    y = comm.all_to_all_single(x, out_rows, in_rows, env.pg)
    (y * torch.arange(1, y.shape[0] + 1, dtype=y.dtype).unsqueeze(1)).sum().backward()
    assert x.grad is not None
    return {"y": y.detach(), "grad": x.grad, "out_rows": out_rows}


def case_jagged(env: ShardingEnv) -> dict[str, Any]:
    w, r = env.world_size, env.rank
    lengths = [torch.tensor([d + 1, r], dtype=torch.int32) for d in range(w)]
    values = [torch.arange(int(lp.sum())) + 1000 * r for lp in lengths]
    weights = torch.cat([v.float() for v in values]).requires_grad_()
    res = comm.all_to_all_jagged(
        torch.cat(lengths),
        torch.cat(values),
        weights,
        lengths_per_rank=[2] * w,
        values_per_rank=[int(lp.sum()) for lp in lengths],
        batch_size=2 + r,
        pg=env.pg,
    )
    assert res.weights is not None
    res.weights.sum().backward()
    return {
        "lengths": res.lengths,
        "values": res.values,
        "weights": res.weights.detach(),
        "batch": res.batch_per_rank,
        "grad": weights.grad,
    }


def case_reduce_scatter(env: ShardingEnv) -> dict[str, Any]:
    w, r = env.world_size, env.rank
    x = torch.full((3 * w, 2), float(r + 1)) * torch.arange(3 * w).unsqueeze(1)
    x.requires_grad_()
    y = comm.reduce_scatter_rows(x, [3] * w, 3, env.pg)
    (y * (r + 1)).sum().backward()
    return {"y": y.detach(), "grad": x.grad}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_all_to_all_routes_rows_and_gradients(dist_pool: Any, world_size: int) -> None:
    results = dist_pool.run(world_size, case_all_to_all)
    for r, res in enumerate(results):
        expected = [
            100.0 * s + 10 * r + j for s in range(world_size) for j in range(_rows_for(s, r))
        ]
        assert res["y"][:, 0].tolist() == expected
        # The gradient of a row is the position (1-based) it took at its receiver.
        for d in range(world_size):
            before = sum(_rows_for(s, d) for s in range(r))
            got = res["grad"][sum(_rows_for(r, k) for k in range(d)) :][: _rows_for(r, d), 0]
            assert got.tolist() == [before + j + 1.0 for j in range(_rows_for(r, d))]


@pytest.mark.parametrize("world_size", [2, 4])
def test_jagged_all_to_all(dist_pool: Any, world_size: int) -> None:
    results = dist_pool.run(world_size, case_jagged)
    for r, res in enumerate(results):
        assert res["batch"] == [2 + s for s in range(world_size)]
        assert res["lengths"].tolist() == [x for s in range(world_size) for x in (r + 1, s)]
        expected = [v + 1000 * s for s in range(world_size) for v in range(r + 1 + s)]
        assert res["values"].tolist() == expected
        assert res["weights"].tolist() == [float(v) for v in expected]
        assert torch.equal(res["grad"], torch.ones_like(res["grad"]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_reduce_scatter_on_gloo(dist_pool: Any, world_size: int) -> None:
    results = dist_pool.run(world_size, case_reduce_scatter)
    total = sum(s + 1 for s in range(world_size))
    for r, res in enumerate(results):
        rows = torch.arange(3 * r, 3 * r + 3, dtype=torch.float32).unsqueeze(1).expand(3, 2)
        assert torch.equal(res["y"], rows * total)
        # Every contributor gets back the gradient of the block it sent to rank d: d + 1.
        expected = torch.cat([torch.full((3, 2), float(d + 1)) for d in range(world_size)])
        assert torch.equal(res["grad"], expected)


def test_single_process_collectives_are_identity() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    assert comm.all_to_all_single(x, [5], [5], None) is x
    assert comm.reduce_scatter_rows(x, [5], 5, None) is x


def _single_owner_model() -> torch.nn.Module:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig

    torch.manual_seed(7)
    configs = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=5 + i, embedding_dim=4, feature_names=[f])
        for i, f in enumerate(["f0", "f1", "f2"])
    ]
    return EmbeddingBagCollection(
        tables=configs, fused_params={"optimizer": "sgd", "learning_rate": 0.1}
    )


def _sizes(world: int, equal: bool) -> list[int]:
    return [3 if equal else 2 + r for r in range(world)]


def _single_owner_batch(rank: int | None, world: int, equal: bool = False) -> Any:
    from shardrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(5)
    sizes = _sizes(world, equal)
    lengths = torch.randint(0, 3, (3, sum(sizes)), generator=g)
    ids = [torch.randint(0, 5, (int(n),), generator=g) for n in lengths.reshape(-1)]
    lo, hi = (0, sum(sizes)) if rank is None else (sum(sizes[:rank]), sum(sizes[: rank + 1]))
    values = torch.cat(
        [
            torch.cat(
                [*ids[k * sum(sizes) + lo : k * sum(sizes) + hi], torch.zeros(0, dtype=torch.int64)]
            )
            for k in range(3)
        ]
    )
    return KeyedJaggedTensor(
        keys=["f0", "f1", "f2"], values=values, lengths=lengths[:, lo:hi].reshape(-1)
    )


def case_sharded(env: ShardingEnv, how: str, equal: bool) -> dict[str, Any]:
    """``tw``: every table on rank 0, so the output needs no reordering (the no-copy path) on
    any rank. ``rw``: every table on every rank; equal batches sum partial bags by reduce-scatter.
    """
    from shardrec.distributed import DistributedModelParallel, ShardingPlan
    from shardrec.distributed.sharding_plan import row_wise, table_wise

    model = _single_owner_model()
    w = env.world_size
    plan = ShardingPlan(
        {
            "": {
                f"t{i}": table_wise(0, 5 + i, 4) if how == "tw" else row_wise(5 + i, 4, w)
                for i in range(3)
            }
        }
    )
    dmp = DistributedModelParallel(model, env=env, plan=plan)
    out = dmp(_single_owner_batch(env.rank, w, equal))
    coef = torch.arange(1.0, out.values().numel() + 1).view_as(out.values())
    (out.values() * coef).sum().backward()
    shards = dmp.local_table_shards()[""]
    weights = {t: [(s.tensor.clone(), s.offsets) for s in ts.weight] for t, ts in shards.items()}
    return {"out": out.values().detach(), "weights": weights}


@pytest.mark.parametrize(
    ("world_size", "how", "equal"),
    [(1, "tw", False), (2, "tw", False), (2, "rw", True), (3, "rw", True), (2, "rw", False)],
)
def test_sharded_lookup_matches_unsharded(
    dist_pool: Any, world_size: int, how: str, equal: bool
) -> None:
    results = dist_pool.run(world_size, case_sharded, how=how, equal=equal)
    ref = _single_owner_model()
    out = ref(_single_owner_batch(None, world_size, equal)).values()
    sizes = _sizes(world_size, equal)
    coefs = [torch.arange(1.0, b * out.shape[1] + 1).view(b, -1) for b in sizes]
    (out * torch.cat(coefs)).sum().backward()
    for r, res in enumerate(results):
        torch.testing.assert_close(res["out"], torch.split(out.detach(), sizes)[r])
    for table, weight in ref.lookup.table_weights().items():
        rebuilt = torch.full_like(weight, float("nan"))
        for res in results:
            for tensor, (row, col) in res["weights"][table]:
                rebuilt[row : row + tensor.shape[0], col : col + tensor.shape[1]] = tensor
        torch.testing.assert_close(rebuilt, weight)
        if how == "tw":
            assert all(not res["weights"][table] for res in results[1:])


def case_reduce_scatter_uneven(env: ShardingEnv) -> dict[str, Any]:
    """Rank ``d`` receives ``d + 1`` rows from each rank: the all-to-all fallback."""
    w, r = env.world_size, env.rank
    in_rows = [d + 1 for d in range(w)]
    x = (torch.arange(float(sum(in_rows))) + 100 * r).unsqueeze(1).requires_grad_()
    y = comm.reduce_scatter_rows(x, in_rows, r + 1, env.pg)
    (y * (r + 1)).sum().backward()
    return {"y": y.detach(), "grad": x.grad}


def test_reduce_scatter_uneven_blocks(dist_pool: Any) -> None:
    w = 3
    results = dist_pool.run(w, case_reduce_scatter_uneven)
    for r, res in enumerate(results):
        start = sum(d + 1 for d in range(r))
        expected = sum(torch.arange(start, start + r + 1.0) + 100 * s for s in range(w))
        assert torch.equal(res["y"], expected.unsqueeze(1))
        grad = torch.cat([torch.full((d + 1, 1), float(d + 1)) for d in range(w)])
        assert torch.equal(res["grad"], grad)
