"""The output distribution's asynchronous collectives (``async_comm.start_all_to_all_single``,
``start_reduce_scatter_rows``) give what the blocking ones of ``comm`` give, forward and
backward, with and without compressed wire dtypes, on gloo."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec.distributed import ShardingEnv, comm
from shardrec.distributed.async_comm import start_all_to_all_single, start_reduce_scatter_rows
from shardrec.distributed.qcomm import CommType, QCommsConfig

pytestmark = pytest.mark.multiprocess

BF16 = QCommsConfig(forward_precision=CommType.BF16, backward_precision=CommType.FP16)


def _rows(src: int, dst: int) -> int:
    return (src + 2 * dst) % 3  # uneven, sometimes zero


def _both(fn_blocking: Any, fn_async: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, fn in (("blocking", fn_blocking), ("async", fn_async)):
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        (y * torch.arange(1.0, y.numel() + 1).view_as(y)).sum().backward()
        assert leaf.grad is not None
        out[f"{name}_y"], out[f"{name}_grad"] = y.detach(), leaf.grad
    return out


def case_all_to_all(env: ShardingEnv, compressed: bool) -> dict[str, torch.Tensor]:
    w, r = env.world_size, env.rank
    in_rows = [_rows(r, d) for d in range(w)]
    out_rows = [_rows(s, r) for s in range(w)]
    x = torch.randn(sum(in_rows), 3, generator=torch.Generator().manual_seed(r))
    q = BF16 if compressed else None
    return _both(
        lambda t: comm.all_to_all_single(t, out_rows, in_rows, env.pg, qcomms=q),
        lambda t: start_all_to_all_single(t, out_rows, in_rows, env.pg, qcomms=q).wait(),
        x,
    )


def case_reduce_scatter(env: ShardingEnv, equal: bool) -> dict[str, torch.Tensor]:
    # Equal blocks take the native reduce-scatter, unequal ones (rank 0 receives one row more)
    # the all-to-all and a local sum; every rank passes the same block sizes.
    sizes = [2 + (not equal and d == 0) for d in range(env.world_size)]
    x = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(env.rank))
    rows = sizes[env.rank]
    return _both(
        lambda t: comm.reduce_scatter_rows(t, sizes, rows, env.pg),
        lambda t: start_reduce_scatter_rows(t, sizes, rows, env.pg).wait(),
        x,
    )


def _same(results: list[dict[str, torch.Tensor]]) -> None:
    for res in results:
        torch.testing.assert_close(res["async_y"], res["blocking_y"], rtol=0, atol=0)
        torch.testing.assert_close(res["async_grad"], res["blocking_grad"], rtol=0, atol=0)


@pytest.mark.parametrize("compressed", [False, True], ids=["fp32", "bf16"])
def test_async_all_to_all_equals_the_blocking_one(dist_pool: Any, compressed: bool) -> None:
    _same(dist_pool.run(3, case_all_to_all, compressed=compressed))


@pytest.mark.parametrize("equal", [True, False], ids=["native", "all_to_all"])
def test_async_reduce_scatter_equals_the_blocking_one(dist_pool: Any, equal: bool) -> None:
    _same(dist_pool.run(3, case_reduce_scatter, equal=equal))
