"""Reads DCP checkpoints without unpickling code.

DCP stores tensors with ``torch.save`` and reads them back with ``torch.load(weights_only=True)``,
but its ``.metadata`` file is a plain pickle. This reader unpickles it with an allow-list of the
classes that DCP's metadata is made of, so a tampered file cannot run code: anything else is refused
with a :class:`CheckpointError` naming the class and the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Final

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from shardrec.distributed.checkpoint.errors import CheckpointError

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
    """The DCP metadata of the checkpoint directory ``path``, unpickled with the allow-list."""
    file = path / ".metadata"
    try:
        with file.open("rb") as f:
            metadata = _MetadataUnpickler(f, file).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint (no .metadata file)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{file}: unreadable checkpoint metadata ({exc})") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: holds a {type(metadata).__qualname__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is read with :func:`read_metadata_file`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._root = Path(path)

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
