"""Planning time of the MLPerf DLRM-DCNv2 embedding tables on the meta device, at 8, 64 and 1024
ranks.

26 tables with the Criteo 1TB cardinalities capped at 40M rows, dimension 128, row-wise Adagrad, on
ranks of 80 GB (8 per host). Prints the seconds each plan took (wall and CPU: on a loaded machine
the wall time counts the wait for a core), the fullest rank's memory against its usable capacity,
and the slowest rank's estimated step time.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/planner_scale.py
"""

from __future__ import annotations

import time

import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig
from shardrec.distributed.planner import GB, EmbeddingShardingPlanner, Topology
from shardrec.distributed.plugins import load_sharder_registry

CRITEO_1TB_40M = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # fmt: skip


def main() -> None:
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", num_embeddings=n, embedding_dim=128, feature_names=[f"cat_{i}"]
        )
        for i, n in enumerate(CRITEO_1TB_40M)
    ]
    ebc = EmbeddingBagCollection(
        tables, device=torch.device("meta"), fused_params={"optimizer": "rowwise_adagrad"}
    )
    sharders = load_sharder_registry().sharders()
    print(
        "ranks  seconds  CPU (s)  fullest rank (GiB) / usable (GiB)  slowest rank (ms)  "
        "sharding types"
    )
    for world in (8, 64, 1024):
        topology = Topology(world_size=world, local_world_size=8, hbm_cap=80 * 10**9)
        planner = EmbeddingShardingPlanner(topology, batch_size=512)
        start, cpu = time.perf_counter(), time.process_time()
        plan = planner.plan(ebc, sharders)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        report = planner.last_report
        assert report is not None
        fullest = max(r.hbm for r in report.ranks)
        slowest = max(r.perf for r in report.ranks)
        kinds = sorted({ps.sharding_type for t in plan.plan.values() for ps in t.values()})
        print(
            f"{world:5d}  {seconds:7.2f}  {cpu:7.2f}  {fullest / GB:18.2f} / "
            f"{report.hbm_cap / GB:6.2f}  {slowest * 1e3:17.3f}  {','.join(kinds)}"
        )


if __name__ == "__main__":
    main()
