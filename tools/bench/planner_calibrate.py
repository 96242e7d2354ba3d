"""Calibrates the planner's costs on this machine (gloo, CPU) and compares its estimated step with
measured DistributedModelParallel steps of 2 and 4 processes, the constants and the steps measured
in the same processes, round after round, under the same load.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/planner_calibrate.py

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/planner_calibrate.py \
        --ranks 2 4 --rounds 5 --sharding table_wise row_wise --json out.json

The model: an EmbeddingBagCollection of 8 tables of 200,000 x 64, 4 ids per sample, batch 2048
per rank, fused SGD, every table forced to one ``--sharding`` type (a case each); loss the sum of
the pooled output. For each process count W, W gloo processes (1 thread each; on this 2-core
machine 4 processes share the cores) build every case's DistributedModelParallel once, then run
``--rounds`` rounds of:

1. micro-benchmarks, each the slowest rank's median of ``--iters`` calls:

   - the fused lookup (``TableBatchedEmbedding``, fused SGD) of a table-wise owner, 8/W tables and
     W x 2048 bags, at the tables' width and at half of it: forward (no grad) and forward +
     backward with the update. ``ddr_mem_bw`` is the forward's bytes ``(ids x cols + bags x cols)
     x 4`` over its time; the backward is fitted as ``bwd_compute_multiplier`` x forward + ids x
     ``backward_cost_per_id`` + bags x ``output_cost_per_row`` from the two widths (what does not
     shrink with the width, less the rows' part measured below, per id);
   - ``collective_latency``: an all-to-all of one element per peer;
   - per byte beyond that latency (4 MiB buffers): the all-to-all (bytes each rank sends:
     ``intra_host_bw``), and the reduce-scatter row splits sum their partial outputs with plus the
     all-gather their gradients come back with (bytes each rank sends: ``reduce_scatter_bw``);
   - ``route_cost_per_id``: a row split's work on the ids a rank sends (each id's owner block by
     ``bucketize_rows``, sorted by owner, counted per bag), per id;
   - ``receive_cost_per_id``: an owner laying out what W senders sent (``stack_senders``), per id;
   - ``output_cost_per_row``: the same fused lookup, forward + backward, with the same ids one per
     bag (4x the pooled rows): what the extra rows cost beyond their bytes at the fitted bandwidth
     and multiplier, per row;
   - ``output_copy_cost_per_byte``: a rank's pooled output ``[2048, 8 x 64]`` put together from
     W owners' blocks in column order and its gradient (the loss's, as in the steps) taken apart
     again (table-wise's column reorder), per byte of output;

2. every case's step at 2048 samples per rank, and at ``--tiny`` (8): the first case's tiny step
   less the model's estimate of it is the round's ``step_overhead`` (dispatch, autograd: what no
   byte, id or collective explains), the same for every case.

Every figure is taken on two clocks: wall time, and the process's CPU time (all its threads, gloo's
included), which other sessions' load inflates far less. The planner then plans each case with
each round's constants (the plan must be the one that ran) and its estimated step is compared with
the measured one of the same round and clock. Per case: the median over rounds of estimate /
measured, the lowest and highest round, and the run's figure for the model without the output
terms (the backward's intercept then all per id) and without any of the per-id, per-collective
and output terms (the backward a plain multiple of the forward). The load average is read at
every round.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import free_port

ROWS: Final = 200_000
DIM: Final = 64
TABLES: Final = 8
POOLING: Final = 4
BATCH: Final = 2048
ELEMENT: Final = 4
# A collective's buffer per rank at two sizes, about the steps' output exchanges: the cost per byte
# is the slope between them (what a larger buffer adds), free of the fixed latency.
SMALL_BYTES: Final = 2 * 2**20
BIG_BYTES: Final = 16 * 2**20
CLOCKS: Final = ("wall", "cpu")


def _median_seconds(fn: Callable[[], object], iters: int, warmup: int = 2) -> tuple[float, float]:
    """The slowest rank's median wall and process-CPU seconds per call (each rank's median, the
    largest over ranks)."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(iters):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    spent = torch.tensor([statistics.median(walls), statistics.median(cpus)], dtype=torch.float64)
    dist.all_reduce(spent, op=dist.ReduceOp.MAX)
    return float(spent[0]), float(spent[1])


def _kjt(rank: int, batch: int, tables: int = TABLES, pooling: int = POOLING) -> Any:
    from shardrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, ROWS, (tables * batch * pooling,), generator=gen)
    lengths = torch.full((tables * batch,), pooling, dtype=torch.int32)
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(tables)], values=ids, lengths=lengths)


def _ebc() -> Any:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig

    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t{i}", num_embeddings=ROWS, embedding_dim=DIM, feature_names=[f"f{i}"]
            )
            for i in range(TABLES)
        ],
        device="meta",
        fused_params={"optimizer": "sgd", "learning_rate": 0.01},
    )


# -- micro-benchmarks -------------------------------------------------------------------------


class _Micro:
    """The micro-benchmarks of one rank, their buffers built once."""

    def __init__(self, rank: int, world: int) -> None:
        from shardrec.kernels import (
            FeatureSpec,
            FusedOptimizerConfig,
            OptimizerType,
            TableBatchedEmbedding,
            TableSpec,
        )

        self.rank, self.world = rank, world
        owned = max(TABLES // world, 1)
        # The lookup at the tables' width and at half of it: what does not shrink with the width
        # is a cost per id (the backward's sort and per-row update).
        self.lookups = [
            TableBatchedEmbedding(
                tables=[
                    TableSpec(name=f"t{i}", num_embeddings=ROWS, embedding_dim=width)
                    for i in range(owned)
                ],
                features=[FeatureSpec(name=f"f{i}", table=f"t{i}") for i in range(owned)],
                pooled=True,
                optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=0.01),
                device=torch.device("cpu"),
                check_inputs=False,
            )
            for width in (DIM, DIM // 2)
        ]
        self.lookup_kjt = _kjt(rank, world * BATCH, owned)
        self.lookup_ids = owned * world * BATCH * POOLING
        bags = owned * world * BATCH
        # The same ids, one per bag: POOLING times the pooled rows.
        self.rows_kjt = _kjt(rank, world * BATCH * POOLING, owned, pooling=1)
        self.lookup_bags = bags
        self.more_rows = bags * (POOLING - 1)
        self.lookup_bytes = (self.lookup_ids + bags) * DIM * ELEMENT
        self.small = torch.randn(SMALL_BYTES // ELEMENT)
        self.big = torch.randn(BIG_BYTES // ELEMENT)
        self.tiny = torch.zeros(world)
        # What a rank sends a row-split table set: the ids of 8 tables, 2048 samples.
        self.route_kjt = _kjt(rank, BATCH)
        bounds = [ROWS * r // world for r in range(world)]
        self.starts = torch.tensor(bounds, dtype=torch.int64)
        self.owners = torch.arange(world, dtype=torch.int64)
        self.route_ids = TABLES * BATCH * POOLING
        # What a table-wise owner receives: W senders x its tables' keys x 2048 bags.
        self.received = self._received(owned)
        self.received_ids = world * owned * BATCH * POOLING
        # A rank's pooled output as W owners send it back: owner r holds tables r, r+W, ...
        owners_of = [r % world for r in range(TABLES)]
        self.out_widths = [[DIM] * owners_of.count(r) for r in range(world)]
        self.out_sizes = [BATCH * sum(w) for w in self.out_widths]
        self.out_order = [(t % world, t // world) for t in range(TABLES)]
        self.out_flat = torch.randn(BATCH * TABLES * DIM, requires_grad=True)
        self.out_bytes = BATCH * TABLES * DIM * ELEMENT

    def _received(self, owned: int) -> Any:
        from shardrec.distributed.comm import JaggedAllToAllResult

        per_sender = owned * BATCH
        return JaggedAllToAllResult(
            lengths=torch.full((self.world * per_sender,), POOLING, dtype=torch.int64),
            values=torch.randint(0, ROWS, (self.world * per_sender * POOLING,)),
            weights=None,
            lengths_per_rank=[per_sender] * self.world,
            values_per_rank=[per_sender * POOLING] * self.world,
            batch_per_rank=[BATCH] * self.world,
        )

    def _route(self) -> None:
        from shardrec.distributed.sharding import bucketize_rows

        kjt = self.route_kjt
        values = kjt.values()
        dest = torch.empty_like(values)
        local = torch.empty_like(values)
        at = 0
        for n in kjt.length_per_key():
            dest[at : at + n], local[at : at + n] = bucketize_rows(
                values[at : at + n], self.starts, self.owners
            )
            at += n
        bags = TABLES * BATCH
        bag = torch.repeat_interleave(torch.arange(bags), kjt.lengths().to(torch.int64))
        order = torch.argsort(dest, stable=True)
        torch.bincount(dest * bags + bag, minlength=self.world * bags)
        local[order]

    def _stack(self) -> None:
        from shardrec.distributed.sharding import stack_senders

        stack_senders(self.received, max(TABLES // self.world, 1))

    def _columns(self) -> None:
        from shardrec_sharders.table_wise import _OwnerBlocksToColumns  # the real reorder

        out = _OwnerBlocksToColumns.apply(  # type: ignore[no-untyped-call]
            self.out_flat, BATCH, self.out_sizes, self.out_widths, self.out_order
        )
        # The loss (a sum)'s gradient, as the steps get it: a broadcast of ones.
        out.backward(torch.ones(1).expand(out.shape))
        self.out_flat.grad = None

    def measure(self, iters: int) -> dict[str, dict[str, float]]:
        w = self.world
        kjt = self.lookup_kjt

        def forward(lookup: Any) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():
                    lookup(kjt)

            return run

        def train(lookup: Any, batch: Any = kjt) -> Callable[[], None]:
            def run() -> None:
                lookup(batch).sum().backward()

            return run

        def a2a(x: torch.Tensor) -> Callable[[], None]:
            part = x.numel() // w

            def run() -> None:
                out = torch.empty_like(x)
                dist.all_to_all_single(out, x[: part * w], [part] * w, [part] * w)

            return run

        def reduce_scatter(x: torch.Tensor) -> Callable[[], None]:
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

            def run() -> None:
                # The partial sums' reduce-scatter, then their gradients' all-gather.
                out = torch.empty(x.numel() // w)
                fn(out, x)
                gather(torch.empty(out.numel() * w), out)

            return run

        timed = {"latency": _median_seconds(a2a(self.tiny), 3 * iters)}
        timed |= {
            name: _median_seconds(fn, iters)
            for name, fn in (
                ("fwd", forward(self.lookups[0])),
                ("both", train(self.lookups[0])),
                ("fwd_half", forward(self.lookups[1])),
                ("both_half", train(self.lookups[1])),
                ("both_rows", train(self.lookups[0], self.rows_kjt)),
                ("a2a_small", a2a(self.small)),
                ("a2a_big", a2a(self.big)),
                ("rs_small", reduce_scatter(self.small)),
                ("rs_big", reduce_scatter(self.big)),
                ("route", self._route),
                ("stack", self._stack),
                ("columns", self._columns),
            )
        }
        return {
            clock: self._costs({k: v[i] for k, v in timed.items()})
            for i, clock in enumerate(CLOCKS)
        }

    def _costs(self, t: dict[str, float]) -> dict[str, float]:
        w = self.world
        # Bytes each rank sends, more in the big buffer than in the small one.
        more = (BIG_BYTES - SMALL_BYTES) * (w - 1) / w
        # backward = multiplier x forward + ids x per-id cost, at both widths.
        bwd, bwd_half = t["both"] - t["fwd"], t["both_half"] - t["fwd_half"]
        narrower = t["fwd"] - t["fwd_half"]
        # A disturbed round can time the narrower forward no faster: no slope to fit then, the
        # backward is taken as a plain multiple of the forward.
        multiplier = (bwd - bwd_half) / narrower if narrower > 0.1 * t["fwd"] else bwd / t["fwd"]
        multiplier = max(multiplier, 0.0)
        # The extra rows' time beyond what the fitted model gives their bytes (written forward,
        # read back as gradient); the ids are the same, so no per-id cost enters.
        row_bytes = self.more_rows * DIM * ELEMENT
        modelled = row_bytes * t["fwd"] / self.lookup_bytes * (1 + multiplier)
        per_row = max(t["both_rows"] - t["both"] - modelled, 0.0) / self.more_rows
        # What the backward spends beyond its multiple of the forward is per id and per row: the
        # per-row part, measured above, is not the ids' (it would be counted twice).
        beyond = max(bwd - multiplier * t["fwd"], 0.0)
        return {
            "lookup_bytes_per_s": self.lookup_bytes / t["fwd"],
            "bwd_over_fwd": multiplier,
            "bwd_over_fwd_plain": bwd / t["fwd"],  # the model without a per-id cost
            "backward_per_id": max(beyond - per_row * self.lookup_bags, 0.0) / self.lookup_ids,
            # The model without a per-row cost: all of it per id.
            "backward_per_id_all": beyond / self.lookup_ids,
            "collective_latency": t["latency"],
            "all_to_all_bytes_per_s": more / max(t["a2a_big"] - t["a2a_small"], 1e-6),
            # Both ways: the reduce-scatter and the all-gather each send ``more``.
            "reduce_scatter_bytes_per_s": 2 * more / max(t["rs_big"] - t["rs_small"], 1e-6),
            "route_per_id": t["route"] / self.route_ids,
            "receive_per_id": t["stack"] / self.received_ids,
            "output_per_row": per_row,
            "output_copy_per_byte": t["columns"] / self.out_bytes,
        }


# -- the cases --------------------------------------------------------------------------------


def topology(
    world: int,
    costs: dict[str, float],
    overhead: float = 0.0,
    *,
    new: bool = True,
    output: bool = True,
) -> Any:
    """A CPU Topology of ``world`` ranks priced with one round's ``costs``; ``new=False`` leaves
    out the per-id, per-collective and output terms (the model before them), ``output=False``
    only the output terms."""
    from shardrec.distributed.planner import Topology

    on = 1.0 if new else 0.0
    out = on if output else 0.0
    return Topology(
        world_size=world,
        compute_device="cpu",
        ddr_mem_bw=costs["lookup_bytes_per_s"],
        intra_host_bw=costs["all_to_all_bytes_per_s"],
        inter_host_bw=costs["all_to_all_bytes_per_s"],
        bwd_compute_multiplier=costs["bwd_over_fwd" if new else "bwd_over_fwd_plain"],
        reduce_scatter_bw=costs["reduce_scatter_bytes_per_s"],
        step_overhead=overhead,
        collective_latency=on * costs["collective_latency"],
        route_cost_per_id=on * costs["route_per_id"],
        receive_cost_per_id=on * costs["receive_per_id"],
        backward_cost_per_id=on * costs["backward_per_id" if output else "backward_per_id_all"],
        output_cost_per_row=out * costs["output_per_row"],
        output_copy_cost_per_byte=out * costs["output_copy_per_byte"],
    )


def plan(topo: Any, sharding: str, batch: int = BATCH) -> tuple[Any, Any]:
    from shardrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from shardrec.distributed.plugins import load_sharder_registry

    planner = EmbeddingShardingPlanner(
        topo,
        batch_size=batch,
        optimizer="sgd",
        constraints={
            f"t{i}": ParameterConstraints(pooling_factor=float(POOLING), sharding_types=[sharding])
            for i in range(TABLES)
        },
    )
    result = planner.plan(_ebc(), load_sharder_registry().sharders())
    assert planner.last_report is not None
    return result, planner.last_report


def _worker(
    rank: int, world: int, port: int, cases: list[str], rounds: int, iters: int, tiny: int, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        from shardrec.distributed import DistributedModelParallel
        from shardrec.distributed.plugins import load_sharder_registry

        micro = _Micro(rank, world)
        first = micro.measure(2)  # a warm-up round; its constants make the plans that run
        models, plans = {}, {}
        for case in cases:
            plans[case], _ = plan(topology(world, first["cpu"]), case)
            models[case] = DistributedModelParallel(
                _ebc(), plan=plans[case], sharders=load_sharder_registry().sharders()
            )
        batches = {BATCH: _kjt(rank, BATCH), tiny: _kjt(rank, tiny)}

        def step_of(case: str, batch: int) -> Callable[[], None]:
            model, kjt = models[case], batches[batch]

            def step() -> None:
                model(kjt).values().sum().backward()

            return step

        results = []
        for _ in range(rounds):
            load = os.getloadavg()[0]
            costs = micro.measure(iters)
            steps = {}
            for case in cases:
                wall, cpu = _median_seconds(step_of(case, BATCH), iters)
                tiny_wall, tiny_cpu = _median_seconds(step_of(case, tiny), iters)
                steps[case] = {"wall": (wall, tiny_wall), "cpu": (cpu, tiny_cpu)}
            results.append({"load": load, "costs": costs, "steps": steps})
        if rank == 0:
            Path(out).write_bytes(pickle.dumps({"plans": plans, "rounds": results}))
    finally:
        dist.destroy_process_group()


def _run(world: int, cases: list[str], rounds: int, iters: int, tiny: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pickle")
        mp.spawn(
            _worker,
            args=(world, free_port(), cases, rounds, iters, tiny, out),
            nprocs=world,
            join=True,
        )
        result: dict[str, Any] = pickle.loads(Path(out).read_bytes())
        return result


def _overhead(world: int, costs: dict[str, float], case: str, tiny_step: float, tiny: int) -> float:
    """The fixed cost per step: ``case``'s step at ``tiny`` samples less the model's estimate."""
    return max(tiny_step - float(plan(topology(world, costs), case, batch=tiny)[1].step), 0.0)


def _estimates(
    world: int, got: dict[str, Any], cases: list[str], tiny: int
) -> list[dict[str, Any]]:
    """Per round: its load, constants and, per case and clock, the measured step, the planner's
    estimate and the estimate without the per-id and per-collective terms."""
    rounds = []
    for r in got["rounds"]:
        row: dict[str, Any] = {"load": r["load"], "costs": r["costs"], "cases": {}}
        for clock in CLOCKS:
            costs = r["costs"][clock]
            # One fixed cost for every case: the first case's (table-wise by default).
            overhead = _overhead(world, costs, cases[0], r["steps"][cases[0]][clock][1], tiny)
            costs["overhead"] = overhead
            for case in cases:
                planned, report = plan(topology(world, costs, overhead), case)
                if planned.plan != got["plans"][case].plan:
                    raise RuntimeError(f"{case}: the round's constants changed the plan that ran")
                without = plan(topology(world, costs, overhead, new=False), case)[1]
                no_output = plan(topology(world, costs, overhead, output=False), case)[1]
                row["cases"].setdefault(case, {})[clock] = {
                    "measured": r["steps"][case][clock][0],
                    "estimate": report.step,
                    "without_new_terms": without.step,
                    "without_output_terms": no_output.step,
                }
        rounds.append(row)
    return rounds


def _run_figures(
    world: int, rounds: list[dict[str, Any]], cases: list[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per clock and case, the run's figure: the planner's step with each constant the median of
    the rounds' (this run's, under this run's load), against the median measured step."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for clock in CLOCKS:
        costs = {
            k: statistics.median(r["costs"][clock][k] for r in rounds)
            for k in rounds[0]["costs"][clock]
        }
        out[clock] = {}
        for case in cases:
            out[clock][case] = {
                "estimate": plan(topology(world, costs, costs["overhead"]), case)[1].step,
                "without_new_terms": plan(
                    topology(world, costs, costs["overhead"], new=False), case
                )[1].step,
                "without_output_terms": plan(
                    topology(world, costs, costs["overhead"], output=False), case
                )[1].step,
                "measured": statistics.median(r["cases"][case][clock]["measured"] for r in rounds),
            }
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _print_tables(world: int, rounds: list[dict[str, Any]], cases: list[str]) -> None:
    loads = [r["load"] for r in rounds]
    print(
        f"\n{world} processes, {len(rounds)} rounds, load average {min(loads):.1f}-{max(loads):.1f}"
    )
    print(
        "\n| clock | lookup read (GB/s) | backward / forward | collective latency (us) "
        "| all-to-all (GB/s per rank) | reduce-scatter + all-gather (GB/s per rank) "
        "| backward (ns per id) | route (ns per id) | receive (ns per id) "
        "| output (ns per row) | output copy (ns per KiB) | fixed (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for clock in CLOCKS:
        c = {k: _median([r["costs"][clock][k] for r in rounds]) for k in rounds[0]["costs"][clock]}
        print(
            f"| {clock} | {c['lookup_bytes_per_s'] / 1e9:.2f} | {c['bwd_over_fwd']:.2f} "
            f"| {c['collective_latency'] * 1e6:.0f} | {c['all_to_all_bytes_per_s'] / 1e9:.2f} "
            f"| {c['reduce_scatter_bytes_per_s'] / 1e9:.2f} | {c['backward_per_id'] * 1e9:.1f} "
            f"| {c['route_per_id'] * 1e9:.1f} "
            f"| {c['receive_per_id'] * 1e9:.1f} | {c['output_per_row'] * 1e9:.1f} "
            f"| {c['output_copy_per_byte'] * 1024 * 1e9:.0f} | {c['overhead'] * 1e3:.1f} |"
        )
    run = _run_figures(world, rounds, cases)
    print(
        "\n| clock | sharding | planner's step (ms) | measured step (ms) | estimate / measured "
        "| rounds: lowest-median-highest | without the output terms "
        "| without per-id, per-collective and output terms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for clock in CLOCKS:
        for case in cases:
            cells = [r["cases"][case][clock] for r in rounds]
            ratios = [x["estimate"] / x["measured"] for x in cells]
            fig = run[clock][case]
            print(
                f"| {clock} | {case} | {fig['estimate'] * 1e3:.1f} | {fig['measured'] * 1e3:.1f} "
                f"| {fig['estimate'] / fig['measured']:.2f} "
                f"| {min(ratios):.2f}-{_median(ratios):.2f}-{max(ratios):.2f} "
                f"| {fig['without_output_terms'] / fig['measured']:.2f} "
                f"| {fig['without_new_terms'] / fig['measured']:.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=8, help="calls per median")
    parser.add_argument(
        "--tiny", type=int, default=8, help="samples per rank of the fixed-cost step"
    )
    parser.add_argument(
        "--sharding",
        nargs="+",
        default=["table_wise", "row_wise", "column_wise", "table_row_wise"],
        help="sharding types forced on every table, one case each; the first gives the fixed cost",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every round's figures here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dump: dict[str, Any] = {}
    for world in args.ranks:
        got = _run(world, args.sharding, args.rounds, args.iters, args.tiny)
        dump[str(world)] = rounds = _estimates(world, got, args.sharding, args.tiny)
        _print_tables(world, rounds, args.sharding)
    if args.json is not None:
        args.json.write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
