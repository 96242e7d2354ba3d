"""Can the pooled all-to-all hide behind computation here? Two gloo processes, 1 thread each.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \\
        .venv/bin/python tools/bench/overlap.py

Both ranks time, in alternating rounds (best round, median of ``--iters`` calls, each after a
barrier): the all-to-all of a DLRM step's pooled embeddings alone (``--rows`` x ``--cols`` fp32,
13.6 MB by default); ``--products`` matrix products ``2048x512 @ 512x512`` alone; the two back to
back; and the two overlapped (the all-to-all launched asynchronously before the products and waited
for after them), which is what a pipeline that hides communication would do. ``hidden`` is how
much of the all-to-all the overlap saved. Gloo moves the bytes with threads of its own, so on a
machine whose cores are busy with the products the overlap hides little.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import compare, free_port


def _worker(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    send = torch.randn(args.rows * args.cols)
    recv = torch.empty_like(send)
    x, w = torch.randn(2048, 512), torch.randn(512, 512)

    def products() -> None:
        for _ in range(args.products):
            torch.mm(x, w)

    def all_to_all() -> None:
        dist.all_to_all_single(recv, send)

    def back_to_back() -> None:
        all_to_all()
        products()

    def overlapped() -> None:
        work = dist.all_to_all_single(recv, send, async_op=True)
        products()
        assert work is not None
        work.wait()

    def paced(fn: Callable[[], None]) -> Callable[[], Callable[[], object]]:
        def factory() -> Callable[[], object]:
            def run() -> None:
                dist.barrier()
                fn()

            return run

        return factory

    contenders = {
        "all-to-all alone": all_to_all,
        "products alone": products,
        "back to back": back_to_back,
        "overlapped": overlapped,
    }
    times = compare(
        {name: paced(fn) for name, fn in contenders.items()},
        warmup=2,
        iters=args.iters,
        rounds=args.rounds,
    )
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=26 * 64)
    parser.add_argument("--products", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _worker, args=(free_port(), args, queue), nprocs=2, join=True, start_method="spawn"
    )
    times = queue.get()
    megabytes = args.rows * args.cols * 4 / 1e6
    print(
        f"2 gloo processes x 1 thread: all-to-all of {megabytes:.1f} MB per rank,"
        f" {args.products} products 2048x512 @ 512x512 (rank 0; best of {args.rounds} rounds,"
        f" median of {args.iters} calls)"
    )
    for name, seconds in times.items():
        print(f"  {name:18} {seconds * 1e3:7.2f} ms")
    hidden = times["back to back"] - times["overlapped"]
    print(
        f"  hidden: {hidden * 1e3:.2f} ms of the all-to-all's {times['all-to-all alone'] * 1e3:.2f}"
    )


if __name__ == "__main__":
    main()
