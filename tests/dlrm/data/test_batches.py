"""Splits without leakage, and deterministic, per-rank disjoint batches of the right shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec_dlrm.data import SPARSE_KEYS, open_dataset, split_segments
from shardrec_dlrm.data.splits import Segment
from shardrec_dlrm.data.synth import synth


def _rows(segments: list[Segment], sizes: list[int]) -> set[int]:
    offsets = np.cumsum([0, *sizes])
    return {int(offsets[s.part]) + r for s in segments for r in range(s.start, s.stop)}


def test_kaggle_rule_seven_consecutive_parts() -> None:
    total = 45_840_617  # Kaggle train.txt: 6,548,659 rows per part, the first 4 parts one more
    train = split_segments("kaggle", [total], "train")
    val = split_segments("kaggle", [total], "val")
    test = split_segments("kaggle", [total], "test")
    assert train == [Segment(0, 0, 6 * 6_548_659 + 4)]
    last = total - (6 * 6_548_659 + 4)
    assert last == 6_548_659
    assert val == [Segment(0, train[0].stop, train[0].stop + 3_274_330)]  # ceil(last / 2)
    assert test == [Segment(0, val[0].stop, total)]


def test_terabyte_rule_last_day_halves() -> None:
    sizes = [5, 7, 9, 11]
    assert split_segments("terabyte", sizes, "train") == [
        Segment(0, 0, 5), Segment(1, 0, 7), Segment(2, 0, 9)
    ]  # fmt: skip
    assert split_segments("terabyte", sizes, "val") == [Segment(3, 0, 6)]
    assert split_segments("terabyte", sizes, "test") == [Segment(3, 6, 11)]


@pytest.mark.parametrize(
    ("layout", "sizes"),
    [("kaggle", [1000]), ("kaggle", [15]), ("terabyte", [4, 8, 15]), ("files", [30, 50, 21])],
)
def test_splits_partition_the_rows_without_overlap(layout: str, sizes: list[int]) -> None:
    parts = {
        name: _rows(
            split_segments(layout, sizes, name, val_fraction=0.1, test_fraction=0.2),  # type: ignore[arg-type]
            sizes,
        )
        for name in ("train", "val", "test")
    }
    assert parts["train"].isdisjoint(parts["val"])
    assert parts["train"].isdisjoint(parts["test"])
    assert parts["val"].isdisjoint(parts["test"])
    assert parts["train"] | parts["val"] | parts["test"] == set(range(sum(sizes)))
    assert max(parts["train"]) < min(parts["val"]) < min(parts["test"])  # consecutive, in order


def test_fraction_rule_counts() -> None:
    sizes = [60, 40]
    val = split_segments("files", sizes, "val", val_fraction=0.1, test_fraction=0.25)
    test = split_segments("files", sizes, "test", val_fraction=0.1, test_fraction=0.25)
    assert sum(s.rows for s in val) == 10
    assert sum(s.rows for s in test) == 25
    assert test == [Segment(1, 15, 40)]
    with pytest.raises(ValueError, match="leave rows to train on"):
        split_segments("files", sizes, "val", val_fraction=0.5, test_fraction=0.5)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth(root, rows=2000, seed=11)
    return root


def test_batch_shape_and_kjt(dataset_dir: Path) -> None:
    sizes = [10 + j for j in range(26)]
    ds = open_dataset(dataset_dir, num_embeddings_per_feature=sizes)
    batch = next(ds.split("train").batches(32))
    assert batch.batch_size == 32
    assert batch.dense_features.shape == (32, 13)
    assert batch.dense_features.dtype == torch.float32
    assert batch.labels.shape == (32,)
    assert batch.labels.dtype == torch.float32
    kjt = batch.sparse_features
    assert isinstance(kjt, KeyedJaggedTensor)
    assert kjt.keys() == list(SPARSE_KEYS)
    assert kjt.stride() == 32
    assert torch.equal(kjt.lengths(), torch.ones(26 * 32, dtype=torch.int32))
    per_key = kjt.to_dict()
    for j, key in enumerate(SPARSE_KEYS):
        values = per_key[key].values()
        assert values.shape == (32,)
        assert int(values.min()) >= 0
        assert int(values.max()) < sizes[j]
    moved = batch.to("cpu")
    assert torch.equal(moved.dense_features, batch.dense_features)


def test_a_batch_is_copied_on_a_side_stream_by_the_pipeline(dataset_dir: Path) -> None:
    # On CUDA the training pipeline copies a StreamRecordable batch on a side stream; the CUDA half
    # (pinned batch, record_stream) runs in tests/gpu.
    from shardrec.distributed.train_pipeline import StreamRecordable

    ds = open_dataset(dataset_dir, num_embeddings_per_feature=[10] * 26)
    batch = next(ds.split("train").batches(8))
    assert isinstance(batch, StreamRecordable)


def test_batch_values_equal_the_rows_hashed(dataset_dir: Path) -> None:
    ds = open_dataset(dataset_dir, num_embeddings=101)
    train = ds.split("train")
    lo, hi = train.batch_ranges(16, seed=3)[0]
    batch = next(train.batches(16, seed=3))
    rows = train.rows(lo, hi)
    expected = np.where(rows.sparse < 0, 0, rows.sparse % 100 + 1)
    assert torch.equal(batch.sparse_features.values(), torch.from_numpy(expected.T.reshape(-1)))
    assert torch.equal(batch.dense_features, torch.from_numpy(np.asarray(rows.dense)))
    assert torch.equal(batch.labels, torch.from_numpy(rows.labels.astype(np.float32)))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_read_disjoint_slices_covering_the_split(dataset_dir: Path, drop_last: bool) -> None:
    ds = open_dataset(dataset_dir)
    train = ds.split("train")
    world, b = 3, 40
    seen: list[int] = []
    counts = []
    for rank in range(world):
        ranges = train.batch_ranges(b, rank=rank, world_size=world, seed=7, drop_last=drop_last)
        counts.append(len(ranges))
        for lo, hi in ranges:
            seen.extend(range(lo, hi))
    assert len(set(counts)) == 1  # every rank the same number of batches
    assert counts[0] == train.num_batches(b, world, drop_last=drop_last)
    assert len(seen) == len(set(seen))  # disjoint
    full = train.num_rows // (b * world) * (b * world)
    assert set(seen) == set(range(full if drop_last else train.num_rows))


def test_order_is_deterministic_per_seed_and_epoch_and_resumable(dataset_dir: Path) -> None:
    train = open_dataset(dataset_dir).split("train")
    a = train.batch_ranges(32, seed=1, epoch=0)
    assert a == train.batch_ranges(32, seed=1, epoch=0)
    assert a != train.batch_ranges(32, seed=2, epoch=0)
    assert a != train.batch_ranges(32, seed=1, epoch=1)
    assert a != sorted(a)  # shuffled
    assert open_dataset(dataset_dir).split("val").batch_ranges(32) == sorted(
        open_dataset(dataset_dir).split("val").batch_ranges(32)
    )  # evaluation splits in order
    whole = list(train.batches(32, seed=1, epoch=0))
    resumed = list(train.batches(32, seed=1, epoch=0, start_batch=5))
    assert len(resumed) == len(whole) - 5
    for x, y in zip(whole[5:], resumed, strict=True):
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())


def test_eval_split_rows_are_never_training_rows(dataset_dir: Path) -> None:
    ds = open_dataset(dataset_dir)
    train_rows = {tuple(r) for r in ds.split("train").rows().sparse.tolist()}
    for name in ("val", "test"):
        rows = ds.split(name).rows()
        # the planted ids make duplicate rows practically impossible, so equality means leakage
        assert not train_rows & {tuple(r) for r in rows.sparse.tolist()}
    assert ds.split("val").num_rows + ds.split("test").num_rows + ds.split("train").num_rows == 2000


def test_bad_batching_arguments(dataset_dir: Path) -> None:
    train = open_dataset(dataset_dir).split("train")
    with pytest.raises(ValueError, match="batch_size"):
        train.num_batches(0)
    with pytest.raises(ValueError, match="rank 2"):
        next(train.batches(8, rank=2, world_size=2))
    with pytest.raises(ValueError, match="unknown split"):
        open_dataset(dataset_dir).split("dev")  # type: ignore[arg-type]
