"""``dlrm preprocess``: raw Criteo -> the memory-mapped layout of :mod:`.layout`, streaming and
resumable.

How it runs: the main thread reads each source file in line-aligned chunks of ``chunk_bytes``
(gzip is decompressed there), a pool of ``workers`` threads parses chunks
(:func:`.reader.parse_job`: numpy calls on whole chunks, which release the GIL), and the main thread
appends the parsed columns, in order, to ``<part>.*.partial`` files. When a file is done its three
outputs are fsynced and renamed into place and ``metadata.json`` is rewritten (atomically) to list
it, so an interrupted run resumes at the first unfinished file: finished files whose source has the
same size and mtime are not redone. Inside a file, every ``checkpoint_bytes`` of text (256 MiB) the
partial outputs are fsynced and ``<part>.resume.json`` records the offset, line and rows they hold:
a rerun on an unchanged source truncates the partial files to that point and continues from there.
The output directory is claimed first (:mod:`.outdir`): created, locked against a second run, and
refused if it holds anything but an earlier run's output on the same sources, unless ``force``.

Memory bound (independent of the input size): at most ``2 * workers`` chunks of C = ``chunk_bytes``
are in flight, each parsed or waiting to be written. Parsing one chunk peaks at
:data:`PARSE_PEAK_FACTOR` x C (about 18 x C measured with tracemalloc), a parsed chunk holds about
1.1 x C, and the reader one more chunk, plus the start of a line that straddles two reads (at most
max(64 KiB, C): :func:`.sources.iter_chunks` refuses a longer line as it comes). In total that is
at most ``(2 * workers + 1) * 21 * C`` plus a few MiB of fixed overhead, whatever the size of the
input. With the defaults (C = 1 MiB, at most 8 workers) that is under 400 MiB, and about 110 MiB
with 2 workers.
``tests/dlrm/data/test_preprocess.py`` checks the bound with tracemalloc on an input almost three
times its size.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np

from .errors import DataError
from .files import MAX_RECORD_BYTES, create_new, read_small, write_atomic
from .layout import COLUMNS, PartMeta, PreprocessedMeta, read_metadata, write_metadata
from .outdir import OutputDir, claim_output, refuse_non_empty
from .reader import DEFAULT_CHUNK_BYTES, ChunkJob, iter_jobs, parse_job
from .schema import Rows
from .sources import METADATA_NAME, Chunk, Discovered, Format, SourceFile, discover
from .tsv import BadRows

#: Peak bytes allocated while parsing a TSV chunk, per byte of chunk (checked by
#: tests/dlrm/data/test_preprocess.py).
PARSE_PEAK_FACTOR: Final = 20


#: Text between two checkpoints inside a file (each costs an fsync of the partial outputs).
DEFAULT_CHECKPOINT_BYTES: Final = 256 << 20
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
    #: Parts continued from a checkpoint inside the file: rows that were kept.
    resumed_within: dict[str, int] = field(default_factory=dict)
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


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    """How far an unfinished part got: what ``<part>.resume.json`` holds."""

    source: str
    source_size: int
    source_mtime_ns: int
    offset: int  # in the decompressed text, just after the last line written
    next_line: int
    rows: int
    bad_rows: int


def _reopen(path: Path) -> int:
    """A partial output of an earlier run, opened to continue it (never through a symlink)."""
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from None


class _PartWriter:
    """Appends parsed rows to the three ``.partial`` files of one part; ``commit`` renames them.

    ``checkpoint`` fsyncs the partial files and then records, atomically, how far they go in
    ``<part>.resume.json``; a later run whose source is unchanged truncates the partial files to
    that point and continues from there instead of from the first line.
    """

    def __init__(self, root: Path, name: str, key: tuple[str, int, int]) -> None:
        self.finals = [root / f"{name}.{suffix}" for suffix, _, _ in COLUMNS]
        self.temps = [p.with_name(p.name + ".partial") for p in self.finals]
        self.resume_file = root / f"{name}.resume.json"
        self.key = key
        self.start = self._load()
        self.rows = self.start.rows if self.start else 0
        self.bad_rows = self.start.bad_rows if self.start else 0
        self.files: list[BinaryIO] = []
        for tmp, (_, dtype, width) in zip(self.temps, COLUMNS, strict=True):
            f = os.fdopen(_reopen(tmp) if self.start else create_new(tmp), "r+b")
            f.truncate(self.rows * width * dtype.itemsize)
            f.seek(0, os.SEEK_END)
            self.files.append(f)

    def _load(self) -> _Checkpoint | None:
        if not os.path.lexists(self.resume_file):
            return None
        try:
            cp = _Checkpoint(**json.loads(read_small(self.resume_file, MAX_RECORD_BYTES)))
        except (DataError, ValueError, TypeError, RecursionError):
            return None  # not a checkpoint this shardrec wrote: start the part again
        if (cp.source, cp.source_size, cp.source_mtime_ns) != self.key:
            return None
        for tmp, (_, dtype, width) in zip(self.temps, COLUMNS, strict=True):
            if tmp.is_symlink() or not tmp.is_file():
                return None
            if tmp.stat().st_size < cp.rows * width * dtype.itemsize:
                return None
        return cp

    def write(self, rows: Rows, bad: int) -> None:
        for f, arr in zip(self.files, (rows.labels, rows.dense, rows.sparse), strict=True):
            f.write(np.ascontiguousarray(arr).data)
        self.rows += len(rows)
        self.bad_rows += bad

    def _sync(self) -> None:
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())

    def checkpoint(self, offset: int, next_line: int) -> None:
        self._sync()
        cp = _Checkpoint(*self.key, offset, next_line, self.rows, self.bad_rows)
        write_atomic(self.resume_file, json.dumps(asdict(cp)))

    def commit(self) -> None:
        self._sync()
        for f in self.files:
            f.close()
        for tmp, final in zip(self.temps, self.finals, strict=True):
            os.replace(tmp, final)
        self.resume_file.unlink(missing_ok=True)

    def abort(self) -> None:
        """Close; keep the partial files only if a checkpoint says how far they are valid."""
        for f in self.files:
            f.close()
        if not self.resume_file.exists():
            for tmp in self.temps:
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
    # cores: 8 threads beat 16 processes, with no per-process memory).
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlrm-preprocess")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _parsed(
    pool: ThreadPoolExecutor | None, jobs: Iterator[tuple[ChunkJob, Chunk]], in_flight: int
) -> Iterator[tuple[tuple[Rows, int], Chunk]]:
    """Parse results in file order, keeping at most ``in_flight`` chunks submitted at once."""
    if pool is None:
        for job, consumed in jobs:
            yield parse_job(job), consumed
        return
    pending: deque[tuple[Future[tuple[Rows, int]], Chunk]] = deque()
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
    checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> PreprocessReport:
    """Convert raw Criteo at ``src`` into the preprocessed layout at ``dst`` (see the module
    docstring).

    ``dst`` must be new, empty, or the output of an earlier run on the same sources (which is
    resumed); anything else is refused unless ``force``, which writes there anyway and first
    removes the files an earlier run on other sources listed. The run holds ``dst``'s lock
    (:mod:`.outdir`): a second run on the same ``dst`` is refused at once. ``workers`` (parsing
    threads) defaults to every core, at most 8; 1 parses in the calling thread. Errors are
    :class:`DataError` (the finished parts stay, the unfinished one is removed, and
    ``metadata.json`` says ``complete: false``).
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
    with claim_output(root) as out:
        earlier = _earlier_parts(out, tuple(str(f.path.resolve()) for f in found.files), force)
        report = _run(
            found,
            root,
            earlier,
            bad_rows=bad_rows,
            workers=workers,
            chunk_bytes=chunk_bytes,
            checkpoint_bytes=checkpoint_bytes,
            progress=progress,
            log=log,
        )
    report.seconds = time.perf_counter() - start
    return report


def _earlier_parts(out: OutputDir, sources: tuple[str, ...], force: bool) -> dict[str, PartMeta]:
    """The parts an earlier run on the same sources left in ``out`` (to resume); refuses any other
    content unless ``force``."""
    root = out.root
    if METADATA_NAME not in out.entries:
        if out.entries and not force:
            refuse_non_empty(out, "preprocess")
        return {}
    try:
        old = read_metadata(root)
    except DataError:
        if not force:
            raise
        return {}  # unreadable: its metadata.json is replaced, other files are left alone
    if old.sources == sources:
        return {p.name: p for p in old.parts}
    if not force:
        raise DataError(
            f"{root}: holds the preprocessed output of other sources; use an empty directory, "
            "or --force (force=True) to replace it"
        )
    for part in old.parts:
        for suffix, _, _ in COLUMNS:
            for name in (f"{part.name}.{suffix}", f"{part.name}.{suffix}.partial"):
                (root / name).unlink(missing_ok=True)
        (root / f"{part.name}.resume.json").unlink(missing_ok=True)
    return {}


def _run(
    found: Discovered,
    root: Path,
    earlier: dict[str, PartMeta],
    *,
    bad_rows: BadRows,
    workers: int,
    chunk_bytes: int,
    checkpoint_bytes: int,
    progress: bool,
    log: Callable[[str], None] | None,
) -> PreprocessReport:
    sources = tuple(str(f.path.resolve()) for f in found.files)
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
                writer = _PartWriter(root, f.part, _source_key(f))
                offset, line = 0, 1
                if writer.start is not None:
                    offset, line = writer.start.offset, writer.start.next_line
                    report.resumed_within[f.part] = writer.rows
                    if log is not None:
                        log(f"resuming {f.part} at line {line} ({writer.rows} rows kept)")
                since_checkpoint = 0
                try:
                    jobs = iter_jobs(
                        f,
                        bad_rows=bad_rows,
                        chunk_bytes=chunk_bytes,
                        start_offset=offset,
                        first_line=line,
                    )
                    for (rows, bad), chunk in _parsed(pool, jobs, 2 * workers):
                        writer.write(rows, bad)
                        bar.update(len(rows), bytes_before + chunk.consumed)
                        since_checkpoint += len(chunk.data)
                        if since_checkpoint >= checkpoint_bytes:
                            writer.checkpoint(chunk.end_offset, chunk.first_line + chunk.lines)
                            since_checkpoint = 0
                except BaseException:
                    writer.abort()
                    raise
                writer.commit()
                done[f.part] = PartMeta(f.part, writer.rows, writer.bad_rows, *_source_key(f))
                report.written.append(f.part)
                report.bad_rows[str(f.path)] = writer.bad_rows
                bytes_before += f.size
                save(complete=len(done) == len(found.files))
    finally:
        bar.close()
    report.rows = sum(p.rows for p in done.values())
    return report
