"""Reads DCP checkpoints without unpickling code or leaving the checkpoint directory.

DCP stores tensors with ``torch.save`` and reads them back with ``torch.load(weights_only=True)``,
but its ``.metadata`` file is a plain pickle. This reader unpickles it with an allow-list of the
classes that DCP's metadata is made of, so a tampered file cannot run code: anything else is refused
with a :class:`CheckpointError` naming the class and the file. The unpickled metadata is then
checked as data (:func:`check_metadata`): every file it names is a regular file inside the
checkpoint directory, every byte range lies inside its file, every tensor's chunks inside the
tensor. DCP's "bytes" entries (``torch.load`` without ``weights_only``) are never read: the
reader and the planner of :func:`tensor_only_planner` both refuse them.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from shardrec.distributed.checkpoint.errors import CheckpointError
from shardrec.distributed.checkpoint.safe_files import (
    METADATA_CAP,
    SafeFileSystem,
    member_size,
    read_member,
)

METADATA: Final = ".metadata"

_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, frozenset()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self._path}: refusing to unpickle {module}.{name}: DCP metadata holds only plain "
            "metadata classes, so this file was not written by torch.distributed.checkpoint "
            "(or was tampered with)"
        )


def read_metadata_file(path: Path) -> Metadata:
    """The DCP metadata of the checkpoint directory ``path``, unpickled with the allow-list and
    checked by :func:`check_metadata`."""
    file = path / METADATA
    if not file.exists() and not file.is_symlink():
        raise CheckpointError(f"{path}: not a checkpoint (no {METADATA} file)")
    data = read_member(path, METADATA, METADATA_CAP)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), file).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a crafted pickle fails in many ways; each is "unreadable"
        raise CheckpointError(
            f"{file}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: holds a {type(metadata).__qualname__}, not DCP Metadata")
    check_metadata(path, metadata)
    return metadata


def _sizes(value: object) -> tuple[int, ...] | None:
    if not isinstance(value, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        return None
    return tuple(value)


def _check_tensor(file: Path, key: str, md: TensorStorageMetadata) -> None:
    size = _sizes(getattr(md, "size", None))
    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    chunks = getattr(md, "chunks", None)
    if size is None or not isinstance(dtype, torch.dtype) or not isinstance(chunks, list):
        raise CheckpointError(f"{file}: entry {key!r} has a malformed size, dtype or chunk list")
    for chunk in chunks:
        offsets = _sizes(getattr(chunk, "offsets", None))
        sizes = _sizes(getattr(chunk, "sizes", None))
        if (
            offsets is None
            or sizes is None
            or len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(o + n > d for o, n, d in zip(offsets, sizes, size, strict=True))
        ):
            raise CheckpointError(
                f"{file}: entry {key!r} has a chunk outside its size {size} "
                f"(offsets {getattr(chunk, 'offsets', None)}, sizes "
                f"{getattr(chunk, 'sizes', None)})"
            )


def check_metadata(path: Path, metadata: Metadata) -> None:
    """Refuse metadata whose entries are malformed, or whose storage lies outside ``path``."""
    file = path / METADATA
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        raise CheckpointError(f"{file}: its entry table is not a dict")
    for key, md in entries.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{file}: has an entry keyed {key!r}, not a string")
        if isinstance(md, TensorStorageMetadata):
            _check_tensor(file, key, md)
        elif not isinstance(md, BytesStorageMetadata):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(md).__qualname__}")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{file}: its storage table is not a dict")
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{file}: its storage table holds a {type(info).__qualname__}")
        name = info.relative_path
        if name not in sizes:
            sizes[name] = member_size(path, name)
        offset: object = info.offset  # unpickled: typed by the file, not by DCP's annotations
        length: object = info.length
        if not (
            isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0
        ):
            raise CheckpointError(f"{path / name}: {file} gives it a malformed byte range")
        if offset + length > sizes[name]:
            raise CheckpointError(
                f"{path / name}: {file} places {index.fqn!r} at bytes {offset}..{offset + length}, "
                f"past its end ({sizes[name]} bytes)"
            )
        if info.transform_descriptors:
            raise CheckpointError(
                f"{path / name}: {file} asks for stream transforms {info.transform_descriptors!r}, "
                "which shardrec never writes"
            )


def storage_files(metadata: Metadata) -> set[str]:
    """The names of the files the metadata's storage table points into."""
    return {info.relative_path for info in metadata.storage_data.values()}


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is read with :func:`read_metadata_file` and whose
    files are opened only inside the checkpoint directory (:class:`SafeFileSystem`)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._root = Path(path)
        self.fs = SafeFileSystem(self._root)
        self.path = self._root

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # Refused here as well as by shardrec's planner: this reader is public, and DCP's default
        # planner would unpickle a bytes entry without weights_only.
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(
                    f"{self._root}: entry {item.dest_index.fqn!r} is stored as pickled bytes; "
                    "shardrec reads only tensors"
                )
        return super().read_data(plan, planner)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None:
            raise CheckpointError(f"{self._root}: per-rank metadata files are not supported")
        metadata = read_metadata_file(self._root)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, except that a "bytes" entry (unpickled by DCP without ``weights_only``)
    is never read."""

    def __init__(self, where: Path) -> None:
        super().__init__()
        self._where = where

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"{self._where}: entry {read_item.dest_index.fqn!r} is stored as pickled bytes; "
            "shardrec loads only tensors"
        )


def tensor_only_planner(where: Path) -> DefaultLoadPlanner:
    """The load planner shardrec gives DCP (see :class:`_TensorOnlyPlanner`)."""
    return _TensorOnlyPlanner(where)


def tensor_entries(metadata: Metadata) -> Mapping[str, TensorStorageMetadata]:
    return {
        k: v
        for k, v in metadata.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
