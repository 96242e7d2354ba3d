"""``dlrm preprocess``: raw Criteo -> the memory-mapped layout of :mod:`.layout`, streaming and
resumable.

How it runs: the main thread reads each source file in line-aligned chunks of ``chunk_bytes``
(gzip is decompressed there), a pool of ``workers`` threads parses chunks
(:func:`.reader.parse_job`: numpy calls on whole chunks, which release the GIL), and the main thread
appends the parsed columns, in order, to ``<part>.*.partial`` files. When a file is done its three
outputs are fsynced and renamed into place and ``metadata.json`` is rewritten (atomically) to list
it, so an interrupted run resumes at the first unfinished file: finished files whose source has the
same size and mtime are not redone.

Memory bound (independent of the input size): at most ``2 * workers`` chunks of C = ``chunk_bytes``
are in flight, each parsed or waiting to be written. Parsing one chunk peaks at
:data:`PARSE_PEAK_FACTOR` x C (about 18 x C measured with tracemalloc), a parsed chunk holds about
1.1 x C, and the reader one more chunk: in total at most ``(2 * workers + 1) * 21 * C`` plus a few
MiB of fixed overhead, whatever the size of the input. With the defaults (C = 1 MiB, at most 8
workers) that is under 400 MiB, and about 110 MiB with 2 workers.
``tests/dlrm/test_data_preprocess.py`` checks the bound with tracemalloc on an input almost three
times its size.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np

from .errors import DataError
from .layout import COLUMNS, PartMeta, PreprocessedMeta, read_metadata, write_metadata
from .reader import DEFAULT_CHUNK_BYTES, ChunkJob, iter_jobs, parse_job
from .schema import Rows
from .sources import METADATA_NAME, Format, SourceFile, discover
from .tsv import BadRows

#: Peak bytes allocated while parsing a TSV chunk, per byte of chunk (checked by
#: tests/dlrm/test_data_preprocess.py).
PARSE_PEAK_FACTOR: Final = 20


#: Parsing threads beyond this gain little: the parts of a chunk's parse that hold the GIL dominate.
MAX_DEFAULT_WORKERS: Final = 8


def cores() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Every core this process may use, up to :data:`MAX_DEFAULT_WORKERS`."""
    return min(cores(), MAX_DEFAULT_WORKERS)


@dataclass(slots=True)
class PreprocessReport:
    """What a run did: parts written now, parts kept from an earlier run, rows, bad rows per
    file."""

    output: Path
    written: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    rows: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _source_key(src: SourceFile) -> tuple[str, int, int]:
    st = src.path.stat()
    return str(src.path.resolve()), st.st_size, st.st_mtime_ns


def _finished(root: Path, part: PartMeta, src: SourceFile) -> bool:
    if (part.source, part.source_size, part.source_mtime_ns) != _source_key(src):
        return False
    for suffix, dtype, width in COLUMNS:
        path = part.file(root, suffix)
        if not path.is_file() or path.stat().st_size != part.rows * width * dtype.itemsize:
            return False
    return True


class _PartWriter:
    """Appends parsed rows to the three ``.partial`` files of one part; ``commit`` renames them."""

    def __init__(self, root: Path, name: str) -> None:
        self.finals = [root / f"{name}.{suffix}" for suffix, _, _ in COLUMNS]
        self.temps = [p.with_name(p.name + ".partial") for p in self.finals]
        self.files: list[BinaryIO] = [p.open("wb") for p in self.temps]
        self.rows = 0

    def write(self, rows: Rows) -> None:
        for f, arr in zip(self.files, (rows.labels, rows.dense, rows.sparse), strict=True):
            f.write(np.ascontiguousarray(arr).data)
        self.rows += len(rows)

    def commit(self) -> None:
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, final in zip(self.temps, self.finals, strict=True):
            os.replace(tmp, final)

    def abort(self) -> None:
        for f, tmp in zip(self.files, self.temps, strict=True):
            f.close()
            tmp.unlink(missing_ok=True)


class _Progress:
    """tqdm bar in rows with rows/s; its total is re-estimated from the bytes read so far."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total_bytes = max(total_bytes, 1)
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self.bar = tqdm(total=None, unit=" rows", unit_scale=True, smoothing=0.1)

    def update(self, rows: int, bytes_now: int) -> None:
        if self.bar is None:
            return
        self.bar.update(rows)
        if bytes_now:
            self.bar.total = round(self.bar.n * self.total_bytes / bytes_now)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    if workers <= 1:
        yield None
        return
    # Threads, not processes: parsing is numpy calls on whole chunks, which release the GIL, so
    # threads use the cores without pickling chunks and results between processes (measured on 16
    # cores: the same peak rows/s as a process pool, with fewer workers and no per-process memory).
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlrm-preprocess")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _parsed(
    pool: ThreadPoolExecutor | None, jobs: Iterator[tuple[ChunkJob, int]], in_flight: int
) -> Iterator[tuple[tuple[Rows, int], int]]:
    """Parse results in file order, keeping at most ``in_flight`` chunks submitted at once."""
    if pool is None:
        for job, consumed in jobs:
            yield parse_job(job), consumed
        return
    pending: deque[tuple[Future[tuple[Rows, int]], int]] = deque()
    try:
        for job, consumed in jobs:
            pending.append((pool.submit(parse_job, job), consumed))
            if len(pending) >= in_flight:
                fut, c = pending.popleft()
                yield fut.result(), c
        while pending:
            fut, c = pending.popleft()
            yield fut.result(), c
    finally:
        for fut, _ in pending:
            fut.cancel()


def preprocess(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    format: Format = "auto",
    bad_rows: BadRows = "error",
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PreprocessReport:
    """Convert raw Criteo at ``src`` into the preprocessed layout at ``dst`` (see the module
    docstring).

    ``workers`` (parsing threads) defaults to every core, at most 8; 1 parses in the calling
    thread. Errors are :class:`DataError` (the finished parts stay, the unfinished one is removed,
    and ``metadata.json`` says ``complete: false``).
    """
    start = time.perf_counter()
    found = discover(src, format)
    if found.format == "preprocessed":
        raise DataError(f"{found.root}: already preprocessed (it has {METADATA_NAME})")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    workers = default_workers() if workers is None else max(1, workers)
    root = Path(dst)
    if root.resolve() in {f.path.resolve().parent for f in found.files} and found.root.is_dir():
        raise DataError(
            f"{root}: write the preprocessed output to another directory than the source"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the output directory: {e.strerror or e}") from None
    sources = tuple(str(f.path.resolve()) for f in found.files)
    earlier: dict[str, PartMeta] = {}
    if (root / METADATA_NAME).exists():
        old = read_metadata(root)
        if old.sources != sources:
            raise DataError(
                f"{root}: holds the preprocessed output of other sources; use an empty directory"
            )
        earlier = {p.name: p for p in old.parts}
    report = PreprocessReport(root)
    done: dict[str, PartMeta] = {}
    todo: list[SourceFile] = []
    for f in found.files:
        part = earlier.get(f.part)
        if part is not None and _finished(root, part, f):
            done[f.part] = part
            report.resumed.append(f.part)
            report.bad_rows[str(f.path)] = part.bad_rows
        else:
            todo.append(f)

    def save(complete: bool) -> None:
        parts = tuple(done[f.part] for f in found.files if f.part in done)
        meta = PreprocessedMeta(found.format, found.layout, parts, complete, sources)
        write_metadata(root, meta)

    save(complete=not todo)
    if report.resumed and log is not None:
        log(f"resuming: {len(report.resumed)} finished part(s) kept ({', '.join(report.resumed)})")
    bar = _Progress(sum(f.size for f in todo), progress and bool(todo))
    bytes_before = 0
    try:
        with _executor(workers) as pool:
            for f in todo:
                writer = _PartWriter(root, f.part)
                skipped = 0
                try:
                    jobs = (
                        (job, chunk.consumed)
                        for job, chunk in iter_jobs(f, bad_rows=bad_rows, chunk_bytes=chunk_bytes)
                    )
                    for (rows, bad), consumed in _parsed(pool, jobs, 2 * workers):
                        writer.write(rows)
                        skipped += bad
                        bar.update(len(rows), bytes_before + consumed)
                except BaseException:
                    writer.abort()
                    raise
                writer.commit()
                key = _source_key(f)
                done[f.part] = PartMeta(f.part, writer.rows, skipped, *key)
                report.written.append(f.part)
                report.bad_rows[str(f.path)] = skipped
                bytes_before += f.size
                save(complete=len(done) == len(found.files))
    finally:
        bar.close()
    report.rows = sum(p.rows for p in done.values())
    report.seconds = time.perf_counter() - start
    return report
