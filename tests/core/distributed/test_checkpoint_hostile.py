"""Checkpoints made by ``save``, then altered by someone who wants more than a wrong model: code
run at load, files read from outside the checkpoint, hangs, floods and huge allocations. Each is
refused with one line naming the file. Most alterations are resealed (the sidecar's file list and
checksum recomputed, as a forger would), so the check behind verification is the one tested."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from shardrec.distributed.checkpoint import (
    CheckpointError,
    SafeFileSystemReader,
    load,
    read_metadata_file,
    save,
    sharded_state_dict,
)
from shardrec.distributed.checkpoint.safe_files import create_member

from ._checkpoint_helpers import assert_same, make_model, reseal, snapshot


class _Touch:
    """Unpickling this creates ``path``: the proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, ...]]:
        return (os.system, (f"touch {self.path}",))


def _refused(match: str, path: Path, **kwargs: Any) -> str:
    with pytest.raises(CheckpointError) as err:
        load(path, make_model(1), **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    assert match in message, message
    return message


def _rewrite_metadata(path: Path, change: Any) -> None:
    with (path / ".metadata").open("rb") as f:
        metadata = pickle.load(f)  # the test's own file: a plain pickle is fine here
    change(metadata)
    with (path / ".metadata").open("wb") as f:
        pickle.dump(metadata, f)
    reseal(path)


def _replace_with_dcp(path: Path, state: dict[str, Any]) -> None:
    """Rewrite the checkpoint's DCP files from ``state`` (values DCP pickles as bytes included)."""
    for child in path.iterdir():
        if child.name != "shardrec.json":
            child.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's notes on ShardedTensor and on one process
        dcp_save(state, storage_writer=FileSystemWriter(path), no_dist=True)
    reseal(path)


@pytest.mark.parametrize("strict", [True, False])
def test_a_bytes_entry_for_a_tensor_is_never_unpickled(tmp_path: Path, strict: bool) -> None:
    model = make_model(0)
    path = save(tmp_path, model, step=1)
    state: dict[str, Any] = sharded_state_dict(model)
    pwned = tmp_path / "pwned"
    state["model"]["top.bias"] = _Touch(pwned)
    _replace_with_dcp(path, state)
    _refused(
        f"{path}/.metadata: entry model.top.bias is stored as pickled bytes", path, strict=strict
    )
    assert not pwned.exists()


def test_the_public_reader_refuses_bytes_under_any_planner(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=1)
    pwned = tmp_path / "pwned"
    _replace_with_dcp(path, {"model": {"top.bias": _Touch(pwned)}})
    target: dict[str, Any] = {"model": {"top.bias": torch.zeros(1)}}
    reader = SafeFileSystemReader(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's note on one process
        with pytest.raises(CheckpointException) as err:
            dcp_load(target, storage_reader=reader, no_dist=True)  # with DCP's own planner
    assert "'model.top.bias' is stored as pickled bytes" in str(err.value)
    assert not pwned.exists()


def test_a_bytes_entry_the_model_does_not_expect_is_left_unread(tmp_path: Path) -> None:
    model = make_model(0)
    path = save(tmp_path, model, step=1)
    state: dict[str, Any] = sharded_state_dict(model)
    pwned = tmp_path / "pwned"
    state["model"]["extra"] = _Touch(pwned)
    _replace_with_dcp(path, state)
    fresh = make_model(1)
    assert load(path, fresh, strict=False) == 1
    assert_same(snapshot(model), snapshot(fresh))
    assert not pwned.exists()


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_storage_outside_the_checkpoint_is_refused(tmp_path: Path, where: str) -> None:
    path = save(tmp_path / "ck", make_model(0), step=1)
    shard = sorted(path.glob("*.distcp"))[0]
    outside = tmp_path / "outside.distcp"
    shutil.copy(shard, outside)
    name = "../../outside.distcp" if where == "parent" else str(outside)

    def point_outside(metadata: Any) -> None:
        for info in metadata.storage_data.values():
            info.relative_path = name

    _rewrite_metadata(path, point_outside)
    _refused(f"names the file {name!r}, which is not a plain file name", path)
    with pytest.raises(CheckpointError, match="not a plain file name"):
        read_metadata_file(path)


def test_a_symlinked_shard_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "ck", make_model(0), step=1)
    shard = sorted(path.glob("*.distcp"))[0]
    outside = tmp_path / "outside.distcp"
    shard.rename(outside)
    shard.symlink_to(outside)
    _refused(f"{shard}: is a symbolic link", path)
    reseal(path)  # a forger drops it from the list: the metadata still names it
    _refused(f"{shard}: is a symbolic link", path)


@pytest.mark.parametrize("name", [".metadata", "shardrec.json"])
def test_fifo_and_device_metadata_neither_hang_nor_flood(tmp_path: Path, name: str) -> None:
    path = save(tmp_path, make_model(0), step=1)
    target = path / name
    target.unlink()
    os.mkfifo(target)
    _refused(f"{target}: is a FIFO", path)
    target.unlink()
    target.symlink_to("/dev/zero")
    _refused(f"{target}: is a symbolic link", path)


def test_oversized_metadata_is_refused_unread(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=1)
    with (path / ".metadata").open("r+b") as f:
        f.truncate(1 << 40)  # sparse: a terabyte that takes no disk
    with pytest.raises(CheckpointError, match=r"\.metadata: 1099511627776 bytes, more than"):
        read_metadata_file(path)
    _refused(f"{path}/.metadata: wrong size", path)


@pytest.mark.parametrize("size", [(10**12, 12), (1, 12, 1)])
def test_dense_optimizer_state_is_checked_against_its_parameter(
    tmp_path: Path, size: tuple[int, ...]
) -> None:
    model = make_model(0)
    opt = torch.optim.Adam(model.top.parameters())
    model.top(torch.randn(2, 12)).sum().backward()
    opt.step()
    path = save(tmp_path, model, step=1, optimizer=opt)

    def inflate(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["dense_optim.top.weight.exp_avg"]
        entry.size = torch.Size(size)
        entry.chunks[0].sizes = torch.Size(size)
        entry.chunks[0].offsets = torch.Size([0] * len(size))

    _rewrite_metadata(path, inflate)
    fresh = make_model(1)
    with pytest.raises(CheckpointError) as err:
        load(path, fresh, optimizer=torch.optim.Adam(fresh.top.parameters()))
    assert "\n" not in str(err.value)
    assert f"{path}/.metadata: optimizer state 'top.weight.exp_avg' declares shape {size}" in str(
        err.value
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("size", torch.Size([-1, 12]), "malformed size"),
        ("chunk", torch.Size([5, 12]), "has a chunk outside its size"),
        ("offset", 10**9, "past its end"),
    ],
)
def test_malformed_metadata_is_refused(
    tmp_path: Path, field: str, value: Any, expected: str
) -> None:
    path = save(tmp_path, make_model(0), step=1)

    def damage(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["model.top.weight"]
        if field == "size":
            entry.size = value
        elif field == "chunk":
            entry.chunks[0].offsets = value
        else:
            for info in metadata.storage_data.values():
                info.offset = value

    _rewrite_metadata(path, damage)
    message = _refused(expected, path)
    assert str(path / ".metadata") in message or str(path) in message


def test_save_does_not_write_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    root = tmp_path / "ck"
    root.mkdir()
    (root / ".tmp-step-00000001").symlink_to(victim)  # where step 1 is about to be written
    save(root, make_model(0), step=1)
    assert list(victim.iterdir()) == []
    assert not (root / "step-00000001").is_symlink()
    # Each file of a save is created new: an existing name, link or not, is an error.
    (tmp_path / "link").symlink_to(victim / "x")
    with pytest.raises(CheckpointError, match="link: already exists"):
        create_member(tmp_path, "link")
    assert not (victim / "x").exists()


def test_bytes_of_another_tensor_are_refused_in_one_line(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=1)

    def swap(metadata: Any) -> None:
        infos = {index.fqn: info for index, info in metadata.storage_data.items()}
        weight, bias = infos["model.top.weight"], infos["model.top.bias"]
        weight.offset, bias.offset = bias.offset, weight.offset
        weight.length, bias.length = bias.length, weight.length

    _rewrite_metadata(path, swap)
    fresh = make_model(1)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError) as err:
        load(path, fresh)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: could not be read")
    assert_same(before, snapshot(fresh))
