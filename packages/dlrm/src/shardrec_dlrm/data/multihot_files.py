"""The MLPerf multi-hot files, as the reference writes them, read without trusting them.

::

    DIR/
      day_N_dense.npy              # float32 [rows, 13]
      day_N_labels.npy             # int32 (or any integer/float 0/1) [rows] or [rows, 1]
      day_N_sparse_multi_hot.npz   # 26 arrays "0".."25", int32 [rows, hot_j], stored (not deflated)

Every file is checked before use: a regular file inside ``DIR`` (see :mod:`.files`), a numpy
header whose dtype and shape match the other files of the day, an ``.npz`` member that is stored
uncompressed (it is memory-mapped in place, as the reference does). Nothing is loaded up front.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np

from .errors import DataError
from .files import check_regular, inside
from .schema import NUM_DENSE, NUM_SPARSE

DENSE_SUFFIX: Final = "_dense.npy"
LABELS_SUFFIX: Final = "_labels.npy"
SPARSE_SUFFIX: Final = "_sparse_multi_hot.npz"
_LOCAL_HEADER: Final = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC: Final = b"PK\x03\x04"


def _npy_header(f: BinaryIO, path: Path, what: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: {what} is not a numpy array file ({e})") from None
    if fortran or dtype.hasobject:
        raise DataError(f"{path}: {what} is Fortran-ordered or holds objects; not readable here")
    return tuple(int(s) for s in shape), dtype


def map_npy(path: Path) -> np.memmap[Any, Any]:
    """Memory-map one ``.npy`` file after checking that it is a regular file."""
    check_regular(path)
    with open(path, "rb") as f:
        shape, dtype = _npy_header(f, path, "the file")
        offset = f.tell()
    return _map(path, dtype, offset, shape, path.stat().st_size)


def _map(
    path: Path, dtype: np.dtype[Any], offset: int, shape: tuple[int, ...], size: int
) -> np.memmap[Any, Any]:
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need > size:
        raise DataError(f"{path}: truncated ({size} bytes, its header needs {need})")
    if 0 in shape:
        return np.zeros(shape, dtype=dtype).view(np.memmap)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def map_npz(path: Path) -> dict[str, np.memmap[Any, Any]]:
    """Memory-map every member of an uncompressed ``.npz`` in place, keyed by array name."""
    st = check_regular(path)
    out: dict[str, np.memmap[Any, Any]] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise DataError(
                        f"{path}: array {name!r} is compressed; write it with np.savez "
                        "(not savez_compressed) to read it memory-mapped"
                    )
                f.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                if fields[0] != _LOCAL_MAGIC:
                    raise DataError(f"{path}: array {name!r}: bad zip entry header")
                f.seek(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])
                start = f.tell()
                shape, dtype = _npy_header(f, path, f"array {name!r}")
                header = f.tell() - start
                if header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > info.file_size:
                    raise DataError(f"{path}: array {name!r} is shorter than its header says")
                out[name] = _map(path, dtype, f.tell(), shape, st.st_size)
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from None
    except (OSError, struct.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return out


class MultiHotPart:
    """One day of multi-hot data: ``labels`` [rows], ``dense`` float32 [rows, 13], ``sparse`` the
    26 int arrays [rows, hot_j] in table order; checked against each other and against
    ``multi_hot`` when given."""

    def __init__(self, root: Path, name: str, multi_hot: Sequence[int] | None = None) -> None:
        self.name = name
        dense = map_npy(inside(root, name + DENSE_SUFFIX))
        labels = map_npy(inside(root, name + LABELS_SUFFIX))
        sparse_path = inside(root, name + SPARSE_SUFFIX)
        arrays = map_npz(sparse_path)
        rows = dense.shape[0] if dense.ndim >= 1 else -1
        if dense.ndim != 2 or dense.shape[1] != NUM_DENSE or dense.dtype.kind != "f":
            raise DataError(
                f"{root / (name + DENSE_SUFFIX)}: dense features must be float [rows, {NUM_DENSE}],"
                f" got {dense.dtype} {dense.shape}"
            )
        if labels.shape not in ((rows,), (rows, 1)) or labels.dtype.kind not in "iuf":
            raise DataError(
                f"{root / (name + LABELS_SUFFIX)}: labels must be [{rows}] or [{rows}, 1] "
                f"numbers (as many rows as the dense file), got {labels.dtype} {labels.shape}"
            )
        names = [str(j) for j in range(NUM_SPARSE)]
        if sorted(arrays) != sorted(names):
            raise DataError(
                f"{sparse_path}: arrays must be named '0'..'25' (one per table), "
                f"got {sorted(arrays)[:5]}..."
            )
        sparse = []
        for j in range(NUM_SPARSE):
            a = arrays[str(j)]
            if a.ndim != 2 or a.shape[0] != rows or a.dtype.kind not in "iu":
                raise DataError(
                    f"{sparse_path}: array '{j}' must be integer [{rows}, hot], got "
                    f"{a.dtype} {a.shape}"
                )
            if multi_hot is not None and a.shape[1] != multi_hot[j]:
                raise DataError(
                    f"{sparse_path}: table {j} has {a.shape[1]} ids per sample, "
                    f"expected {multi_hot[j]}"
                )
            sparse.append(a)
        self.rows = rows
        self.dense = dense
        self.labels = labels.reshape(rows)
        self.sparse = tuple(sparse)

    @property
    def multi_hot(self) -> tuple[int, ...]:
        return tuple(int(a.shape[1]) for a in self.sparse)
