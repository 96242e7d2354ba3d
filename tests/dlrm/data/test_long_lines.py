"""A raw line without its newline (a file that is not Criteo text, or a hostile one) is reported
after at most ``max(MAX_LINE_BYTES, chunk)`` bytes, and reading it costs no more memory than
reading good rows."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import pytest

from shardrec_dlrm.data import DataError, open_dataset, read_file
from shardrec_dlrm.data.preprocess import PARSE_PEAK_FACTOR
from shardrec_dlrm.data.sources import MAX_LINE_BYTES, SourceFile, iter_chunks

from .._criteo_paths import SAMPLE_TSV, require_samples


def _long_line_file(path: Path, prefix: bytes, size: int, *, gz: bool = False) -> Path:
    """``prefix`` then ``size`` bytes of one line without a newline (tabs and digits: it looks
    like the start of a row). Written in pieces: the test itself stays small."""
    piece = b"1\t" * (1 << 19)
    out = zlib.compressobj(1, zlib.DEFLATED, 31) if gz else None
    with path.open("wb") as f:
        for data in [prefix, *([piece] * (size // len(piece)))]:
            f.write(out.compress(data) if out else data)
        if out:
            f.write(out.flush())
    return path


@pytest.mark.parametrize("chunk", [4 << 10, 64 << 10, 256 << 10])
def test_an_overlong_line_is_reported_within_the_limit(tmp_path: Path, chunk: int) -> None:
    require_samples()
    good = SAMPLE_TSV.read_bytes()
    path = _long_line_file(tmp_path / "day_0", good, 8 << 20)
    limit = max(MAX_LINE_BYTES, chunk)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"day_0:101: a line longer than {limit} bytes"):
            for _ in iter_chunks(path, chunk):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit + (1 << 20)  # not the 8 MiB line, nor a quadratic pile of copies


def test_lines_up_to_the_limit_are_read(tmp_path: Path) -> None:
    """The limit refuses no line a chunk could hold: a line of exactly the limit goes through to
    the parser (which reports its bad fields), one byte more is an over-long line."""
    require_samples()
    first = SAMPLE_TSV.read_bytes().splitlines(keepends=True)[0]
    for extra, message in ((0, "expected 40 tab-separated fields"), (1, "a line longer than")):
        path = tmp_path / f"f{extra}"
        path.write_bytes(first + b"x" * (MAX_LINE_BYTES + extra) + b"\n")
        src = SourceFile(path, "f", "tsv")
        with pytest.raises(DataError, match=rf"f{extra}:2: {message}"):
            read_file(src, chunk_bytes=4096)


def test_an_overlong_gzip_line_stops_decompressing(tmp_path: Path) -> None:
    path = _long_line_file(tmp_path / "day_0.gz", b"", 64 << 20, gz=True)
    assert path.stat().st_size < 1 << 20  # 64 MiB of line in well under 1 MiB of gzip
    with pytest.raises(DataError, match=r"day_0\.gz:1: a line longer than"):
        open_dataset(path, format="tsv").part_rows()
    with gzip.open(path) as f:  # the file itself is fine gzip: only the line is refused
        assert len(f.read(100)) == 100


# The realistic check: a 200 MB line, read by open_dataset and by preprocess with 2 threads at the
# default chunk, in a fresh process whose peak RSS (VmHWM) is compared before and after.
MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from shardrec_dlrm.data import DataError, open_dataset, preprocess

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10

    src, dst = sys.argv[1], sys.argv[2]
    base = hwm()
    errors = []
    try:
        open_dataset(src, format="tsv").part_rows()
    except DataError as e:
        errors.append(str(e))
    try:
        preprocess(src, dst, format="tsv", workers=2, progress=False)
    except DataError as e:
        errors.append(str(e))
    print(json.dumps({"growth": hwm() - base, "errors": errors}))
    """
)


def test_a_200_mb_line_keeps_to_the_documented_memory_bound(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    with path.open("wb") as f:
        f.write(b"1\t" * 1000)
        f.truncate(200_000_000)  # sparse: the rest of the line is NUL bytes, no newline
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(done.stdout)
    assert len(result["errors"]) == 2
    for message in result["errors"]:
        assert message.startswith(f"{path}:1: a line longer than {MAX_LINE_BYTES << 4} bytes")
    # preprocess's documented bound with 2 threads and 1 MiB chunks: (2 * 2 + 1) * 21 MiB + a few
    bound = (2 * 2 + 1) * (PARSE_PEAK_FACTOR + 1) * (1 << 20)
    assert result["growth"] < bound
    assert result["growth"] < 16 << 20  # in fact: about two chunks
