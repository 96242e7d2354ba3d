"""How fast could a training step be here? The step's unavoidable work, timed alone, beside both
libraries' whole steps in the same run.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \\
        .venv/bin/python tools/bench/floor.py --workload dlrm dlrm2 dmp --threads 1 2
    # dlrm: dlrm.py's one-process step at each --threads; dlrm2: dlrm.py's two-process step;
    # dmp: dmp.py's table-wise step; two-process workloads run 2 gloo processes, 1 thread each

The floor of a step is the sum of the parts every implementation of the same model must run:

- the dense layers' matrix products: each ``Linear``'s forward ``addmm`` and its two backward
  products (weight gradient, and input gradient wherever the input needs one), with the step's
  shapes, as bare ``torch`` calls (no bias gradient, no activation, no loss);
- for DLRM: the dot interaction's two batched products (every pair's dot product forward,
  one product of the pair gradients with the vectors backward);
- the embedding lookup, forward and backward with the fused SGD update, as one FBGEMM-backed
  ``shardrec`` call (the kernel TorchRec calls too), on the step's tables and ids;
- on two processes: the pooled embeddings' all-to-all forward and backward, as bare
  ``all_to_all_single`` calls of the step's sizes (the transport both libraries use).

Everything else a step does (activations, interaction, loss, column reordering, Python) is left
out, so ``TorchRec step / floor`` bounds what any implementation can gain over TorchRec here:
a speed target above it cannot be met on this machine by doing the same arithmetic. On two
processes the parts are timed with both ranks running them at once, as they do in a step; a
second floor leaves the all-to-alls out (a step that hid every byte of communication behind its
computation); and the local parts are timed again on rank 0 while rank 1 idles, to show how much
two processes computing at once slow each other down on this machine (taking turns would not
help: it leaves one core idle, which costs more than the slowdown).
Components and both libraries' steps are timed in alternating rounds (best round of each, median
of ``--iters``).
Like kjt.py, it re-runs itself in ``.venv-peer`` when this interpreter has no TorchRec.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import compare, free_port, peer_available, run_peer

Factory = Callable[[], Callable[[], object]]
#: The one part of a two-process floor that is communication, not computation.
ALL_TO_ALL = "pooled all-to-all fwd+bwd"


def _gemm_chain(batch: int, widths: Sequence[int], input_grad: bool) -> Factory:
    """The products of a ``Linear`` stack ``widths[0] -> ... -> widths[-1]``, forward and
    backward."""

    def factory() -> Callable[[], object]:
        gen = torch.Generator().manual_seed(0)
        layers = []
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            x = torch.randn(batch, fan_in, generator=gen)
            w = torch.randn(fan_out, fan_in, generator=gen)
            b = torch.randn(fan_out, generator=gen)
            g = torch.randn(batch, fan_out, generator=gen)
            layers.append((x, w, b, g, input_grad or index > 0))

        def run() -> None:
            for x, w, b, _, _ in layers:
                torch.addmm(b, x, w.t())
            for x, w, _, g, needs_input_grad in reversed(layers):
                torch.mm(g.t(), x)
                if needs_input_grad:
                    torch.mm(g, w)

        return run

    return factory


def _interaction(batch: int, vectors: int, dim: int) -> Factory:
    """DLRM's pairwise dot products: the Gram matrix forward, the vectors' gradient backward."""

    def factory() -> Callable[[], object]:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(batch, vectors, dim, generator=gen)
        g = torch.randn(batch, vectors, vectors, generator=gen)

        def run() -> None:
            torch.bmm(v, v.transpose(1, 2))
            torch.bmm(g, v)

        return run

    return factory


def _lookup(rows: Sequence[int], dim: int, batch: int, seed: int) -> Factory:
    """Forward and backward (fused SGD) of one table-batched lookup, one id per bag."""
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    keys = [f"f{i}" for i in range(len(rows))]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t{i}", num_embeddings=r, embedding_dim=dim, feature_names=[k])
            for i, (k, r) in enumerate(zip(keys, rows, strict=True))
        ],
        fused_params={"optimizer": "sgd", "learning_rate": 0.01},
        backend="fbgemm",
    )
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, r, (batch,), generator=gen) for r in rows])
    kjt = KeyedJaggedTensor(
        keys=keys, values=ids, lengths=torch.ones(len(rows) * batch, dtype=torch.int32)
    )
    grad = torch.randn(batch, dim * len(rows), generator=gen)

    def factory() -> Callable[[], object]:
        def run() -> None:
            ebc(kjt).values().backward(grad)

        return run

    return factory


def _step(step: Callable[..., None], batches: list[Any]) -> Factory:
    def factory() -> Callable[[], object]:
        cycle = itertools.cycle(batches)

        def run() -> None:
            step(*next(cycle))

        return run

    return factory


def _dlrm_floor(table_rows: Sequence[int], lookup_batch: int) -> dict[str, Factory]:
    """The computing parts of dlrm.py's step: the rank looks up ``lookup_batch`` bags of each of
    ``table_rows``."""
    import dlrm

    over_in = dlrm.DIM + (len(dlrm.TABLE_ROWS) + 1) * len(dlrm.TABLE_ROWS) // 2
    return {
        "dense arch GEMMs": _gemm_chain(dlrm.BATCH, (13, *dlrm.DENSE), input_grad=False),
        "over arch GEMMs": _gemm_chain(dlrm.BATCH, (over_in, *dlrm.OVER), input_grad=True),
        "interaction products": _interaction(dlrm.BATCH, len(dlrm.TABLE_ROWS) + 1, dlrm.DIM),
        "lookup fwd+bwd (FBGEMM)": _lookup(table_rows, dlrm.DIM, lookup_batch, 0),
    }


def _report(
    title: str,
    times: dict[str, float],
    floor_parts: Sequence[str],
    alone: dict[str, float] | None = None,
) -> None:
    """Prints the parts, the floor and the ratios; ``alone``: the local parts timed on rank 0
    while rank 1 idled (two processes), which gives a second, lower floor."""
    floor = sum(times[p] for p in floor_parts)
    print(title)
    print(f"  floor = {' + '.join(floor_parts)}")
    for name, seconds in times.items():
        extra = f"   alone: {alone[name] * 1e3:6.1f} ms" if alone and name in alone else ""
        print(f"  {name:34} {seconds * 1e3:8.1f} ms{extra}")
    print(f"  {'floor':34} {floor * 1e3:8.1f} ms")
    tr, ours = times.get("TorchRec step"), times.get("shardrec step")
    if tr is not None:
        print(f"  TorchRec step / floor: {tr / floor:.2f}x (the most any step could gain)")
    hidden = sum(times[p] for p in floor_parts if p != ALL_TO_ALL)
    if hidden < floor:
        print(f"  {'floor, communication hidden':34} {hidden * 1e3:8.1f} ms")
        if tr is not None:
            print(
                f"  TorchRec step / that floor: {tr / hidden:.2f}x (every byte sent during compute)"
            )
    if alone:
        low = sum(alone.get(p, times[p]) for p in floor_parts if p != ALL_TO_ALL)
        print(f"  {'local parts, rank 0 alone':34} {low * 1e3:8.1f} ms")
    if tr is not None and ours is not None:
        print(f"  TorchRec step / shardrec step: {tr / ours:.2f}x")


def _dlrm(args: argparse.Namespace) -> None:
    import dlrm

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
        LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
    )  # fmt: skip
    dist.init_process_group("gloo", rank=0, world_size=1)
    batches = dlrm._synthetic_batches(0, 4)
    floor = _dlrm_floor(dlrm.TABLE_ROWS, dlrm.BATCH)
    factories = {**floor, "shardrec step": _step(dlrm._shardrec_step(1), batches)}
    if args.peer:
        factories["TorchRec step"] = _step(dlrm._torchrec_step(1), batches)
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        times = compare(factories, warmup=2, iters=args.iters, rounds=args.rounds)
        _report(
            f"dlrm, 1 process, {threads} thread(s), batch {dlrm.BATCH} "
            f"(best of {args.rounds} rounds, median of {args.iters} calls)",
            times,
            list(floor),
        )
    dist.destroy_process_group()


def _all_to_all(numel: int) -> Factory:
    def factory() -> Callable[[], object]:
        send = torch.randn(numel)

        def run() -> None:
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)

        return run

    return factory


def _dmp_parts(rank: int, peer: bool) -> tuple[str, dict[str, Factory], list[str]]:
    import dmp

    batches = dmp._synthetic_batches(rank, 4)
    floor = {
        "over arch GEMMs": _gemm_chain(dmp.BATCH, (dmp.DIM * len(dmp.ROWS), 256, 1), True),
        # Table-wise, round-robin: the owner looks up every rank's ids of its tables.
        "lookup fwd+bwd (FBGEMM)": _lookup(dmp.ROWS[rank::2], dmp.DIM, 2 * dmp.BATCH, rank),
        ALL_TO_ALL: _twice(_all_to_all(dmp.BATCH * dmp.DIM * len(dmp.ROWS))),
    }
    steps = {
        "shardrec step": lambda: _step(dmp._shardrec_step("tw", 2), batches),
        "TorchRec step": lambda: _step(dmp._torchrec_step("tw", 2), batches),
    }
    title = f"dmp table-wise, 2 processes x 1 thread, batch {dmp.BATCH} per rank"
    return title, {**floor, **_built(steps, peer)}, list(floor)


def _dlrm2_parts(rank: int, peer: bool) -> tuple[str, dict[str, Factory], list[str]]:
    import dlrm

    os.environ.update(
        MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
    )  # fmt: skip
    batches = dlrm._synthetic_batches(rank, 4)
    floor = {
        # Whatever the plan, the two ranks share the 2 x 2048 bags of every table; half each.
        **_dlrm_floor(dlrm.TABLE_ROWS[rank::2], 2 * dlrm.BATCH),
        ALL_TO_ALL: _twice(_all_to_all(dlrm.BATCH * dlrm.DIM * len(dlrm.TABLE_ROWS))),
    }
    steps = {
        "shardrec step": lambda: _step(dlrm._shardrec_step(2), batches),
        "TorchRec step": lambda: _step(dlrm._torchrec_step(2), batches),
    }
    title = f"dlrm, 2 processes x 1 thread, batch {dlrm.BATCH} per rank"
    return title, {**floor, **_built(steps, peer)}, list(floor)


def _built(steps: dict[str, Callable[[], Factory]], peer: bool) -> dict[str, Factory]:
    """Builds each library's step (TorchRec's only where it is importable)."""
    return {n: build() for n, build in steps.items() if peer or n != "TorchRec step"}


_TWO_PROCESS = {"dmp": _dmp_parts, "dlrm2": _dlrm2_parts}


def _two_process_worker(
    rank: int, workload: str, port: int, args: argparse.Namespace, queue: Any
) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    title, factories, floor_parts = _TWO_PROCESS[workload](rank, args.peer)
    # Both ranks run the same contender at the same time: every call is collective or paced by
    # a barrier, so neither rank times its part while the other idles.
    paced = {name: _barriered(f) for name, f in factories.items()}
    times = compare(paced, warmup=2, iters=args.iters, rounds=args.rounds)
    # The same local parts on rank 0 while rank 1 waits: on this machine two processes computing
    # at once slow each other down, and a step whose ranks took turns would not pay that.
    local = [p for p in floor_parts if p != ALL_TO_ALL]
    alone = {}
    if rank == 0:
        alone = compare(
            {p: factories[p] for p in local}, warmup=2, iters=args.iters, rounds=args.rounds
        )
    dist.barrier()
    if rank == 0:
        queue.put((title, times, floor_parts, alone))
    dist.destroy_process_group()


def _twice(factory: Factory) -> Factory:
    def outer() -> Callable[[], object]:
        run = factory()

        def both() -> None:
            run()
            run()

        return both

    return outer


def _barriered(factory: Factory) -> Factory:
    def outer() -> Callable[[], object]:
        run = factory()

        def paced() -> None:
            dist.barrier()
            run()

        return paced

    return outer


def _two_process(workload: str, args: argparse.Namespace) -> None:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _two_process_worker,
        args=(workload, free_port(), args, queue),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    title, times, floor_parts, alone = queue.get()
    _report(
        f"{title} (rank 0; best of {args.rounds} rounds, median of {args.iters} calls, each after"
        " a barrier)",
        times,
        floor_parts,
        alone,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload", choices=["dlrm", "dlrm2", "dmp"], nargs="+", default=["dlrm", "dlrm2", "dmp"]
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="dlrm only")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        import torchrec  # noqa: F401

        args.peer = True
    except ImportError:
        args.peer = False
    if not args.peer and peer_available():
        # TorchRec is never our dependency: .venv-peer has it beside shardrec (make bench-peer).
        print(run_peer([str(Path(__file__).resolve()), *sys.argv[1:]]), end="")
        return
    if not args.peer:
        print("(no TorchRec here or in .venv-peer: the floor and shardrec's step only)")
    for workload in dict.fromkeys(args.workload):
        if workload == "dlrm":
            _dlrm(args)
        else:
            _two_process(workload, args)


if __name__ == "__main__":
    sys.exit(main())
