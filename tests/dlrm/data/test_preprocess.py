"""``preprocess``: raw -> preprocessed -> batches equal to reading raw; resume; atomic; memory."""

from __future__ import annotations

import gzip
import importlib
import json
import os
import shutil
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from shardrec_dlrm.data import Batch, DataError, open_dataset, preprocess, read_metadata
from shardrec_dlrm.data.preprocess import PARSE_PEAK_FACTOR
from shardrec_dlrm.data.synth import synth

from .._criteo_paths import SAMPLE_CSV, SAMPLE_TSV, require_samples

SIZES = [1000] * 20 + [7, 50, 3, 2, 100000, 64]


def _assert_same_batches(a: Iterable[Batch], b: Iterable[Batch]) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.dense_features, y.dense_features)
        assert torch.equal(x.labels, y.labels)
        assert x.sparse_features.keys() == y.sparse_features.keys()
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
        assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())
        n += 1
    return n


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_kaggle_layout(tmp_path: Path, workers: int) -> None:
    synth(tmp_path / "raw", rows=3000, seed=4)
    report = preprocess(
        tmp_path / "raw", tmp_path / "pre", workers=workers, chunk_bytes=50_000, progress=False
    )
    assert report.written == ["train"]
    assert report.rows == 3000
    raw = open_dataset(tmp_path / "raw", num_embeddings_per_feature=SIZES)
    pre = open_dataset(tmp_path / "pre", num_embeddings_per_feature=SIZES)
    assert pre.format == "preprocessed"
    assert pre.layout == "kaggle" == raw.layout
    for split in ("train", "val", "test"):
        assert raw.split(split).num_rows == pre.split(split).num_rows
        for world_size in (1, 3):
            for rank in range(world_size):
                n = _assert_same_batches(
                    raw.split(split).batches(64, rank=rank, world_size=world_size, seed=5, epoch=1),
                    pre.split(split).batches(64, rank=rank, world_size=world_size, seed=5, epoch=1),
                )
                assert n == raw.split(split).num_batches(64, world_size)


def test_round_trip_real_rows_gzip_days_and_csv(tmp_path: Path) -> None:
    require_samples()
    days = tmp_path / "days"
    days.mkdir()
    lines = SAMPLE_TSV.read_bytes().splitlines(keepends=True)
    for d in range(3):
        (days / f"day_{d}.gz").write_bytes(gzip.compress(b"".join(lines[d * 30 : d * 30 + 40])))
    preprocess(days, tmp_path / "days_pre", workers=1, progress=False)
    raw = open_dataset(days, num_embeddings=97)
    pre = open_dataset(tmp_path / "days_pre", num_embeddings=97)
    assert pre.layout == "terabyte"
    assert pre.part_names == ("day_0", "day_1", "day_2")
    for split in ("train", "val", "test"):
        _assert_same_batches(raw.split(split).batches(16), pre.split(split).batches(16))
    np.testing.assert_array_equal(pre.part(2).sparse, raw.part(2).sparse)

    preprocess(SAMPLE_CSV, tmp_path / "csv_pre", workers=1, progress=False)
    raw = open_dataset(SAMPLE_CSV, num_embeddings=1000)
    pre = open_dataset(tmp_path / "csv_pre", num_embeddings=1000)
    assert read_metadata(tmp_path / "csv_pre").source_format == "csv"
    _assert_same_batches(raw.split("train").batches(32), pre.split("train").batches(32))


def _tb_dir(root: Path, bad_day: int | None) -> Path:
    require_samples()
    root.mkdir(exist_ok=True)
    lines = SAMPLE_TSV.read_text().splitlines(keepends=True)
    for d in range(3):
        day = list(lines)
        if d == bad_day:
            day[56] = day[56].replace("\t", "\tx", 1)
        (root / f"day_{d}").write_text("".join(day))
    return root


def test_interrupted_run_leaves_finished_parts_and_resumes(tmp_path: Path) -> None:
    src = _tb_dir(tmp_path / "src", bad_day=2)
    dst = tmp_path / "dst"
    with pytest.raises(DataError, match=r"day_2:57: I1 is not an integer"):
        preprocess(src, dst, workers=1, chunk_bytes=3000, progress=False)
    names = sorted(p.name for p in dst.iterdir())
    assert not [n for n in names if n.endswith(".partial")]  # the unfinished part was removed
    assert not [n for n in names if n.startswith("day_2")]
    assert read_metadata(dst).complete is False
    assert [p.name for p in read_metadata(dst).parts] == ["day_0", "day_1"]
    with pytest.raises(DataError, match="did not finish"):
        open_dataset(dst)
    before = {p.name: p.stat().st_mtime_ns for p in dst.glob("day_*")}

    (src / "day_2").write_bytes(SAMPLE_TSV.read_bytes())  # repaired; day_0 and day_1 untouched
    report = preprocess(src, dst, workers=1, progress=False)
    assert report.resumed == ["day_0", "day_1"]
    assert report.written == ["day_2"]
    after = {p.name: p.stat().st_mtime_ns for p in dst.glob("day_*") if p.name in before}
    assert after == before  # finished files were not rewritten
    ds = open_dataset(dst)
    assert ds.part_rows() == (100, 100, 100)
    np.testing.assert_array_equal(ds.part(2).sparse, open_dataset(src).part(2).sparse)

    os.utime(src / "day_1", ns=(1, 1))  # a changed source is redone
    report = preprocess(src, dst, workers=1, progress=False)
    assert report.resumed == ["day_0", "day_2"]
    assert report.written == ["day_1"]


def test_bad_rows_skip_counts_per_file(tmp_path: Path) -> None:
    src = _tb_dir(tmp_path / "src", bad_day=1)
    text = (src / "day_2").read_text().splitlines(keepends=True)
    text[3] = "1\t2\t3\n"
    fields = text[9].split("\t")
    fields[14] = "68fd1e6g"  # C1 not hex
    text[9] = "\t".join(fields)
    (src / "day_2").write_text("".join(text))
    report = preprocess(src, tmp_path / "dst", bad_rows="skip", workers=1, progress=False)
    counts = {Path(k).name: v for k, v in report.bad_rows.items()}
    assert counts == {"day_0": 0, "day_1": 1, "day_2": 2}
    assert open_dataset(tmp_path / "dst").part_rows() == (100, 99, 98)
    raw = open_dataset(src, bad_rows="skip")
    assert raw.part_rows() == (100, 99, 98)
    assert {Path(k).name: v for k, v in raw.bad_rows.items()} == counts


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_is_bounded_independently_of_input_size(tmp_path: Path, workers: int) -> None:
    chunk = 32 << 10
    # the documented bound: one parse at a time in this thread, or 2 x workers chunks in flight
    in_flight = 1 if workers == 1 else 2 * workers + 1
    bound = in_flight * (PARSE_PEAK_FACTOR + 1) * chunk + (3 << 20)  # + 3 MiB fixed
    peaks = {}
    for rows in (10_000, 50_000):
        synth(tmp_path / f"raw{rows}", rows=rows, seed=0)
        size = (tmp_path / f"raw{rows}" / "train.txt").stat().st_size
        preprocess(tmp_path / f"raw{rows}", tmp_path / "warm", workers=workers, progress=False)
        shutil.rmtree(tmp_path / "warm")
        tracemalloc.start()
        try:
            preprocess(
                tmp_path / f"raw{rows}", tmp_path / f"pre{rows}", workers=workers,
                chunk_bytes=chunk, progress=False,
            )  # fmt: skip
            peaks[rows] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peaks[rows] < bound
    assert size > 1.5 * bound  # the larger input is well over the bound
    assert peaks[50_000] < 1.5 * peaks[10_000]  # 5x the rows, about the same peak


def test_metadata_mismatches_are_one_line_errors(tmp_path: Path) -> None:
    synth(tmp_path / "raw", rows=500, seed=1)
    dst = tmp_path / "pre"
    preprocess(tmp_path / "raw", dst, workers=1, progress=False)
    meta_path = dst / "metadata.json"
    good = meta_path.read_text()

    sparse = dst / "train.sparse.i64"
    data = sparse.read_bytes()
    sparse.write_bytes(data[:-8])
    with pytest.raises(
        DataError, match=r"train\.sparse\.i64: 103992 bytes, but metadata.json says 500"
    ):
        open_dataset(dst)
    sparse.write_bytes(data)

    meta = json.loads(good)
    meta["parts"][0]["rows"] = 501
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not match the files"):
        open_dataset(dst)

    meta_path.write_text(good)
    (dst / "train.labels.u8").unlink()
    with pytest.raises(DataError, match=r"train\.labels\.u8: metadata lists part 'train'"):
        open_dataset(dst)

    meta_path.write_text("{not json")
    with pytest.raises(DataError, match=r"metadata\.json: not valid JSON"):
        open_dataset(dst)
    meta_path.write_text(good.replace('"version": 1', '"version": 99'))
    with pytest.raises(DataError, match="layout version 99"):
        open_dataset(dst)
    meta_path.write_text(good.replace("log(1 + max(x, 0))", "log(x + 3)"))
    with pytest.raises(DataError, match="another transform"):
        open_dataset(dst)


def test_output_of_other_sources_is_not_overwritten(tmp_path: Path) -> None:
    synth(tmp_path / "a", rows=200, seed=1)
    synth(tmp_path / "b", rows=200, seed=2)
    preprocess(tmp_path / "a", tmp_path / "pre", workers=1, progress=False)
    with pytest.raises(DataError, match="other sources"):
        preprocess(tmp_path / "b", tmp_path / "pre", workers=1, progress=False)
    with pytest.raises(DataError, match="already preprocessed"):
        preprocess(tmp_path / "pre", tmp_path / "pre2", workers=1, progress=False)


def test_worker_processes_report_bad_rows_with_their_line(tmp_path: Path) -> None:
    src = _tb_dir(tmp_path / "src", bad_day=1)
    with pytest.raises(DataError, match=r"day_1:57: I1 is not an integer"):
        preprocess(src, tmp_path / "dst", workers=2, chunk_bytes=2000, progress=False)
    assert [p.name for p in read_metadata(tmp_path / "dst").parts] == ["day_0"]
    assert not list((tmp_path / "dst").glob("*.partial"))


@pytest.mark.parametrize("kind", ["tsv", "gzip", "csv"])
def test_interrupted_inside_a_file_resumes_from_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    synth(tmp_path / "raw", rows=3000, seed=6)
    src = tmp_path / "raw" / "train.txt"
    if kind == "gzip":
        src = tmp_path / "gz" / "train.txt.gz"
        src.parent.mkdir()
        src.write_bytes(gzip.compress((tmp_path / "raw" / "train.txt").read_bytes()))
    elif kind == "csv":
        require_samples()
        src = SAMPLE_CSV  # 200 rows and a header: checkpoints every ~3 chunks of ~5 kB
    size = 5_000 if kind == "csv" else 20_000
    options = {"workers": 1, "chunk_bytes": size, "checkpoint_bytes": 2 * size, "progress": False}
    preprocess(src, tmp_path / "reference", **options)  # type: ignore[arg-type]

    module = importlib.import_module("shardrec_dlrm.data.preprocess")  # the name is re-exported
    real, calls = module.parse_job, []

    def interrupted(job):  # type: ignore[no-untyped-def]
        calls.append(job.first_line)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(module, "parse_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess(src, tmp_path / "dst", **options)  # type: ignore[arg-type]
    monkeypatch.setattr(module, "parse_job", real)
    part = "criteo_sample" if kind == "csv" else "train"
    checkpoint = json.loads((tmp_path / "dst" / f"{part}.resume.json").read_text())
    assert 0 < checkpoint["rows"] < (200 if kind == "csv" else 3000)
    assert (tmp_path / "dst" / f"{part}.sparse.i64.partial").exists()

    logged: list[str] = []
    report = preprocess(src, tmp_path / "dst", log=logged.append, **options)  # type: ignore[arg-type]
    assert report.resumed_within == {part: checkpoint["rows"]}
    assert f"resuming {part} at line {checkpoint['next_line']}" in logged[0]
    assert not (tmp_path / "dst" / f"{part}.resume.json").exists()
    for suffix in ("labels.u8", "dense.f32", "sparse.i64"):
        assert (tmp_path / "dst" / f"{part}.{suffix}").read_bytes() == (
            tmp_path / "reference" / f"{part}.{suffix}"
        ).read_bytes()
