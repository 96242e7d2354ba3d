"""``dlrm plan --managed-ids`` builds the managed tables' id maps on the meta device: planning
26 tables of 200M rows in buckets allocates no map (no tensor off meta above a few KiB is made,
caught by a dispatch mode that sees every op), and at a small size it prints what a build with
real CPU maps prints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner

import shardrec_dlrm.model.build as build_module
from shardrec.distributed.planner import GB
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec.testing import record_allocations
from shardrec_dlrm.cli import main
from shardrec_dlrm.model.build import TABLE_NAMES
from shardrec_dlrm.model.dlrm import DLRMTrain
from shardrec_dlrm.model.managed import ManagedEmbeddingBags
from shardrec_sharders.managed_collision import ManagedCollisionSharder

# Larger than anything planning itself makes (the managed module's RNG state is ~5 KiB), far
# smaller than one bucket's map at any size worth planning.
BIG: int = 1 << 20


@contextmanager
def built_models(monkeypatch: pytest.MonkeyPatch, *, force_cpu_maps: bool) -> Iterator[list[Any]]:
    """The models ``dlrm plan`` builds (with ``force_cpu_maps``, built with CPU id maps, as
    before the maps went on meta)."""
    models: list[DLRMTrain] = []
    real = build_module.build_dlrm

    def recording(*args: Any, **kwargs: Any) -> DLRMTrain:
        if force_cpu_maps:
            kwargs["managed_device"] = None
        model = real(*args, **kwargs)
        models.append(model)
        return model

    monkeypatch.setattr(build_module, "build_dlrm", recording)
    yield models


def managed_of(model: DLRMTrain) -> ManagedCollisionEmbeddingBagCollection:
    sparse = model.model.sparse_arch.embedding_bag_collection
    assert isinstance(sparse, ManagedEmbeddingBags)
    return sparse.managed


def plan(*extra: str, world: int, rows: int, buckets: int) -> str:
    args = ["plan", "--world-size", str(world), "--compute-device", "cpu", "--embedding-dim", "16"]
    args += ["--num-embeddings", str(rows), "--managed-ids", "lru"]
    args += ["--managed-buckets", str(buckets), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def state_per_rank(output: str, world: int) -> list[float]:
    """The "of which state (GiB)" column of the per-rank table."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("rank "))
    assert "of which state (GiB)" in lines[at]
    return [float(line.split()[3]) for line in lines[at + 2 : at + 2 + world]]


def test_planning_200m_row_managed_tables_allocates_no_map(monkeypatch: pytest.MonkeyPatch) -> None:
    world, rows, buckets = 8, 200_000_000, 4
    with built_models(monkeypatch, force_cpu_maps=False) as models, record_allocations(BIG) as big:
        output = plan(world=world, rows=rows, buckets=buckets)
    assert big == []
    (model,) = models
    managed = managed_of(model)
    maps = list(managed.managed_collision_collection.buffers())
    assert maps
    assert all(b.is_meta for b in maps)
    # Every table's buckets are there at full size, and their bytes are what is printed.
    by_table = managed.managed_collision_collection.buckets_by_table()
    assert sorted(by_table) == sorted(TABLE_NAMES)
    assert all(sum(m.capacity for m in b) == rows - 1 for b in by_table.values())
    states = ManagedCollisionSharder(ManagedCollisionEmbeddingBagCollection).planner_rank_state(
        managed, world
    )
    expected = [0] * world
    for s in states:
        expected[s.rank] += s.nbytes
    printed = state_per_rank(output, world)
    assert printed == pytest.approx([e / GB for e in expected], abs=0.0006)
    # At least an int64 per row and table (a map keeps several): hundreds of GiB, none allocated.
    assert sum(expected) > len(TABLE_NAMES) * rows * 8


def test_the_meta_plan_prints_what_a_plan_with_cpu_maps_prints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, rows, buckets = 3, 50_000, 3
    with built_models(monkeypatch, force_cpu_maps=False) as meta_models:
        on_meta = plan(world=world, rows=rows, buckets=buckets)
    with (
        built_models(monkeypatch, force_cpu_maps=True) as cpu_models,
        record_allocations(BIG) as big,
    ):
        on_cpu = plan(world=world, rows=rows, buckets=buckets)
    # The comparison is meaningful: one build had real maps (which the mode sees), one none.
    assert big != []
    cpu_maps = list(managed_of(cpu_models[0]).managed_collision_collection.buffers())
    assert all(b.device.type == "cpu" for b in cpu_maps)
    assert all(b.is_meta for b in managed_of(meta_models[0]).managed_collision_collection.buffers())

    def without_timing(text: str) -> list[str]:
        return [line for line in text.splitlines() if "planned in" not in line]

    assert without_timing(on_meta) == without_timing(on_cpu)
    assert min(state_per_rank(on_meta, world)) > 0
