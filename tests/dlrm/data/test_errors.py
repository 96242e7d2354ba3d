"""Every bad input gets a one-line DataError naming the file (and the line for a malformed row)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from shardrec_dlrm.data import DataError, open_dataset, read_file
from shardrec_dlrm.data.sources import discover

from .._criteo_paths import SAMPLE_CSV, SAMPLE_TSV, require_samples


@pytest.fixture(autouse=True)
def _samples() -> None:
    require_samples()


def _with_line(
    tmp_path: Path, index: int, edit: str | None = None, field: int | None = None
) -> Path:
    lines = SAMPLE_TSV.read_text().splitlines(keepends=True)
    if field is None:
        lines[index] = edit if edit is not None else lines[index]
    else:
        fields = lines[index].rstrip("\n").split("\t")
        fields[field] = edit or ""
        lines[index] = "\t".join(fields) + "\n"
    path = tmp_path / "day_0"
    path.write_text("".join(lines))
    return path


def _read(path: Path) -> None:
    read_file(discover(path).files[0], chunk_bytes=1000)


@pytest.mark.parametrize(
    ("index", "edit", "field", "message"),
    [
        (41, "0\t1\t2\n", None, r"day_0:42: expected 40 tab-separated fields, found 3"),
        (41, "x\t1", 12, r"day_0:42: expected 40 tab-separated fields, found 41"),
        (70, "12g4", 3, r"day_0:71: I3 is not an integer: '12g4'"),
        (70, "1.5", 13, r"day_0:71: I13 is not an integer: '1.5'"),
        (70, "-", 2, r"day_0:71: I2 is not an integer: '-'"),
        (70, "68fd1e6z", 14, r"day_0:71: C1 is not a hex id: '68fd1e6z'"),
        (99, "0x12", 39, r"day_0:100: C26 is not a hex id: '0x12'"),
        (0, "2", 0, r"day_0:1: label must be 0 or 1, found '2'"),
        (5, "", 0, r"day_0:6: label must be 0 or 1, found ''"),
    ],
)
def test_malformed_rows_name_file_and_line(
    tmp_path: Path, index: int, edit: str, field: int | None, message: str
) -> None:
    path = _with_line(tmp_path, index, edit, field)
    with pytest.raises(DataError, match=message) as info:
        _read(path)
    assert "\n" not in str(info.value)


def test_csv_errors(tmp_path: Path) -> None:
    lines = SAMPLE_CSV.read_text().splitlines(keepends=True)
    no_c26 = tmp_path / "no_c26.csv"
    no_c26.write_text(lines[0].replace(",C26", ",X") + "".join(lines[1:]))
    with pytest.raises(DataError, match=r"no_c26\.csv:1: CSV header lacks column\(s\) C26"):
        open_dataset(no_c26, format="csv").part_rows()
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "".join(lines[:10]) + lines[10].replace("05db9164", "05db91ZZ", 1) + "".join(lines[11:])
    )
    with pytest.raises(DataError, match=r"bad\.csv:11: C1 is not a hex id: '05db91ZZ'"):
        open_dataset(bad).part_rows()
    assert open_dataset(bad, bad_rows="skip").part_rows() == (199,)
    float_dense = tmp_path / "float.csv"
    float_dense.write_text("".join(lines[:3]) + lines[3].replace(",2.0,", ",2.5,", 1))
    with pytest.raises(DataError, match=r"float\.csv:4: I3 is not an integer: '2.5'"):
        open_dataset(float_dense).part_rows()


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(SAMPLE_TSV.read_bytes())
    (tmp_path / "day_0.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"day_0\.gz: truncated gzip file") as info:
        open_dataset(tmp_path / "day_0.gz").part_rows()
    assert "\n" not in str(info.value)


def test_corrupt_gzip(tmp_path: Path) -> None:
    data = bytearray(gzip.compress(SAMPLE_TSV.read_bytes()))
    data[40:60] = b"\xff" * 20
    (tmp_path / "day_0.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"day_0\.gz: (corrupt gzip data|truncated gzip)"):
        open_dataset(tmp_path / "day_0.gz").part_rows()


def test_empty_directory_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: empty directory \(no data files\)"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "only_notes").mkdir()
    (tmp_path / "only_notes" / "README.md").write_text("x")
    with pytest.raises(DataError, match="empty directory"):
        open_dataset(tmp_path / "only_notes")
    (tmp_path / "nothing.txt").write_text("")
    with pytest.raises(DataError, match=r"nothing\.txt: empty file"):
        open_dataset(tmp_path / "nothing.txt")
    with pytest.raises(DataError, match=r"missing: no such file or directory"):
        open_dataset(tmp_path / "missing")


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = tmp_path / "day_0"
        path.write_bytes(SAMPLE_TSV.read_bytes())
        path.chmod(0)
    else:  # root reads through permissions; /proc/self/mem refuses reads at offset 0 even to root
        path = tmp_path / "day_0"
        path.symlink_to("/proc/self/mem")
    with pytest.raises(DataError, match=r"day_0: cannot read: ") as info:
        open_dataset(path)
    assert "\n" not in str(info.value)


def test_format_mismatches(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a preprocessed directory"):
        open_dataset(SAMPLE_TSV.parent, format="preprocessed")
    with pytest.raises(DataError, match="mixes TSV and CSV"):
        open_dataset(SAMPLE_TSV.parent)
    with pytest.raises(DataError, match="unknown format"):
        open_dataset(SAMPLE_TSV, format="parquet")  # type: ignore[arg-type]
