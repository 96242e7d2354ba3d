"""``--sharding`` of ``dlrm train`` and ``dlrm plan`` offers ``auto`` and every built-in sharding
type of core's ``ShardingType``, and each one plans every shard with that type (two hosts of two
ranks, so that the two-level types have nodes to cut across). Training with the two-level types:
tests/dlrm/training/test_two_nodes.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from shardrec.distributed import ShardingType
from shardrec_dlrm.cli import main
from shardrec_dlrm.training.config import SHARDINGS

SMALL = [
    "--embedding-dim", "16", "--dense-arch-layer-sizes", "8,16", "--num-embeddings", "1000",
    "--world-size", "4", "--local-world-size", "2", "--compute-device", "cpu",
]  # fmt: skip


def test_the_choices_are_auto_and_every_built_in_type() -> None:
    assert ("auto", *(member.value for member in ShardingType)) == SHARDINGS
    for command in ("train", "plan"):
        shown = CliRunner().invoke(main, [command, "--help"], terminal_width=400)
        assert shown.exit_code == 0, shown.output
        assert "|".join(SHARDINGS) in shown.output.replace("\n", "").replace(" ", ""), command


@pytest.mark.parametrize("sharding", list(ShardingType))
def test_dlrm_plan_places_every_table_with_the_forced_type(sharding: ShardingType) -> None:
    result = CliRunner().invoke(main, ["plan", *SMALL, "--sharding", sharding.value])
    assert result.exit_code == 0, result.output
    placed = [
        part.split("[", 1)[1]
        for line in result.output.splitlines()
        for part in line.split()
        if part.startswith("t_cat_") and "[" in part
    ]
    assert placed, result.output
    assert all(place.startswith(sharding.value) for place in placed), result.output
