"""Sparse-container benchmark: shardrec against TorchRec 1.8.0, measured in the same process.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \
        .venv/bin/python tools/bench/kjt.py --rounds 5 [--floor]

Workloads: 26 keys x batch 4096, lengths all 1 and lengths uniform in 0..20 (values int64, lengths
int32). Operations: KJT construction, to_dict, permute (a random permutation of the 26 keys),
split (segments [8, 0, 18]), concat (two KJTs of 13 keys), and KeyedTensor.regroup (two
KeyedTensors of 13 keys x dim 128, regrouped into two groups that interleave them). Every operation
but construction runs on a fresh object each call: TorchRec caches to_dict on the object, and a
fresh object keeps both sides honest.

``--floor`` adds, per workload, the time of a plain ``clone()`` of the bytes that permute / concat
(values and lengths) and regroup (both sources) must copy: the memory-bound floor of any eager
implementation, to read the ratios against.

TorchRec is never a dependency: when this interpreter cannot import it but ``.venv-peer`` can
(``make bench-peer``), the script re-runs itself there, where shardrec is installed too, and both
libraries are timed in alternating rounds in one process. The ratio is TorchRec's time over
shardrec's: above 1, shardrec is faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from common import Clock, compare, peer_available, run_peer

NUM_KEYS = 26
BATCH = 4096
DIM = 128
SEGMENTS = [8, 0, 18]
CASES = ("lengths=1", "lengths=0..20")
OPS = ("construct", "to_dict", "permute", "split", "concat", "regroup")

Factory = Callable[[], Callable[[], object]]


def _classes(impl: str) -> tuple[Any, Any]:
    if impl == "torchrec":
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

        return KeyedJaggedTensor, KeyedTensor
    from shardrec import KeyedJaggedTensor, KeyedTensor

    return KeyedJaggedTensor, KeyedTensor


def _pooled(make: Callable[[], Any], size: int, op: Callable[[Any], object]) -> Factory:
    """A factory of timed callables, each applying ``op`` to a fresh object per call."""

    def factory() -> Callable[[], object]:
        items: Iterator[Any] = iter([make() for _ in range(size)])
        return lambda: op(next(items))

    return factory


def _kjt_data(case: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    if case == "lengths=1":
        lengths = torch.ones(NUM_KEYS * BATCH, dtype=torch.int32)
    else:
        lengths = torch.randint(0, 21, (NUM_KEYS * BATCH,), generator=gen, dtype=torch.int32)
    values = torch.randint(0, 1_000_000, (int(lengths.sum()),), generator=gen)
    return values, lengths, lengths.view(NUM_KEYS, BATCH).sum(1).tolist()


def kjt_factories(impl: str, case: str, pool: int) -> dict[str, Factory]:
    kjt_cls, _ = _classes(impl)
    gen = torch.Generator().manual_seed(0)
    keys = [f"f{i}" for i in range(NUM_KEYS)]
    permutation = torch.randperm(NUM_KEYS, generator=gen).tolist()
    values, lengths, per_key = _kjt_data(case, gen)

    def fresh() -> Any:
        return kjt_cls(keys=keys, values=values, lengths=lengths, length_per_key=per_key)

    def halves() -> list[Any]:
        return list(fresh().split([NUM_KEYS // 2, NUM_KEYS - NUM_KEYS // 2]))

    return {
        "construct": lambda: lambda: kjt_cls(keys=keys, values=values, lengths=lengths),
        "to_dict": _pooled(fresh, pool, lambda k: k.to_dict()),
        "permute": _pooled(fresh, pool, lambda k: k.permute(permutation)),
        "split": _pooled(fresh, pool, lambda k: k.split(SEGMENTS)),
        "concat": _pooled(halves, pool, kjt_cls.concat),
    }


def regroup_factory(impl: str, pool: int) -> Factory:
    _, kt_cls = _classes(impl)
    gen = torch.Generator().manual_seed(1)
    keys = [f"f{i}" for i in range(NUM_KEYS)]
    half = NUM_KEYS // 2
    left = torch.randn(BATCH, half * DIM, generator=gen)
    right = torch.randn(BATCH, (NUM_KEYS - half) * DIM, generator=gen)
    groups = [keys[0::2], keys[1::2]]

    def kts() -> list[Any]:
        return [
            kt_cls(keys=keys[:half], length_per_key=[DIM] * half, values=left),
            kt_cls(keys=keys[half:], length_per_key=[DIM] * (NUM_KEYS - half), values=right),
        ]

    return _pooled(kts, pool, lambda pair: kt_cls.regroup(pair, groups))


def floor_factories() -> dict[str, Factory]:
    """Plain clones of what each copying operation writes: (case/op) -> factory."""
    out: dict[str, Factory] = {}
    for case in CASES:
        values, lengths, _ = _kjt_data(case, torch.Generator().manual_seed(0))
        out[f"{case}/copy"] = lambda v=values, n=lengths: lambda: (v.clone(), n.clone())
    gen = torch.Generator().manual_seed(1)
    half = NUM_KEYS // 2
    left = torch.randn(BATCH, half * DIM, generator=gen)
    right = torch.randn(BATCH, (NUM_KEYS - half) * DIM, generator=gen)
    out["regroup/copy"] = lambda: lambda: (left.clone(), right.clone())
    return out


def run(
    impls: list[str], iters: int, warmup: int, rounds: int, clock: Clock, floor: bool = False
) -> dict[str, dict[str, float]]:
    """(case/op) -> impl -> best-of-rounds median seconds."""
    out: dict[str, dict[str, float]] = {}
    floors = floor_factories() if floor else {}
    for case in CASES:
        per_impl = {impl: kjt_factories(impl, case, warmup + iters) for impl in impls}
        for op in OPS[:-1]:
            contenders = {impl: per_impl[impl][op] for impl in impls}
            if floor and op in ("permute", "concat"):
                contenders["floor"] = floors[f"{case}/copy"]
            out[f"{case}/{op}"] = compare(contenders, warmup, iters, rounds, clock)
    reps = max(5, iters // 20)
    contenders = {impl: regroup_factory(impl, 2 + reps) for impl in impls}
    if floor:
        contenders["floor"] = floors["regroup/copy"]
    out["regroup"] = compare(contenders, 2, reps, rounds, clock)
    return out


def report(results: dict[str, dict[str, float]], impls: list[str], clock_name: str) -> str:
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    lines = [
        f"allocator: {allocator}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} thread(s); {clock_name} time"
    ]
    header = f"{'workload':<26}" + "".join(f"{impl:>12}" for impl in impls)
    if len(impls) == 2:
        header += f"{'ratio':>9}"
    with_floor = any("floor" in times for times in results.values())
    if with_floor:
        header += f"{'copy floor':>14}{'ours/floor':>12}"
    lines.append(header)
    for name, times in results.items():
        row = f"{name:<26}" + "".join(f"{times[impl] * 1e6:>10.1f}us" for impl in impls)
        if len(impls) == 2:
            row += f"{times[impls[1]] / times[impls[0]]:>8.2f}x"
        if "floor" in times:
            row += f"{times['floor'] * 1e6:>12.1f}us{times[impls[0]] / times['floor']:>11.2f}x"
        lines.append(row)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="time shardrec only")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time a plain clone of the bytes permute/concat/regroup copy (the memory floor)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="cpu: CPU time of the timing thread (immune to other processes' load; the default "
        "with 1 thread); wall: wall time (the default, and the only choice, with more threads)",
    )
    args = parser.parse_args()
    have_torchrec = importlib.util.find_spec("torchrec") is not None
    if not have_torchrec and not args.no_peer and peer_available():
        print(run_peer([str(Path(__file__).resolve()), *sys.argv[1:]]), end="")
        return 0
    impls = ["shardrec"]
    if have_torchrec and not args.no_peer:
        impls.append("torchrec")
    elif not args.no_peer:
        print("(no TorchRec here or in .venv-peer: shardrec figures only)", file=sys.stderr)
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    if clock_name == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread; use it with --threads 1")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    results = run(impls, args.iters, args.warmup, args.rounds, clock, args.floor)
    print(report(results, impls, clock_name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
