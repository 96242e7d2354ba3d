"""Data you did not make: each test crafts a hostile dataset and checks it is refused with one line
naming the file, before anything outside the dataset is opened, and without hanging."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import numpy as np
import pytest

from shardrec_dlrm.data import DataError, open_dataset, preprocess, read_synth_info, synth

META = "metadata.json"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("made")
    synth(root / "raw", rows=140, seed=7)
    preprocess(root / "raw", root / "pre", workers=1, progress=False)
    return root


@pytest.fixture
def pre(made: Path, tmp_path: Path) -> Path:
    """A fresh copy of a good preprocessed dataset (part ``train``, 140 rows) to tamper with."""
    return Path(shutil.copytree(made / "pre", tmp_path / "pre"))


@contextlib.contextmanager
def _no_hang(seconds: int = 20) -> Iterator[None]:
    """Turn a hang (a blocking open of a FIFO) into a failure instead of a stuck test run."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _make_device(path: Path) -> str:
    """A character device at ``path`` (``/dev/zero``'s numbers where this process may make one,
    else a symlink to ``/dev/zero``); returns the refusal to expect."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        os.symlink("/dev/zero", path)
        return "a character device, not a regular file|outside the dataset directory"
    return "a character device, not a regular file"


def _edit_meta(root: Path, **part: object) -> None:
    meta = json.loads((root / META).read_text())
    meta["parts"][0].update(part)
    (root / META).write_text(json.dumps(meta))


def _one_line(info: pytest.ExceptionInfo[DataError]) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --- files a dataset names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside/train", "{outside}/train", "..", "sub/../train"])
def test_part_names_that_leave_the_directory_are_refused(
    pre: Path, tmp_path: Path, name: str
) -> None:
    outside = Path(shutil.copytree(pre, tmp_path / "outside"))  # would load, were it followed
    _edit_meta(pre, name=name.format(outside=outside))
    with pytest.raises(DataError, match=r"metadata\.json: part name .* is not a plain file name"):
        open_dataset(pre)


def test_symlinks_out_of_the_directory_are_refused_and_inside_allowed(
    pre: Path, tmp_path: Path
) -> None:
    outside = Path(shutil.copytree(pre, tmp_path / "outside"))
    target = pre / "train.sparse.i64"
    target.unlink()
    os.symlink(outside / "train.sparse.i64", target)
    with pytest.raises(DataError, match="outside the dataset directory") as info:
        open_dataset(pre)
    assert str(target) in _one_line(info)

    target.unlink()
    shutil.copy(outside / "train.sparse.i64", pre / "copy.bin")
    os.symlink("copy.bin", target)  # a relative link to a file of the dataset: fine
    assert open_dataset(pre).num_rows == 140


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_part_files_that_are_not_regular_files_are_refused(pre: Path, kind: str) -> None:
    target = pre / "train.dense.f32"
    target.unlink()
    expected = {"fifo": "a FIFO", "directory": "a directory"}
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        expected[kind] = _make_device(target)
    else:
        target.mkdir()
    with _no_hang(), pytest.raises(DataError, match=expected[kind]) as info:
        open_dataset(pre)
    assert _one_line(info).startswith(f"{target}: ")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge", "deep", "symlink_out", "bool_rows"])
def test_hostile_metadata_files(pre: Path, tmp_path: Path, kind: str) -> None:
    meta = pre / META
    good = meta.read_text()
    meta.unlink()
    if kind == "fifo":
        os.mkfifo(meta)
        expected = "a FIFO, not a regular file"
    elif kind == "dev_zero":
        expected = _make_device(meta)
    elif kind == "huge":
        with meta.open("wb") as f:
            f.truncate(17 << 20)  # sparse: no disk used
        expected = "larger than 16777216 bytes"
    elif kind == "deep":
        meta.write_text("[" * 200_000 + "]" * 200_000)
        expected = "nested too deeply"
    elif kind == "symlink_out":
        (tmp_path / "elsewhere.json").write_text(good)
        os.symlink(tmp_path / "elsewhere.json", meta)
        expected = "outside the dataset directory"
    else:
        meta.write_text(good)
        _edit_meta(pre, rows=True)
        expected = "invalid row count True"
    with _no_hang(), pytest.raises(DataError, match=expected) as info:
        open_dataset(pre)
    assert _one_line(info).startswith(f"{meta}: ")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge"])
def test_hostile_synth_records(made: Path, tmp_path: Path, kind: str) -> None:
    root = Path(shutil.copytree(made / "raw", tmp_path / "raw"))
    assert read_synth_info(root).rows == 140
    record = root / "synth.json"
    record.unlink()
    if kind == "fifo":
        os.mkfifo(record)
    elif kind == "dev_zero":
        _make_device(record)
    else:
        record.write_bytes(b" " * (2 << 20))
    with _no_hang(), pytest.raises(DataError, match=r"synth\.json: ") as info:
        read_synth_info(root)
    _one_line(info)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_raw_sources_that_are_not_regular_files_are_refused(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "day_0"
    if kind == "fifo":
        os.mkfifo(src)
    else:
        os.symlink("/dev/zero", src)
    for fmt in ("auto", "tsv"):
        with _no_hang(), pytest.raises(DataError, match="not a regular file"):
            open_dataset(src, format=fmt)  # type: ignore[arg-type]
        with _no_hang(), pytest.raises(DataError, match="not a regular file"):
            preprocess(src, tmp_path / f"out_{fmt}", format=fmt, progress=False)  # type: ignore[arg-type]


# --- values the files hold ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "dtype", "row", "column", "value", "message"),
    [
        ("labels.u8", np.uint8, 130, 0, 7, r"train\.labels\.u8: row 130: label 7, expected 0 or 1"),
        ("sparse.i64", np.int64, 3, 2, -7, r"train\.sparse\.i64: row 3: C3 id -7, expected -1"),
        ("sparse.i64", np.int64, 0, 25, 1 << 32, r"row 0: C26 id 4294967296, expected -1"),
        ("dense.f32", np.float32, 60, 4, np.nan, r"train\.dense\.f32: row 60: I5 is nan"),
        ("dense.f32", np.float32, 61, 0, -1.0, r"train\.dense\.f32: row 61: I1 is -1\.0"),
        ("dense.f32", np.float32, 62, 12, np.inf, r"train\.dense\.f32: row 62: I13 is inf"),
    ],
)
def test_values_a_preprocessed_file_cannot_hold_stop_the_read(
    pre: Path,
    suffix: str,
    dtype: type[np.generic],
    row: int,
    column: int,
    value: float,
    message: str,
) -> None:
    path = pre / f"train.{suffix}"
    data = np.fromfile(path, dtype=dtype).reshape(140, -1)
    data[row, column] = value
    data.tofile(path)
    ds = open_dataset(pre, num_embeddings=1000)  # opening is cheap: sizes and names only
    split = {130: "test", 3: "train", 0: "train"}.get(row, "train")
    with pytest.raises(DataError, match=message) as info:
        for _ in ds.split(split).batches(16, shuffle=False):
            pass
    _one_line(info)


def test_every_good_value_reads(pre: Path) -> None:
    """The checks refuse nothing the transform can produce: the extremes of each column."""
    n = 140
    np.full(n, 1, np.uint8).tofile(pre / "train.labels.u8")
    dense = np.zeros((n, 13), np.float32)
    dense[::2] = np.log1p(np.float32(10**18 - 1))  # the largest 18-digit count
    dense.tofile(pre / "train.dense.f32")
    sparse = np.full((n, 26), -1, np.int64)
    sparse[::2] = (1 << 32) - 1
    sparse[1::4] = 0
    sparse.tofile(pre / "train.sparse.i64")
    ds = open_dataset(pre, num_embeddings=1000)
    rows = sum(b.batch_size for name in ("train", "val", "test") for b in ds.split(name).batches(7))
    assert rows == n


def test_training_stops_at_a_bad_value_with_one_line(pre: Path) -> None:
    """What `dlrm train` does with the label 7 it meets mid-epoch: exit 1 and the one line."""
    from click.testing import CliRunner

    from shardrec_dlrm.cli import main

    labels = np.fromfile(pre / "train.labels.u8", dtype=np.uint8)
    labels[100] = 7  # in the training split, read after the first batches
    labels.tofile(pre / "train.labels.u8")
    args = ["train", "--data", str(pre), "--batch-size", "16", "--num-embeddings", "100"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "Error: " in line]
    assert errors == [f"Error: {pre / 'train.labels.u8'}: row 100: label 7, expected 0 or 1"]
