"""The planner asks each table's storage backend which bytes count against a rank's memory.

Planning only (meta modules, nothing sharded): a table whose rows and optimizer state live in the
example ``mmap`` backend's files is planned on ranks too small to hold it, and the plan's memory per
rank leaves exactly those bytes out; the same table on the default storage is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

from shardrec.distributed.planner import (
    GB,
    EmbeddingShardingPlanner,
    ParameterConstraints,
    PlannerError,
    PlannerTable,
    Topology,
)
from shardrec.distributed.plugins import load_plugins
from shardrec.kernels import (
    IN_MEMORY,
    GroupRequest,
    LookupGroup,
    StorageBackend,
    StorageChoice,
    StorageMemory,
    TableSpec,
    storage_memory,
)
from shardrec.modules import EmbeddingBagCollection
from shardrec.modules.configs import EmbeddingBagConfig

from .._plugin_site import PLUGINS, install_plugin

PLUGIN = PLUGINS / "shardrec_mmap_storage"
MiB = 1024**2
ROWS, DIM = 4_000_000, 64  # 1 GiB of fp32 rows (+ 16 MB of row-wise Adagrad state)


@pytest.fixture(scope="module")
def mmap_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example plugin installed as a user would, found through its entry point."""
    site = install_plugin(PLUGIN, tmp_path_factory.mktemp("mmap-plugin"))
    sys.path.insert(0, str(site))
    try:
        yield site
    finally:
        sys.path.remove(str(site))


def _model(storage: StorageChoice | None) -> EmbeddingBagCollection:
    table = EmbeddingBagConfig(
        name="big", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f"], storage=storage
    )
    return EmbeddingBagCollection(tables=[table], device=torch.device("meta"))


def _ddr_per_rank(planner: EmbeddingShardingPlanner) -> list[int]:
    assert planner.last_report is not None
    return [r.ddr for r in planner.last_report.ranks]


def test_a_file_backed_table_larger_than_rank_memory_is_planned(
    mmap_site: Path, tmp_path: Path
) -> None:
    sharders = load_plugins().sharders()
    mmap = StorageChoice("mmap", {"directory": str(tmp_path)})
    small = Topology(world_size=2, compute_device="cpu", ddr_cap=256 * MiB)

    with pytest.raises(PlannerError, match=r"table 'big' does not fit: even sharded"):
        EmbeddingShardingPlanner(small).plan(_model(None), sharders)

    planner = EmbeddingShardingPlanner(small)
    plan = planner.plan(_model(mmap), sharders)
    placed = plan.get_plan_for_module("")
    assert placed is not None
    assert sorted(placed) == ["big"]
    assert sum(s.sizes[0] * s.sizes[1] for s in placed["big"].shards) >= ROWS * DIM
    # Only the lookup's ids and outputs count: far below the table's 1 GiB, within the cap.
    assert all(0 < used < 16 * MiB for used in _ddr_per_rank(planner))
    assert planner.last_report is not None
    assert any("'mmap' storage" in note for note in planner.last_report.notes)


def test_rank_memory_leaves_out_exactly_the_file_bytes(mmap_site: Path, tmp_path: Path) -> None:
    """Same layout (row-wise pinned), ranks large enough for both: the default table's ranks hold
    exactly the rows and the row-wise Adagrad sums (4 bytes a row) more."""
    sharders = load_plugins().sharders()
    row_wise = {"big": ParameterConstraints(sharding_types=["row_wise"])}
    big = Topology(world_size=2, compute_device="cpu", ddr_cap=8 * GB)

    in_memory = EmbeddingShardingPlanner(big, constraints=row_wise, optimizer="rowwise_adagrad")
    plan = in_memory.plan(_model(None), sharders)
    in_files = EmbeddingShardingPlanner(big, constraints=row_wise, optimizer="rowwise_adagrad")
    mmap = StorageChoice("mmap", {"directory": str(tmp_path)})
    assert in_files.plan(_model(mmap), sharders).plan == plan.plan

    placed = plan.get_plan_for_module("")
    assert placed is not None
    rows = {s.rank: s.sizes[0] for s in placed["big"].shards}
    expected = [rows[r] * (DIM * 4 + 4) for r in range(2)]
    got = [a - b for a, b in zip(_ddr_per_rank(in_memory), _ddr_per_rank(in_files), strict=True)]
    assert got == expected


class _Silent:
    """A backend written to the contract before ``memory`` existed: it declares nothing."""

    def __init__(self, name: str = "silent") -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def group_key(self, table: TableSpec, pooled: bool) -> Hashable:
        return table.name

    def unsupported_reason(self, request: GroupRequest) -> str | None:
        return None

    def build_group(self, request: GroupRequest) -> LookupGroup:
        raise AssertionError("planning builds nothing")


class _WeightsElsewhere(_Silent):
    def memory(self, options: Mapping[str, str]) -> StorageMemory:
        return StorageMemory(weights=options.get("cache") != "none")


class _Wrong(_Silent):
    def memory(self, options: Mapping[str, str]) -> object:
        return "nothing"


def _table(storage: StorageChoice | None) -> PlannerTable:
    return PlannerTable(
        module_path="",
        param_name="big",
        num_embeddings=ROWS,
        embedding_dim=DIM,
        module_type=EmbeddingBagCollection,
        storage=storage,
    )


def test_a_backend_that_declares_nothing_counts_everything() -> None:
    silent: StorageBackend = _Silent()
    assert isinstance(silent, StorageBackend)
    assert storage_memory(silent, {}) == IN_MEMORY
    backends: dict[str, StorageBackend] = {
        "silent": silent,
        "split": _WeightsElsewhere("split"),
        "wrong": _Wrong("wrong"),
    }
    sharders = load_plugins().sharders()
    small = Topology(world_size=2, compute_device="cpu", ddr_cap=256 * MiB)
    planner = EmbeddingShardingPlanner(small, storage_backends=backends, optimizer="exact_adagrad")

    with pytest.raises(PlannerError, match=r"table 'big' does not fit"):
        planner.plan_tables([_table(StorageChoice("silent"))], sharders)
    # Weights in files, but exact Adagrad's state (as large as the weights) in memory: refused.
    with pytest.raises(PlannerError, match=r"table 'big' does not fit"):
        planner.plan_tables([_table(StorageChoice("split", {"cache": "none"}))], sharders)
    planner.optimizer = None  # no optimizer state: the table now fits
    planner.plan_tables([_table(StorageChoice("split", {"cache": "none"}))], sharders)
    assert all(used < 16 * MiB for used in _ddr_per_rank(planner))

    with pytest.raises(PlannerError, match=r"table 'big'.*'wrong'.*not a shardrec"):
        planner.plan_tables([_table(StorageChoice("wrong"))], sharders)
    with pytest.raises(PlannerError, match=r"table 'big' asks for storage backend 'nope'"):
        planner.plan_tables([_table(StorageChoice("nope"))], sharders)
