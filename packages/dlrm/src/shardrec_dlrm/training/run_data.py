"""The data of one training run: the three splits of a Criteo dataset, batched for this rank.

A global batch is ``batch_size * world_size`` consecutive rows of which each rank reads its own
slice (the data engineer's :meth:`~shardrec_dlrm.data.Split.batches`), so a run sees the same
samples per step whatever its number of processes, and a resumed run the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from shardrec_dlrm.data import Batch, DataError, Dataset, open_dataset
from shardrec_dlrm.data.dataset import SplitReader
from shardrec_dlrm.data.multihot import MultiHotDataset, is_multihot, open_multihot
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.training.config import TrainConfig
from shardrec_dlrm.training.parallel import ParallelState

__all__ = ["Batch", "RunData", "open_run_data"]


@dataclass(frozen=True, slots=True)
class RunData:
    dataset: Dataset | MultiHotDataset
    train: SplitReader
    val: SplitReader
    test: SplitReader
    batch_size: int
    eval_batch_size: int
    rank: int
    world_size: int
    seed: int
    shuffle: bool = True

    def train_steps(self, limit: int | None) -> int:
        """Steps per epoch: full global batches only (a partial one would weigh ranks unequally)."""
        steps = self.train.num_batches(self.batch_size, self.world_size, drop_last=True)
        if steps == 0:
            raise UserError(
                f"{self.dataset.path}: the training split has {self.train.num_rows} rows, fewer "
                f"than one global batch ({self.batch_size} x {self.world_size} processes): "
                "lower --batch-size"
            )
        return min(steps, limit) if limit is not None else steps

    def train_batches(self, epoch: int, *, start: int, stop: int) -> Iterator[Batch]:
        batches = self.train.batches(
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            drop_last=True,
            start_batch=start,
        )
        for _, batch in zip(range(start, stop), batches, strict=False):
            yield batch

    def val_batches(self) -> Iterator[Batch]:
        return self._eval_batches(self.val)

    def test_batches(self) -> Iterator[Batch]:
        return self._eval_batches(self.test)

    def _eval_batches(self, split: SplitReader) -> Iterator[Batch]:
        return split.batches(
            self.eval_batch_size, rank=self.rank, world_size=self.world_size, shuffle=False
        )


def open_run_data(config: TrainConfig, state: ParallelState) -> RunData:
    """Opens ``config.data`` with the model's table sizes; data errors become :class:`UserError`."""
    try:
        dataset: Dataset | MultiHotDataset
        splits: dict[str, SplitReader]
        if config.data_format == "auto" and is_multihot(config.data):
            # multi-hot days (`dlrm multihot` or MLPerf's files): the ids are table rows already
            dataset = open_multihot(
                config.data, num_embeddings_per_feature=config.model.table_sizes()
            )
            splits = {name: dataset.split(name) for name in ("train", "val", "test")}
        else:
            # Managed tables take the raw ids (1 + id, 0 for missing): nothing is hashed.
            managed = config.model.managed_ids != "off"
            dataset = open_dataset(
                config.data,
                format=config.data_format,
                num_embeddings_per_feature=None if managed else config.model.table_sizes(),
                val_fraction=config.val_fraction,
                test_fraction=config.test_fraction,
            )
            splits = {name: dataset.split(name) for name in ("train", "val", "test")}
    except (DataError, ValueError) as error:
        raise UserError(str(error)) from error
    for name in ("val", "test"):
        if splits[name].num_rows == 0:
            raise UserError(f"{config.data}: the {name} split is empty (too few rows)")
    return RunData(
        dataset=dataset,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size or config.batch_size,
        rank=state.rank,
        world_size=state.world_size,
        seed=config.seed,
        shuffle=config.shuffle,
    )
