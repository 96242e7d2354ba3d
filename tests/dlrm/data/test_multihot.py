"""Multi-hot Criteo (MLPerf DLRMv2 style): the reference's lookup, materialising, reading."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shardrec_dlrm.data import DataError, open_dataset, preprocess
from shardrec_dlrm.data.multihot import MULTIHOT_META, materialize, open_multihot
from shardrec_dlrm.data.multihot_lookup import MLPERF_MULTI_HOT, lookup_chunks, parse_multi_hot
from shardrec_dlrm.data.schema import hash_ids

SIZES = [7, 5, 11, 3] * 6 + [13, 2]
HOT = [3, 1, 4, 2] * 6 + [5, 1]


def _lookups(sizes: list[int], hot: list[int], **kw: object) -> list[np.ndarray]:
    out = [np.full((n, h), -1, np.int32) for n, h in zip(sizes, hot, strict=True)]
    for t, lo, block in lookup_chunks(sizes, hot, **kw):  # type: ignore[arg-type]
        out[t][lo : lo + len(block)] = block
    return out


def test_lookup_rows_are_the_references_fixed_rows() -> None:
    # Written down from the reference algorithm (torchrec_dlrm/multi_hot.py, class Multihot, in
    # facebookresearch/dlrm and mlcommons/training recommendation_v2): np.random.seed(0) once,
    # then per table [arange(n), randint(0, n, (n, hot - 1))], tables in order.
    got = _lookups([7, 5, 11, 3], [3, 1, 4, 2], chunk_rows=2)
    assert got[0].tolist() == [
        [0, 4, 5],
        [1, 0, 3],
        [2, 3, 3],
        [3, 1, 3],
        [4, 5, 2],
        [5, 4, 6],
        [6, 0, 0],
    ]
    assert got[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert got[2][:3].tolist() == [[0, 10, 1, 6], [1, 7, 7, 8], [2, 1, 5, 9]]
    pareto = _lookups([7, 5, 11, 3], [3, 1, 4, 2], distribution="pareto", chunk_rows=3)
    assert pareto[0][:3].tolist() == [[0, 2, 3], [1, 4, 1], [2, 1, 6]]
    assert pareto[2][:3].tolist() == [[0, 0, 0, 0], [1, 8, 4, 3], [2, 4, 8, 10]]


@pytest.mark.parametrize("distribution", ["uniform", "pareto"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_drawing_in_chunks_equals_the_whole_table_draw(distribution: str, chunk_rows: int) -> None:
    # the reference draws each table in one call; a chunked draw must give the same rows
    rng = np.random.RandomState(0)
    want = []
    for n, h in zip(SIZES, HOT, strict=True):
        if distribution == "uniform":
            extra = rng.randint(0, n, size=(n, h - 1))
        else:
            with np.errstate(invalid="ignore"):
                extra = rng.pareto(a=0.25, size=(n, h - 1)).astype(np.int32) % n
        want.append(np.concatenate((np.arange(n)[:, None], extra), axis=-1).astype(np.int32))
    got = _lookups(SIZES, HOT, distribution=distribution, chunk_rows=chunk_rows)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w, g)


def test_parse_multi_hot() -> None:
    assert parse_multi_hot("mlperf") == MLPERF_MULTI_HOT
    assert sum(MLPERF_MULTI_HOT) == 214
    assert parse_multi_hot(",".join(map(str, HOT))) == tuple(HOT)
    with pytest.raises(ValueError, match="26 values"):
        parse_multi_hot("1,2")
    with pytest.raises(ValueError, match="C2 must be >= 1"):
        parse_multi_hot([1, 0] + [1] * 24)


def _raw_days(root: Path, days: int = 3, rows: int = 9) -> Path:
    rng = np.random.default_rng(1)
    raw = root / "raw"
    raw.mkdir()
    for d in range(days):
        lines = []
        for _ in range(rows):
            dense = [str(int(x)) for x in rng.integers(0, 50, 13)]
            cats = [f"{int(x):08x}" if x % 5 else "" for x in rng.integers(0, 2**32, 26)]
            lines.append("\t".join([str(int(rng.integers(0, 2))), *dense, *cats]))
        (raw / f"day_{d}").write_text("\n".join(lines) + "\n")
    pre = root / "pre"
    preprocess(raw, pre, progress=False)
    return pre


def test_materialize_writes_the_references_layout_and_reads_back(tmp_path: Path) -> None:
    pre = _raw_days(tmp_path)
    out = tmp_path / "mh"
    meta = materialize(pre, out, multi_hot=HOT, num_embeddings_per_feature=SIZES, chunk_rows=4)
    assert meta.complete
    assert meta.parts == ("day_0", "day_1", "day_2")
    # the reference's names, loadable by plain numpy
    npz = np.load(out / "day_1_sparse_multi_hot.npz")
    assert sorted(npz.files, key=int) == [str(j) for j in range(26)]
    one_hot = open_dataset(pre, num_embeddings_per_feature=SIZES)
    lookups = _lookups(SIZES, HOT)
    ids = hash_ids(np.asarray(one_hot.part(1).sparse), SIZES)
    for j in range(26):
        assert npz[str(j)].dtype == np.int32
        np.testing.assert_array_equal(npz[str(j)], lookups[j][ids[:, j]])
    np.testing.assert_array_equal(np.load(out / "day_1_labels.npy")[:, 0], one_hot.part(1).labels)
    np.testing.assert_array_equal(np.load(out / "day_1_dense.npy"), one_hot.part(1).dense)

    ds = open_multihot(out, num_embeddings_per_feature=SIZES, multi_hot=HOT)
    train, val, test = ds.split("train"), ds.split("val"), ds.split("test")
    assert (train.num_rows, val.num_rows, test.num_rows) == (18, 5, 4)
    batch = next(val.batches(5))
    kjt = batch.sparse_features
    assert kjt.lengths().tolist() == [h for h in HOT for _ in range(5)]
    day2 = hash_ids(np.asarray(one_hot.part(2).sparse), SIZES)
    per_key = kjt.to_dict()
    for j in (0, 2, 24):
        want = lookups[j][day2[:5, j]].reshape(-1)
        assert per_key[f"cat_{j}"].values().tolist() == want.tolist()
    assert torch.equal(
        batch.labels, torch.from_numpy(one_hot.part(2).labels[:5].astype(np.float32))
    )


def test_open_refuses_tables_smaller_than_the_data_was_made_for(tmp_path: Path) -> None:
    pre = _raw_days(tmp_path, days=2)
    out = tmp_path / "mh"
    materialize(pre, out, multi_hot=HOT, num_embeddings_per_feature=SIZES)
    smaller = [*SIZES[:3], SIZES[3] - 1, *SIZES[4:]]
    with pytest.raises(DataError, match=r"multihot\.json: made with .* rows in table 3 \(C4\)"):
        open_multihot(out, num_embeddings_per_feature=smaller)
    # larger tables hold every id: accepted, as are the sizes it was made with
    larger = [size + 1 for size in SIZES]
    assert open_multihot(out, num_embeddings_per_feature=larger).num_embeddings_per_feature
    assert open_multihot(out, num_embeddings_per_feature=SIZES).num_embeddings_per_feature


def test_materialize_resumes_refuses_and_forces(tmp_path: Path) -> None:
    pre = _raw_days(tmp_path, days=2)
    out = tmp_path / "mh"
    materialize(pre, out, multi_hot=HOT, num_embeddings_per_feature=SIZES)
    first = (out / "day_0_sparse_multi_hot.npz").read_bytes()
    # same recipe: nothing to do, files untouched
    materialize(pre, out, multi_hot=HOT, num_embeddings_per_feature=SIZES)
    assert (out / "day_0_sparse_multi_hot.npz").read_bytes() == first
    # another recipe into the same directory needs --force
    with pytest.raises(DataError, match=r"not empty.*--force"):
        materialize(pre, out, multi_hot="mlperf", num_embeddings_per_feature=SIZES)
    # an interrupted run (day_1 not listed) is resumed, and gives the same bytes
    record = json.loads((out / MULTIHOT_META).read_text())
    record.update(parts=["day_0"], complete=False)
    (out / MULTIHOT_META).write_text(json.dumps(record))
    (out / "day_1_sparse_multi_hot.npz").unlink()
    with pytest.raises(DataError, match="did not finish"):
        open_multihot(out)
    materialize(pre, out, multi_hot=HOT, num_embeddings_per_feature=SIZES)
    assert open_multihot(out).split("val").num_rows == 5


def test_reader_checks_files(tmp_path: Path) -> None:
    n = 6
    rng = np.random.default_rng(0)
    for d in range(2):
        np.save(tmp_path / f"day_{d}_dense.npy", rng.random((n, 13), dtype=np.float32))
        np.save(tmp_path / f"day_{d}_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
        arrays = {
            str(j): rng.integers(0, SIZES[j], (n, HOT[j])).astype(np.int32) for j in range(26)
        }
        np.savez(tmp_path / f"day_{d}_sparse_multi_hot.npz", **arrays)  # type: ignore[arg-type]
    ds = open_multihot(tmp_path, num_embeddings_per_feature=SIZES)
    assert ds.multi_hot == tuple(HOT)
    assert sum(b.batch_size for b in ds.split("train").batches(4)) == n
    with pytest.raises(DataError, match="table 1 has 1 ids per sample, expected 2"):
        open_multihot(tmp_path, multi_hot=[3, 2, *HOT[2:]])
    bad = dict(np.load(tmp_path / "day_1_sparse_multi_hot.npz"))
    bad["0"][0, 0] = 7
    np.savez(tmp_path / "day_1_sparse_multi_hot.npz", **bad)  # type: ignore[arg-type]
    val = open_multihot(tmp_path, num_embeddings_per_feature=SIZES).split("val")
    with pytest.raises(DataError, match=r"table 0 holds id 7 in rows 0\.\.2"):
        next(val.batches(4))
    bad["0"] = bad["0"][:, :2]
    np.savez_compressed(tmp_path / "day_1_sparse_multi_hot.npz", **bad)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="compressed"):
        open_multihot(tmp_path)
    (tmp_path / "day_1_sparse_multi_hot.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"day_1_sparse_multi_hot\.npz: not a readable \.npz"):
        open_multihot(tmp_path)
    np.save(tmp_path / "day_0_dense.npy", np.zeros((n, 12), np.float32))
    with pytest.raises(DataError, match=r"day_0_dense\.npy: dense features must be float"):
        open_multihot(tmp_path)
    assert zipfile.is_zipfile(tmp_path / "day_0_sparse_multi_hot.npz")


def test_cli_multihot(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from shardrec_dlrm.cli import main

    pre = _raw_days(tmp_path, days=2)
    sizes = ",".join(map(str, SIZES))
    args = ["multihot", str(pre), str(tmp_path / "mh"), "--num-embeddings-per-feature", sizes]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 day(s) of multi-hot data (214 ids per sample)" in result.output
    assert open_multihot(tmp_path / "mh").multi_hot == MLPERF_MULTI_HOT
    bad = CliRunner().invoke(main, [*args, "--multi-hot", "1,2"])
    assert bad.exit_code == 2
    assert "26 values" in bad.output
    other = CliRunner().invoke(main, [*args, "--seed", "1"])
    assert other.exit_code == 1
    assert "--force" in other.output


def _reference_files(root: Path, days: int, rows: int) -> None:
    """Days as the MLPerf reference writes them (plain np.save / np.savez)."""
    rng = np.random.default_rng(5)
    for d in range(days):
        np.save(root / f"day_{d}_dense.npy", rng.random((rows, 13), dtype=np.float32))
        np.save(root / f"day_{d}_labels.npy", rng.integers(0, 2, (rows, 1)).astype(np.int32))
        arrays = {
            str(j): rng.integers(0, SIZES[j], (rows, HOT[j])).astype(np.int32) for j in range(26)
        }
        np.savez(root / f"day_{d}_sparse_multi_hot.npz", **arrays)  # type: ignore[arg-type]


def test_dlrm_train_reads_the_references_files_with_the_preset(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from shardrec_dlrm.cli import main

    data = tmp_path / "mh"
    data.mkdir()
    _reference_files(data, days=3, rows=40)
    small = ["--num-embeddings-per-feature", ",".join(map(str, SIZES)), "--embedding-dim", "4",
             "--dense-arch-layer-sizes", "8,4", "--over-arch-layer-sizes", "8,1",
             "--dcn-low-rank-dim", "2", "--batch-size", "8", "--device", "cpu",
             "--quiet"]  # fmt: skip
    args = ["train", "--data", str(data), "--preset", "mlperf-dcnv2", *small]
    result = CliRunner().invoke(main, [*args, "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "finished after 10 steps" in result.output  # days 0-1 train: 80 rows / 8
    assert "test:" in result.output
    # ids beyond the model's tables are refused with the file named, not looked up
    tiny = ["--num-embeddings-per-feature", ",".join(["2"] * 26)]
    refused = CliRunner().invoke(main, [*args, *tiny])
    assert refused.exit_code != 0
    assert "_sparse_multi_hot.npz: table" in refused.output


def test_synth_multi_hot_keeps_the_planted_optimum_and_trains(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from shardrec_dlrm.cli import main
    from shardrec_dlrm.data.synth import read_synth_info

    dst = tmp_path / "synth"
    hot = ",".join(map(str, HOT))
    args = ["synth", str(dst), "--rows", "1400", "--multi-hot", hot, "--num-embeddings", "50"]
    made = CliRunner().invoke(main, args)
    assert made.exit_code == 0, made.output
    ds = open_multihot(dst / "multihot", num_embeddings_per_feature=[50] * 26, multi_hot=HOT)
    info = read_synth_info(dst / "multihot")
    assert (ds.split("val").num_rows, ds.split("test").num_rows) == (info.val.rows, info.test.rows)
    # the labels are the one-hot rows' labels, in the same order
    one_hot = open_dataset(dst / "onehot_pre")
    val = ds.split("val").rows()
    assert val.labels.tolist() == one_hot.split("val").rows().labels.tolist()
    assert int(val.labels.sum()) == info.val.positives
    small = ["--embedding-dim", "4", "--dense-arch-layer-sizes", "8,4", "--num-embeddings", "50",
             "--over-arch-layer-sizes", "8,1", "--batch-size", "64", "--device", "cpu",
             "--quiet"]  # fmt: skip
    trained = CliRunner().invoke(main, ["train", "--data", str(dst / "multihot"), *small])
    assert trained.exit_code == 0, trained.output
    assert "planted optimum" in trained.output
    again = CliRunner().invoke(main, ["synth", str(dst), "--rows", "1400", "--multi-hot", "mlperf"])
    assert again.exit_code == 1
    assert "--force" in again.output


def test_reader_refuses_links_out_of_the_directory_and_fifos(tmp_path: Path) -> None:
    import os

    data = tmp_path / "mh"
    data.mkdir()
    _reference_files(data, days=2, rows=4)
    outside = tmp_path / "elsewhere.npy"
    os.replace(data / "day_0_dense.npy", outside)
    (data / "day_0_dense.npy").symlink_to(outside)
    with pytest.raises(DataError, match="outside the dataset directory"):
        open_multihot(data)
    (data / "day_0_dense.npy").unlink()
    os.replace(outside, data / "day_0_dense.npy")
    (data / "day_1_labels.npy").unlink()
    os.mkfifo(data / "day_1_labels.npy")
    with pytest.raises(DataError, match=r"day_1_labels\.npy: a FIFO, not a regular file"):
        open_multihot(data)


def test_materialize_memory_is_bounded_by_the_chunk(tmp_path: Path) -> None:
    import tracemalloc

    pre = _raw_days(tmp_path, days=2, rows=3000)
    day_bytes = 3000 * (13 * 4 + 4 + sum(HOT) * 4)
    tracemalloc.start()
    try:
        materialize(pre, tmp_path / "mh", multi_hot=HOT, num_embeddings_per_feature=SIZES,
                    chunk_rows=128)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < day_bytes / 4, (peak, day_bytes)
