"""MLPerf-style multi-hot Criteo: materialise it from ``dlrm preprocess`` output, read it back.

Example::

    materialize("criteo_pre/", "criteo_mh/", multi_hot="mlperf",
                num_embeddings_per_feature=MLPERF_NUM_EMBEDDINGS)
    ds = open_multihot("criteo_mh/", num_embeddings_per_feature=MLPERF_NUM_EMBEDDINGS)
    for batch in ds.split("train").batches(2048, rank=rank, world_size=world):
        ...  # batch.sparse_features: key cat_j has hot_j ids per sample

The output is the reference's own layout (:mod:`.multihot_files`), so the reference's files are read
the same way. The one-hot id of a sample is its row after ``dlrm``'s hashing
(:func:`.schema.hash_ids`); :mod:`.multihot_lookup` maps it to ``hot`` rows. The lookups are kept
on disk (``lookup/table_J.i32``, 4 x rows x hot bytes each: 24 GiB at MLPerf sizes) and each day is
written ``chunk_rows`` rows at a time, so memory stays at a few chunks whatever the data size. A
day's three files are written under temporary names and renamed when whole; ``multihot.json``
lists the finished days, so a run that stopped is resumed by running it again.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .batch import Batch
from .dataset import open_dataset, rank_batch_ranges
from .errors import DataError
from .files import MAX_RECORD_BYTES, create_new, inside, read_small, write_atomic
from .multihot_files import DENSE_SUFFIX, LABELS_SUFFIX, SPARSE_SUFFIX, MultiHotPart
from .multihot_lookup import (
    DEFAULT_CHUNK_ROWS,
    MLPERF_SEED,
    Distribution,
    lookup_chunks,
    parse_multi_hot,
)
from .outdir import claim_output, refuse_non_empty
from .schema import (
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_KEYS,
    SPARSE_NAMES,
    Rows,
    hash_ids,
    parse_num_embeddings,
)
from .sources import Layout
from .splits import Segment, SplitName, split_segments

MULTIHOT_META: Final = "multihot.json"
MULTIHOT_FORMAT: Final = "shardrec-criteo-multihot"
LOOKUP_DIR: Final = "lookup"
_DAY: Final = re.compile(r"day_(\d+)")


@dataclass(frozen=True, slots=True)
class MultiHotMeta:
    """``multihot.json``: how the data was made and which parts are finished."""

    multi_hot: tuple[int, ...]
    num_embeddings_per_feature: tuple[int, ...]
    distribution: str
    seed: int
    source: str
    parts: tuple[str, ...]
    lookup_complete: bool
    complete: bool
    format: str = MULTIHOT_FORMAT

    def same_recipe(self, other: MultiHotMeta) -> bool:
        return (
            self.multi_hot,
            self.num_embeddings_per_feature,
            self.distribution,
            self.seed,
            self.source,
        ) == (
            other.multi_hot,
            other.num_embeddings_per_feature,
            other.distribution,
            other.seed,
            other.source,
        )


def _write_meta(root: Path, meta: MultiHotMeta) -> None:
    write_atomic(root / MULTIHOT_META, (json.dumps(asdict(meta), indent=2) + "\n"))


def _read_meta(root: Path) -> MultiHotMeta:
    path = root / MULTIHOT_META
    try:
        raw: Any = json.loads(read_small(inside(root, MULTIHOT_META), MAX_RECORD_BYTES))
        if not isinstance(raw, dict) or raw.get("format") != MULTIHOT_FORMAT:
            raise ValueError("not shardrec multi-hot metadata")
        return MultiHotMeta(
            multi_hot=tuple(int(x) for x in raw["multi_hot"]),
            num_embeddings_per_feature=tuple(int(x) for x in raw["num_embeddings_per_feature"]),
            distribution=str(raw["distribution"]),
            seed=int(raw["seed"]),
            source=str(raw["source"]),
            parts=tuple(str(p) for p in raw["parts"]),
            lookup_complete=bool(raw["lookup_complete"]),
            complete=bool(raw["complete"]),
        )
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise DataError(f"{path}: malformed multi-hot metadata ({e})") from None


def _lookup_path(root: Path, table: int) -> Path:
    return root / LOOKUP_DIR / f"table_{table}.i32"


def _write_lookups(root: Path, meta: MultiHotMeta, chunk_rows: int) -> None:
    (root / LOOKUP_DIR).mkdir(exist_ok=True)
    files: dict[int, Any] = {}
    try:
        for table, _, block in lookup_chunks(
            meta.num_embeddings_per_feature,
            meta.multi_hot,
            distribution=meta.distribution,  # type: ignore[arg-type]  # checked by materialize
            seed=meta.seed,
            chunk_rows=chunk_rows,
        ):
            if table not in files:
                files[table] = os.fdopen(create_new(_lookup_path(root, table)), "wb")
            files[table].write(block.tobytes())
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()


def _map_lookup(root: Path, meta: MultiHotMeta, table: int) -> np.memmap[Any, Any]:
    n, hot = meta.num_embeddings_per_feature[table], meta.multi_hot[table]
    path = _lookup_path(root, table)
    if not path.is_file() or path.stat().st_size != n * hot * 4:
        raise DataError(f"{path}: missing or of the wrong size; run with --force to redraw it")
    return np.memmap(path, dtype=np.int32, mode="r", shape=(n, hot))


def _write_npy(path: Path, shape: tuple[int, ...], dtype: str) -> np.memmap[Any, Any]:
    os.close(create_new(path))
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)


def _write_part(
    root: Path, src: Any, index: int, name: str, meta: MultiHotMeta, chunk_rows: int
) -> None:
    """Write one day's three files under ``.partial`` names, then rename them into place."""
    part = src.part(index)
    rows = len(part)
    sizes = meta.num_embeddings_per_feature
    tmp = {s: root / f"{name}{s}.partial" for s in (DENSE_SUFFIX, LABELS_SUFFIX, SPARSE_SUFFIX)}
    dense = _write_npy(tmp[DENSE_SUFFIX], (rows, NUM_DENSE), "<f4")
    labels = _write_npy(tmp[LABELS_SUFFIX], (rows, 1), "<i4")
    for lo in range(0, rows, chunk_rows):
        chunk = src.checked_rows(index, lo, min(rows, lo + chunk_rows))
        dense[lo : lo + len(chunk)] = chunk.dense
        labels[lo : lo + len(chunk), 0] = chunk.labels
    dense.flush()
    labels.flush()
    del dense, labels
    os.close(create_new(tmp[SPARSE_SUFFIX]))
    with zipfile.ZipFile(tmp[SPARSE_SUFFIX], "w") as zf:
        # one pass per table: each array of the .npz is one contiguous member
        for table in range(NUM_SPARSE):
            lookup = _map_lookup(root, meta, table)
            header = {
                "descr": "<i4",
                "fortran_order": False,
                "shape": (rows, meta.multi_hot[table]),
            }
            with zf.open(f"{table}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for lo in range(0, rows, chunk_rows):
                    # the first pass checked every value; here only this table's column is hashed
                    ids = np.asarray(part.sparse[lo : lo + chunk_rows, table : table + 1])
                    one_hot = hash_ids(ids, sizes[table : table + 1])[:, 0]
                    f.write(np.ascontiguousarray(lookup[one_hot]).tobytes())
    for suffix, path in tmp.items():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path, root / f"{name}{suffix}")


def materialize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    multi_hot: str | Sequence[int],
    num_embeddings_per_feature: str | Sequence[int],
    distribution: Distribution = "uniform",
    seed: int = MLPERF_SEED,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> MultiHotMeta:
    """Write MLPerf-style multi-hot data into ``dst`` from ``dlrm preprocess`` output ``src``.

    Refuses a non-empty ``dst`` unless it holds an unfinished run of the same recipe (resumed) or
    ``force``. Errors: :class:`DataError`, ``ValueError`` for bad arguments.
    """
    hot = parse_multi_hot(multi_hot)
    sizes = parse_num_embeddings(None, num_embeddings_per_feature)
    assert sizes is not None
    if distribution not in ("uniform", "pareto"):
        raise ValueError(f"distribution must be 'uniform' or 'pareto', got {distribution!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    source = open_dataset(src, format="preprocessed", num_embeddings_per_feature=sizes)
    root = Path(dst)
    with claim_output(root) as out:
        meta = MultiHotMeta(
            hot, sizes, distribution, seed, str(source.path.resolve()), (), False, False
        )
        if out.entries:
            earlier = _read_meta(root) if MULTIHOT_META in out.entries else None
            if earlier is not None and earlier.same_recipe(meta) and not force:
                meta = earlier
            elif not force:
                refuse_non_empty(out, "multihot")
        if not meta.lookup_complete:
            if log:
                total = sum(n * h for n, h in zip(sizes, hot, strict=True)) * 4
                log(f"drawing the lookups ({total} bytes)")
            _write_meta(root, meta)
            _write_lookups(root, meta, chunk_rows)
            meta = _replace(meta, lookup_complete=True)
            _write_meta(root, meta)
        for index, name in enumerate(source.part_names):
            if name in meta.parts:
                continue
            if log:
                log(f"{name}: {len(source.part(index))} rows")
            _write_part(root, source, index, name, meta, chunk_rows)
            meta = _replace(meta, parts=(*meta.parts, name))
            _write_meta(root, meta)
        meta = _replace(meta, complete=True)
        _write_meta(root, meta)
    return meta


def _replace(meta: MultiHotMeta, **changes: Any) -> MultiHotMeta:
    return MultiHotMeta(**{**asdict(meta), **changes})


class MultiHotDataset:
    """Multi-hot days from one directory, split like the 1TB logs (:mod:`.splits`, ``terabyte``:
    every day but the last trains, the last day's first half validates, its second half tests)."""

    def __init__(
        self,
        root: Path,
        parts: Sequence[MultiHotPart],
        num_embeddings_per_feature: tuple[int, ...] | None,
    ) -> None:
        self.path = root
        self.parts = tuple(parts)
        self.num_embeddings_per_feature = num_embeddings_per_feature
        self.multi_hot = self.parts[0].multi_hot

    def split(self, name: SplitName) -> MultiHotSplit:
        sizes = tuple(p.rows for p in self.parts)
        layout: Layout = "terabyte" if len(sizes) >= 2 else "kaggle"
        return MultiHotSplit(self, name, split_segments(layout, sizes, name))


class MultiHotSplit:
    """The rows of one split, read in the same per-rank batches as :class:`.dataset.Split`."""

    def __init__(
        self, dataset: MultiHotDataset, name: SplitName, segments: Sequence[Segment]
    ) -> None:
        self.dataset = dataset
        self.name = name
        self.segments = tuple(segments)
        self._offsets = np.cumsum([0, *(s.rows for s in self.segments)])

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank gets per epoch (the same on every rank)."""
        ranges = rank_batch_ranges(
            self.num_rows,
            batch_size,
            rank=0,
            world_size=world_size,
            seed=0,
            epoch=0,
            shuffle=False,
            drop_last=drop_last,
        )
        return len(ranges)

    def rows(self, start: int = 0, stop: int | None = None) -> Rows:
        """Rows ``[start, stop)`` as :class:`.schema.Rows` whose ``sparse`` holds each sample's
        ids of every table, table after table (``sum(hot)`` columns): for digests and checks."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        batch = self.batch(start, max(start, stop))
        n = batch.batch_size
        per_key = batch.sparse_features.to_dict()
        sparse = [
            per_key[key].values().reshape(n, hot).numpy()
            for key, hot in zip(SPARSE_KEYS, self.dataset.multi_hot, strict=True)
        ]
        return Rows(
            batch.labels.numpy().astype(np.uint8),
            batch.dense_features.numpy(),
            np.concatenate(sparse, axis=1)
            if n
            else np.empty((0, sum(self.dataset.multi_hot)), np.int64),
        )

    def batch(self, start: int, stop: int) -> Batch:
        """Rows ``[start, stop)`` as a batch; ids outside a table are a :class:`DataError`."""
        import torch

        from shardrec import KeyedJaggedTensor

        dense: list[npt.NDArray[np.float32]] = []
        labels: list[npt.NDArray[np.float32]] = []
        sparse: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(NUM_SPARSE)]
        for seg, offset in zip(self.segments, self._offsets[:-1], strict=True):
            lo, hi = max(start, int(offset)), min(stop, int(offset) + seg.rows)
            if lo >= hi:
                continue
            a, b = seg.start + lo - int(offset), seg.start + hi - int(offset)
            part = self.dataset.parts[seg.part]
            dense.append(np.asarray(part.dense[a:b], dtype=np.float32))
            labels.append(np.asarray(part.labels[a:b], dtype=np.float32))
            for j in range(NUM_SPARSE):
                ids = np.asarray(part.sparse[j][a:b], dtype=np.int64)
                sizes = self.dataset.num_embeddings_per_feature
                if ids.size and (ids.min() < 0 or (sizes and ids.max() >= sizes[j])):
                    bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                    raise DataError(
                        f"{self.dataset.path / (part.name + SPARSE_SUFFIX)}: table {j} holds id "
                        f"{bad} in rows {a}..{b - 1}, outside [0, {sizes[j] if sizes else '...'})"
                    )
                sparse[j].append(ids.reshape(-1))
        hot = self.dataset.multi_hot
        n = sum(len(d) for d in dense)
        values = np.concatenate([np.concatenate(s) if s else np.empty(0, np.int64) for s in sparse])
        kjt = KeyedJaggedTensor(
            keys=list(SPARSE_KEYS),
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(np.repeat(np.asarray(hot, dtype=np.int32), n)),
            stride=n,
        )
        d = np.concatenate(dense) if dense else np.empty((0, NUM_DENSE), np.float32)
        y = np.concatenate(labels) if labels else np.empty(0, np.float32)
        return Batch(torch.from_numpy(d), kjt, torch.from_numpy(y))

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> Iterator[Batch]:
        ranges = rank_batch_ranges(
            self.num_rows,
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            epoch=epoch,
            shuffle=self.name == "train" if shuffle is None else shuffle,
            drop_last=drop_last,
        )
        for lo, hi in ranges[start_batch:]:
            yield self.batch(lo, hi)


def _part_names(root: Path) -> list[str]:
    names = [
        e.name.removesuffix(SPARSE_SUFFIX)
        for e in os.scandir(root)
        if e.name.endswith(SPARSE_SUFFIX)
    ]

    def key(name: str) -> tuple[int, int | str]:
        m = _DAY.fullmatch(name)
        return (0, int(m.group(1))) if m else (1, name)

    return sorted(names, key=key)


def is_multihot(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding ``*_sparse_multi_hot.npz`` files."""
    root = Path(path)
    return root.is_dir() and bool(_part_names(root))


def _check_sizes_hold(path: Path, made: Sequence[int], sizes: Sequence[int]) -> None:
    """Refuse tables smaller than those the ids were drawn from, before any training: reading would
    otherwise stop at the first batch holding a high id, perhaps hours in."""
    for j, (drawn, given) in enumerate(zip(made, sizes, strict=True)):
        if given < drawn:
            raise DataError(
                f"{path}: made with {drawn:,} rows in table {j} ({SPARSE_NAMES[j]}), but the "
                f"model's table has {given:,}: train with the sizes it was made with "
                f"({','.join(map(str, made))})"
            )


def open_multihot(
    path: str | os.PathLike[str],
    *,
    num_embeddings_per_feature: Sequence[int] | str | None = None,
    multi_hot: str | Sequence[int] | None = None,
) -> MultiHotDataset:
    """Open multi-hot days (this shardrec's or the reference's files) and check every file now.

    ``num_embeddings_per_feature``: table sizes that every id is checked against as it is read;
    ``multi_hot``: the ids per sample each table must have. Errors: :class:`DataError`.
    """
    root = Path(path)
    sizes = parse_num_embeddings(None, num_embeddings_per_feature)
    hot = None if multi_hot is None else parse_multi_hot(multi_hot)
    if (root / MULTIHOT_META).exists():
        meta = _read_meta(root)
        if not meta.complete:
            raise DataError(f"{root}: `dlrm multihot` did not finish (run it again to resume)")
        if sizes is not None:
            _check_sizes_hold(root / MULTIHOT_META, meta.num_embeddings_per_feature, sizes)
    names = _part_names(root) if root.is_dir() else []
    if not names:
        raise DataError(f"{root}: no *{SPARSE_SUFFIX} files (multi-hot Criteo days)")
    parts = [MultiHotPart(root, name, hot) for name in names]
    for p in parts[1:]:
        if p.multi_hot != parts[0].multi_hot:
            raise DataError(
                f"{root / (p.name + SPARSE_SUFFIX)}: ids per sample {p.multi_hot} differ from "
                f"{parts[0].name}'s {parts[0].multi_hot}"
            )
    return MultiHotDataset(root, parts, sizes)
