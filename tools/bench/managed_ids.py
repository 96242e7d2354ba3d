"""Managed ids benchmark: remapping raw ids (shardrec's MCHManagedCollisionModule against
TorchRec's, same run) and the training step of an EmbeddingBagCollection with managed tables
against the plain one.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/managed_ids.py [--threads 1]
        [--rounds 3] [--no-peer] [--cpu-time] [--step-only] [--breakdown]

Remap workload: one table of ``--zch-size`` rows (default 200,000), batches of 65,536 raw ids
drawn from a Zipf-like law (exponent 1.05) over 2,000,000 distinct ids scattered over
[0, 2^62), a pool of 16 batches cycled. Every contender runs in training mode, so each call
looks up, records the reads, admits and (every ``interval`` steps) evicts: the figure is ids per
second with profiling and eviction amortised. Cases: LRU and LFU, eviction every step and every
100 steps. Contenders: shardrec (admit on first sight; and with a count threshold of 2), TorchRec
1.8.0's ``MCHManagedCollisionModule`` (which admits new ids only at its eviction runs).

Step workload: 8 tables of ``--step-rows`` rows (default 100,000), dim 64, batch 4096, 4 ids per
feature: per table Zipf-like ids from a population (50,000: it fits in the table; 500,000: five
times the table, so the tail keeps missing), and one id in 100 brand new; every step admits new
ids and, once a table is full, evicts as many rows; fused SGD, forward + backward of the pooled
sum. ``plain``: an
EmbeddingBagCollection fed ``raw id % rows``; ``managed``: the same behind a
ManagedCollisionEmbeddingBagCollection (LRU, eviction every step) fed the raw ids.

TorchRec is imported only when this interpreter has it: when ``.venv-peer`` exists (``make
bench-peer``) the script re-runs itself there, so that both libraries are timed in one process in
alternating rounds. Each figure is the mean time per call over consecutive calls (so eviction
runs are included), best of the rounds; the spread is the worst round over the best.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import MALLOC_ENV, peer_available, run_peer

BATCH_IDS = 65_536
UNIVERSE = 2_000_000
POOL = 16
Timed = Callable[[], object]
# The last managed step module built per row count, for its stats in the report.
_managed_modules: dict[tuple[int, int], Any] = {}


def _raw_ids(n: int, universe: int, seed: int) -> torch.Tensor:
    """``n`` ids, Zipf-like over ``universe`` ranks, each rank scattered to a random id < 2^62."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, universe + 1, dtype=torch.float64)
    weights = ranks.pow(-1.05)
    picks = torch.multinomial(weights, n, replacement=True, generator=gen)
    scatter = torch.randint(0, 2**62, (universe,), generator=torch.Generator().manual_seed(99))
    return scatter[picks]


def _cycle(items: list[Any]) -> Callable[[], Any]:
    state = {"i": -1}

    def nxt() -> Any:
        state["i"] += 1
        return items[state["i"] % len(items)]

    return nxt


def _shardrec_remap(policy: str, interval: int, zch: int, threshold: int) -> Callable[[], Timed]:
    from shardrec.modules.managed_collision import MCHManagedCollisionModule
    from shardrec.modules.mc_admission import CountThresholdAdmission
    from shardrec.modules.mc_policies import LFU_EvictionPolicy, LRU_EvictionPolicy

    def factory() -> Timed:
        chosen = LRU_EvictionPolicy() if policy == "lru" else LFU_EvictionPolicy()
        admission = CountThresholdAdmission(threshold) if threshold > 1 else None
        module = MCHManagedCollisionModule(
            zch, eviction_policy=chosen, eviction_interval=interval, admission=admission
        )
        batches = _cycle([_raw_ids(BATCH_IDS, UNIVERSE, s) for s in range(POOL)])
        return lambda: module(batches())

    return factory


def _torchrec_remap(policy: str, interval: int, zch: int) -> Callable[[], Timed]:
    from torchrec.modules.mc_modules import (
        LFU_EvictionPolicy,
        LRU_EvictionPolicy,
        MCHManagedCollisionModule,
    )
    from torchrec.sparse.jagged_tensor import JaggedTensor

    def factory() -> Timed:
        chosen = LRU_EvictionPolicy() if policy == "lru" else LFU_EvictionPolicy()
        module = MCHManagedCollisionModule(
            zch_size=zch,
            device=torch.device("cpu"),
            eviction_policy=chosen,
            eviction_interval=interval,
            input_hash_size=2**62,
        )
        module.train()
        lengths = torch.ones(BATCH_IDS, dtype=torch.int64)
        batches = _cycle(
            [
                {"t": JaggedTensor(values=_raw_ids(BATCH_IDS, UNIVERSE, s), lengths=lengths)}
                for s in range(POOL)
            ]
        )
        return lambda: module(batches())

    return factory


def _step_factories(
    rows: int, length: int, population: int, new_every: int
) -> dict[str, Callable[[], Timed]]:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from shardrec.modules.managed_collision import MCHManagedCollisionModule
    from shardrec.modules.mc_collection import ManagedCollisionCollection
    from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

    tables, batch, per = 8, 4096, 4
    configs = [
        EmbeddingBagConfig(
            name=f"t{i}", num_embeddings=rows, embedding_dim=64, feature_names=[f"f{i}"]
        )
        for i in range(tables)
    ]
    keys = [f"f{i}" for i in range(tables)]
    lengths = torch.full((tables * batch,), per, dtype=torch.int64)
    # ``length`` batches, never cycled within a round: per table, Zipf ids from a stable
    # population of ``population`` ids, and one id in ``new_every`` brand new (a stream in which
    # new ids keep arriving).
    n = batch * per
    gen = torch.Generator().manual_seed(rows)
    raw = []
    for s in range(length):
        per_table = []
        for t in range(tables):
            ids = _raw_ids(n, population, 1000 * s + t)
            fresh = len(range(0, n, new_every))
            ids[::new_every] = torch.randint(0, 2**62, (fresh,), generator=gen)
            per_table.append(ids)
        raw.append(torch.cat(per_table))

    def ebc() -> EmbeddingBagCollection:
        return EmbeddingBagCollection(
            configs, fused_params={"optimizer": "sgd", "learning_rate": 0.01}
        )

    def plain() -> Timed:
        module = ebc()
        batches = _cycle(
            [KeyedJaggedTensor(keys=keys, values=r % rows, lengths=lengths) for r in raw]
        )

        def step() -> None:
            module(batches()).values().sum().backward()

        return step

    def managed() -> Timed:
        mcc = ManagedCollisionCollection(
            {c.name: MCHManagedCollisionModule(rows, name=c.name) for c in configs}, configs
        )
        module = ManagedCollisionEmbeddingBagCollection(ebc(), mcc)
        batches = _cycle([KeyedJaggedTensor(keys=keys, values=r, lengths=lengths) for r in raw])

        def step() -> None:
            pooled, _ = module(batches())
            pooled.values().sum().backward()

        _managed_modules[(population, new_every)] = module
        return step

    case = f"{population}/{new_every}"
    return {f"plain EBC step/{case}": plain, f"managed EBC step/{case}": managed}


def _mean_time(fn: Timed, warmup: int, calls: int, clock: Callable[[], float]) -> float:
    """Mean seconds per call over ``calls`` consecutive calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def _step_cases(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(population per table, one id in N new) of each step case."""
    cases = []
    for case in args.step_cases.split(","):
        population, new_every = case.split(":")
        cases.append((int(population), int(new_every)))
    return cases


# Where a managed step's time goes: (label, owner, attribute) of the calls timed by --breakdown.
_PARTS = (
    ("lookups and read records", "shardrec.modules.mc_id_map:IdRowMap", "find_recording"),
    ("inserts", "shardrec.modules.mc_id_map:IdRowMap", "insert"),
    ("torch.unique (the misses)", "torch", "unique"),
    (
        "eviction runs",
        "shardrec.modules.managed_collision:MCHManagedCollisionModule",
        "_run_eviction",
    ),
    ("fresh weights and their writes", "shardrec.modules.mc_embedding_modules", "reset_rows"),
)


def _breakdown(args: argparse.Namespace, clock: Callable[[], float]) -> None:
    """Per step case: the plain and managed steps, and the managed step's parts, timed in one
    run (each part's calls wrapped with ``clock``; the wrappers' own cost lands in the managed
    step, not in its parts)."""
    import importlib

    print("\nbreakdown: ms per step, mean over the timed calls after the warm-up")
    print("| ids per table | plain | managed | " + " | ".join(p[0] for p in _PARTS) + " | rest |")
    print("|---" * (len(_PARTS) + 4) + "|")
    for population, new_every in _step_cases(args):
        factories = _step_factories(args.step_rows, 2 * POOL + args.iters, population, new_every)
        case = f"{population}/{new_every}"
        plain = _mean_time(factories[f"plain EBC step/{case}"](), 2 * POOL, args.iters, clock)
        spent = {p[0]: 0.0 for p in _PARTS}
        undo = []
        for label, where, name in _PARTS:
            module_name, _, cls = where.partition(":")
            owner: Any = importlib.import_module(module_name)
            if cls:
                owner = getattr(owner, cls)
            original = getattr(owner, name)

            def timed(
                *a: Any, _f: Any = original, _l: str = label, _s: Any = spent, **k: Any
            ) -> Any:
                start = clock()
                try:
                    return _f(*a, **k)
                finally:
                    _s[_l] += clock() - start

            setattr(owner, name, timed)
            undo.append((owner, name, original))
        try:
            step = factories[f"managed EBC step/{case}"]()
            for _ in range(2 * POOL):
                step()
            for label in spent:  # the warm-up does not count
                spent[label] = 0.0
            start = clock()
            for _ in range(args.iters):
                step()
            managed = (clock() - start) / args.iters
        finally:
            for owner, name, original in reversed(undo):
                setattr(owner, name, original)
        parts = [spent[p[0]] / args.iters for p in _PARTS]
        rest = managed - plain - sum(parts)
        cells = " | ".join(f"{t * 1e3:.2f}" for t in (plain, managed, *parts, rest))
        print(f"| {population:,} | {cells} |")
    print("(rest: the managed step's other time less the plain step's; negative where the managed"
          " lookup into compact rows is cheaper than the plain one into hashed rows)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--iters",
        type=int,
        default=16,
        help="timed calls per measure (200 at least where eviction runs every 100 steps)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zch-size", type=int, default=200_000)
    parser.add_argument("--step-rows", type=int, default=100_000, help="rows per table (step)")
    parser.add_argument(
        "--step-cases",
        default="50000:100,500000:100",
        help="step cases, comma-separated POPULATION:N (ids per table, one id in N new)",
    )
    parser.add_argument(
        "--step-only", action="store_true", help="time the training step cases only (no remap)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the parts of the managed step (lookups, inserts, eviction, fresh weights)",
    )
    parser.add_argument("--in-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-peer", action="store_true", help="skip TorchRec")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the thread's CPU time instead of wall time (steadier on a loaded machine)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    has_torchrec = importlib.util.find_spec("torchrec") is not None
    if not has_torchrec and not args.no_peer and peer_available():
        print(run_peer([str(Path(__file__).resolve()), *sys.argv[1:], "--in-peer"]), end="")
        return 0
    torch.set_num_threads(args.threads)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]:
        print("warning: run with MALLOC_MMAP_THRESHOLD_=33554432 (see docs/benchmarks.md)")
    peer = has_torchrec and not args.no_peer
    clock = time.thread_time if args.cpu_time else time.perf_counter

    remap: dict[str, Callable[[], Timed]] = {}
    for policy in ("lru", "lfu") if not args.step_only else ():
        for interval in (1, 100):
            case = f"{policy}, evict every {interval}"
            remap[f"shardrec/{case}"] = _shardrec_remap(policy, interval, args.zch_size, 1)
            remap[f"shardrec threshold 2/{case}"] = _shardrec_remap(
                policy, interval, args.zch_size, 2
            )
            if peer:
                remap[f"torchrec/{case}"] = _torchrec_remap(policy, interval, args.zch_size)
    steps: dict[str, Callable[[], Timed]] = {}
    for population, new_every in _step_cases(args):
        steps.update(_step_factories(args.step_rows, 2 * POOL + args.iters, population, new_every))
    contenders = {**remap, **steps}
    # Rounds alternate the order; each round builds fresh modules and warms them up for two
    # passes over the pool (the table fills, eviction reaches its steady state), then times
    # consecutive calls spanning at least two eviction runs: the mean includes the runs.
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            calls = max(args.iters, 200 if "every 100" in name else 0)
            times[name].append(_mean_time(contenders[name](), 2 * POOL, calls, clock))
    _report(times, args, peer)
    if args.breakdown:
        _breakdown(args, clock)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return 0


def _report(times: dict[str, list[float]], args: argparse.Namespace, peer: bool) -> None:
    print(
        f"\ncpu, torch {torch.__version__}, threads {args.threads}, rounds {args.rounds},"
        f" clock {'thread CPU time' if args.cpu_time else 'wall'},"
        f" MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}"
        f" MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_')}"
    )
    from shardrec.modules.mc_id_map_host import host_kernels

    # A figure from the torch fallback must not pass for the compiled code's.
    print(
        "shardrec id map on CPU: "
        + ("compiled loops (numba)" if host_kernels() is not None else "torch code (no numba)")
    )
    if args.step_only:
        print("\n(remap not run: --step-only)")
    else:
        _report_remap(times, args, peer)
    _report_step(times, args)


def _report_remap(times: dict[str, list[float]], args: argparse.Namespace, peer: bool) -> None:
    print(f"\nremap: zch_size {args.zch_size:,}, {BATCH_IDS:,} ids per batch (Zipf 1.05 over"
          f" {UNIVERSE:,} ids), training mode")  # fmt: skip
    print("| case | contender | ids/s (best) | spread | vs torchrec |")
    print("|---|---|---|---|---|")
    for policy in ("lru", "lfu"):
        for interval in (1, 100):
            case = f"{policy}, evict every {interval}"
            ref = times.get(f"torchrec/{case}")
            for who in ("shardrec", "shardrec threshold 2", "torchrec"):
                ts = times.get(f"{who}/{case}")
                if ts is None:
                    continue
                best = min(ts)
                vs = f"{min(ref) / best:.2f}x" if ref else "n/a"
                print(f"| {case} | {who} | {BATCH_IDS / best:,.0f} | {max(ts) / best:.2f} | {vs} |")
    if not peer:
        print("(TorchRec not run: no .venv-peer, or --no-peer)")


def _report_step(times: dict[str, list[float]], args: argparse.Namespace) -> None:
    print("\nstep: 8 tables, dim 64, batch 4096, 4 ids per feature (Zipf 1.05 over a population of"
          " ids per table, and new ids), LRU evicting every step, fused SGD")  # fmt: skip
    print("| rows per table | ids per table | new ids | plain EBC ms/step (spread) |"
          " managed EBC ms/step (spread) | managed / plain |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    rows = args.step_rows
    for population, new_every in _step_cases(args):
        case = f"{population}/{new_every}"
        plain, managed = times[f"plain EBC step/{case}"], times[f"managed EBC step/{case}"]
        print(f"| {rows:,} | {population:,} | 1 in {new_every} |"
              f" {min(plain) * 1e3:.1f} ({max(plain) / min(plain):.2f}) |"
              f" {min(managed) * 1e3:.1f} ({max(managed) / min(managed):.2f}) |"
              f" {min(managed) / min(plain):.2f}x |")  # fmt: skip
    for (population, new_every), module in sorted(_managed_modules.items()):
        st = module.stats()["t0"]
        print(f"managed, population {population:,}, 1 in {new_every} new, table t0 after its last"
              f" round: occupancy {st.occupancy:,}, {st.steps} steps, admitted"
              f" {st.admitted_total:,}, evicted {st.evicted_total:,},"
              f" rejected {st.rejected_total:,}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
