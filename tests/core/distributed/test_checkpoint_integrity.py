"""Checkpoint checksums: what ``save`` records, what ``verify`` catches, ``load`` refusing a damaged
checkpoint on every rank, ``checkpoints`` and ``prune``, and checkpoints saved before checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from shardrec.distributed import ShardingEnv
from shardrec.distributed.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    UnverifiedCheckpointWarning,
    checkpoints,
    latest,
    load,
    prune,
    read_sidecar,
    save,
    verify,
)

from ._checkpoint_helpers import assert_same, make_model, snapshot


def _distcp(path: Path) -> Path:
    return sorted(path.glob("*.distcp"))[0]


def _corrupt(expected: str, path: Path) -> None:
    with pytest.raises(CorruptCheckpointError) as err:
        verify(path)
    message = str(err.value)
    assert "\n" not in message
    assert expected in message, message


def test_save_lists_every_file_with_size_and_sha256(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=3)
    listed = read_sidecar(path)["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "shardrec.json")
    assert sorted(listed) == on_disk
    assert ".metadata" in listed
    assert any(n.endswith(".distcp") for n in listed)
    for name, entry in listed.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verify(path)


def test_verify_names_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=1)
    shard = _distcp(path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    _corrupt(f"{shard}: checksum mismatch", path)
    shard.write_bytes(bytes(data[:-10]))
    _corrupt(f"{shard}: wrong size ({len(data) - 10} bytes, saved {len(data)})", path)
    shard.unlink()
    _corrupt(f"{shard}: missing", path)


def test_an_altered_or_unreadable_sidecar_is_corrupt(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=1)
    sidecar = path / "shardrec.json"
    body = json.loads(sidecar.read_text())
    body["step"] = 2
    sidecar.write_text(json.dumps(body))
    _corrupt(f"{sidecar}: checksum mismatch (the sidecar was altered)", path)
    sidecar.write_text("{not json")
    _corrupt(f"{sidecar}: unreadable", path)


def test_load_refuses_a_corrupt_checkpoint_before_changing_anything(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=1)
    (path / ".metadata").write_bytes((path / ".metadata").read_bytes() + b"\0")
    fresh = make_model(1)
    before = snapshot(fresh)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata: wrong size"):
        load(tmp_path, fresh)
    assert_same(before, snapshot(fresh))


def test_checkpoints_lists_complete_ones_newest_first(tmp_path: Path) -> None:
    assert checkpoints(tmp_path / "nowhere") == []
    model = make_model(0)
    for step in (5, 20, 10):
        save(tmp_path, model, step=step)
    (tmp_path / ".tmp-step-00000030").mkdir()  # a save in progress
    (tmp_path / "step-00000040").mkdir()  # no metadata: not complete
    (tmp_path / "step-00000050").symlink_to(tmp_path / "step-00000020")  # never followed
    names = [p.name for p in checkpoints(tmp_path)]
    assert names == ["step-00000020", "step-00000010", "step-00000005"]
    assert latest(tmp_path) == tmp_path / "step-00000020"


def test_prune_keeps_the_newest_and_the_newest_intact(tmp_path: Path) -> None:
    model = make_model(0)
    for step in (1, 2, 3, 4):
        save(tmp_path, model, step=step)
    assert [p.name for p in prune(tmp_path, keep=3)] == ["step-00000001"]
    # The two newest are damaged: keep=1 keeps the newest, and the newest intact one too.
    for step in (3, 4):
        shard = _distcp(tmp_path / f"step-0000000{step}")
        shard.write_bytes(shard.read_bytes()[:-1])
    (tmp_path / ".pruned-step-00000000").mkdir()  # a prune interrupted before its rmtree
    removed = prune(tmp_path, keep=1)
    assert [p.name for p in removed] == ["step-00000003"]
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004", "step-00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004"]
    with pytest.raises(CheckpointError, match="keep must be an int >= 1, got 0"):
        prune(tmp_path, keep=0)


def test_checkpoint_saved_before_checksums_loads_with_a_warning(tmp_path: Path) -> None:
    model = make_model(0)
    path = save(tmp_path, model, step=7)
    sidecar = path / "shardrec.json"
    body = json.loads(sidecar.read_text())
    for key in ("files", "checksum"):
        del body[key]
    body["format"] = "shardrec-dcp/1"
    sidecar.write_text(json.dumps(body))
    with pytest.warns(UnverifiedCheckpointWarning, match="without checksums"):
        verify(path)
    fresh = make_model(1)
    with pytest.warns(UnverifiedCheckpointWarning):
        assert load(tmp_path, fresh) == 7
    assert_same(snapshot(model), snapshot(fresh))


def case_save(env: ShardingEnv, root: str) -> None:
    save(root, make_model(0), step=1, pg=env.pg)


def case_load(env: ShardingEnv, roots: list[str]) -> tuple[str, str]:
    model = make_model(1)
    before = snapshot(model)
    try:
        load(roots[env.rank], model, pg=env.pg)
    except CheckpointError as exc:
        assert_same(before, snapshot(model))
        return type(exc).__name__, str(exc)
    return "loaded", ""


@pytest.mark.multiprocess
def test_every_rank_refuses_together(dist_pool: Any, tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    dist_pool.run(2, case_save, root=root)
    assert dist_pool.run(2, case_load, roots=[root, root]) == [("loaded", "")] * 2
    # Only rank 0 hashes the files: the other rank learns the verdict from it.
    shard = _distcp(Path(root) / "step-00000001")
    shard.write_bytes(b"x" + shard.read_bytes()[1:])
    results = dist_pool.run(2, case_load, roots=[root, root])
    assert results[0] == results[1]
    assert results[0][0] == "CorruptCheckpointError"
    assert f"{shard}: checksum mismatch" in results[0][1]
    # A problem only one rank sees (here: rank 1 is given an empty directory) stops both.
    dist_pool.run(2, case_save, root=root)  # a sound checkpoint again
    empty = tmp_path / "empty"
    os.mkdir(empty)
    results = dist_pool.run(2, case_load, roots=[root, str(empty)])
    assert results[0] == results[1]
    assert "no complete checkpoint" in results[0][1]


def test_loading_leaves_torch_state_alone_when_nothing_is_wrong(tmp_path: Path) -> None:
    model = make_model(0)
    save(tmp_path, model, step=1)
    fresh = make_model(2)
    assert load(tmp_path, fresh) == 1
    assert_same(snapshot(model), snapshot(fresh))
    assert torch.is_grad_enabled()
