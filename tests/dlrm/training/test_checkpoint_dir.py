"""A checkpoint directory holds one run: how ``dlrm train`` claims one, refuses another run's,
checks a resume against ``run_config.json``, and never writes through a symlink or reads a file
that is not a small regular one. No training here: the directory policy alone."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from shardrec_dlrm.data.files import read_small_text, write_atomic
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.model.config import ModelConfig
from shardrec_dlrm.training.checkpointing import prepare_checkpoint_dir, saved_model_config
from shardrec_dlrm.training.config import TrainConfig
from shardrec_dlrm.training.run_record import RESUME_FIXED, RUN_CONFIG, RunFacts

MODEL = ModelConfig(embedding_dim=4, num_embeddings=64, dense_arch_layer_sizes=(8, 4))


def config(root: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "data": "data/",
        "model": MODEL,
        "batch_size": 8,
        "checkpoint_dir": str(root),
        **changes,
    }
    return TrainConfig(**values)  # type: ignore[arg-type]


def facts(world_size: int = 1, data: str = "/data/criteo", sample: str = "abc") -> RunFacts:
    return RunFacts(
        world_size=world_size, data_path=data, train_segments=((0, 0, 120),), train_sample=sample
    )


def make_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step-{step:08d}"
    path.mkdir()
    (path / ".metadata").write_bytes(b"x")
    (path / "shardrec.json").write_text("{}")
    return path


def test_a_new_directory_is_claimed_with_the_run_record(tmp_path: Path) -> None:
    root = tmp_path / "new" / "ckpt"
    prepare_checkpoint_dir(config(root), facts(world_size=2))
    saved = json.loads((root / RUN_CONFIG).read_text())
    assert saved["batch_size"] == 8
    assert saved["model"]["embedding_dim"] == 4
    assert saved["run"]["global_batch_size"] == 16
    assert saved["run"]["world_size"] == 2
    assert saved["run"]["data_path"] == "/data/criteo"
    assert sorted(p.name for p in root.iterdir()) == [RUN_CONFIG]  # no temporary file left


@pytest.mark.parametrize("leftover", [RUN_CONFIG, "step-00000004", ".tmp-step-00000008"])
def test_another_runs_directory_is_refused_naming_the_ways_on(
    tmp_path: Path, leftover: str
) -> None:
    if leftover == RUN_CONFIG:
        prepare_checkpoint_dir(config(tmp_path), facts())
    else:
        (tmp_path / leftover).mkdir()  # a checkpoint or a save in progress, of a run without one
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError) as refused:
        prepare_checkpoint_dir(config(tmp_path, learning_rate=0.5), facts())
    message = str(refused.value)
    assert str(tmp_path) in message
    for way in ("--resume", "another --checkpoint-dir", "--overwrite"):
        assert way in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if leftover == RUN_CONFIG:
        assert "no checkpoint yet: stopped before its first save, or still running" in message


def test_a_directory_of_other_files_is_not_another_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    prepare_checkpoint_dir(config(tmp_path), facts())
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / RUN_CONFIG).is_file()


def test_overwrite_deletes_the_old_run_and_nothing_else(tmp_path: Path) -> None:
    prepare_checkpoint_dir(config(tmp_path, learning_rate=0.5), facts())
    for step in (2, 4):
        make_checkpoint(tmp_path, step)
    (tmp_path / ".tmp-step-00000006").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (tmp_path / "step-00000009").symlink_to(outside, target_is_directory=True)
    prepare_checkpoint_dir(config(tmp_path, overwrite=True), facts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", RUN_CONFIG]
    assert json.loads((tmp_path / RUN_CONFIG).read_text())["learning_rate"] == 1.0
    assert (outside / "keep.txt").read_text() == "keep"  # a symlink is removed, not followed


def test_resume_of_the_same_run_leaves_its_record_untouched(tmp_path: Path) -> None:
    prepare_checkpoint_dir(config(tmp_path, epochs=1), facts(world_size=2))
    record = (tmp_path / RUN_CONFIG).read_bytes()
    # More epochs, another process count with the same global batch (16), other logging.
    resumed = config(tmp_path, epochs=3, batch_size=16, resume=True, validation_freq=5, quiet=True)
    prepare_checkpoint_dir(resumed, facts(world_size=1))
    assert (tmp_path / RUN_CONFIG).read_bytes() == record


@pytest.mark.parametrize(
    ("changes", "world_size", "data", "named"),
    [
        ({"batch_size": 8}, 1, "/data/criteo", "--batch-size 16"),
        ({"batch_size": 4}, 2, "/data/criteo", "--batch-size x processes"),
        ({"seed": 3}, 2, "/data/criteo", "--seed was 0, now 3"),
        ({"learning_rate": 0.5}, 2, "/data/criteo", "--learning-rate was 1.0, now 0.5"),
        ({"limit_train_batches": 3}, 2, "/data/criteo", "--limit-train-batches"),
        ({"optimizer": "adam"}, 2, "/data/criteo", "--optimizer was sgd, now adam"),
        ({"val_fraction": 0.1}, 2, "/data/criteo", "--val-fraction"),
        (
            {"model": ModelConfig(embedding_dim=8, num_embeddings=64, dense_arch_layer_sizes=(8,))},
            2,
            "/data/criteo",
            "embedding_dim 4 -> 8",
        ),
    ],
)
def test_a_resume_that_would_change_the_training_is_refused_naming_the_field(
    tmp_path: Path, changes: dict[str, object], world_size: int, data: str, named: str
) -> None:
    prepare_checkpoint_dir(config(tmp_path), facts(world_size=2))
    record = (tmp_path / RUN_CONFIG).read_bytes()
    with pytest.raises(UserError) as refused:
        prepare_checkpoint_dir(
            config(tmp_path, resume=True, **changes), facts(world_size=world_size, data=data)
        )
    assert named in str(refused.value)
    assert "\n" not in str(refused.value)
    assert (tmp_path / RUN_CONFIG).read_bytes() == record


#: Another value for every option a resume must keep.
OTHER_VALUES: dict[str, object] = {
    "seed": 7,
    "limit_train_batches": 3,
    "val_fraction": 0.1,
    "test_fraction": 0.1,
    "optimizer": "adagrad",
    "learning_rate": 0.5,
    "eps": 1e-6,
    "lr_warmup_steps": 2,
    "lr_decay_start": 4,
    "lr_decay_steps": 4,
    "dense_precision": "bf16",
}


def test_every_option_a_resume_must_keep_is_named_when_changed(tmp_path: Path) -> None:
    assert set(OTHER_VALUES) == set(RESUME_FIXED)
    prepare_checkpoint_dir(config(tmp_path), facts())
    for name, value in OTHER_VALUES.items():
        with pytest.raises(UserError) as refused:
            prepare_checkpoint_dir(config(tmp_path, resume=True, **{name: value}), facts())
        option = "--" + name.replace("_", "-")
        assert f"{option} was {getattr(config(tmp_path), name)}, now {value}" in str(refused.value)


def test_other_training_rows_are_refused_wherever_they_are(tmp_path: Path) -> None:
    prepare_checkpoint_dir(config(tmp_path), facts())
    grown = RunFacts(
        world_size=1, data_path="/data/criteo", train_segments=((0, 0, 240),), train_sample="abc"
    )
    redrawn = facts(sample="def")
    for other in (grown, redrawn):
        with pytest.raises(UserError, match="--data: /data/criteo does not hold the training rows"):
            prepare_checkpoint_dir(config(tmp_path, resume=True), other)
    # The same rows elsewhere (moved, or preprocessed from the same file) continue the run.
    prepare_checkpoint_dir(config(tmp_path, resume=True), facts(data="/moved/criteo"))


def test_checkpoints_without_a_record_are_not_resumed_blindly(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 2)
    with pytest.raises(UserError, match=f"no {RUN_CONFIG}"):
        prepare_checkpoint_dir(config(tmp_path, resume=True), facts())


def test_a_partial_symlink_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / f"{RUN_CONFIG}.partial").symlink_to(victim)
    (root / f".{RUN_CONFIG}.tmp").symlink_to(victim)
    prepare_checkpoint_dir(config(root), facts())
    assert victim.read_text() == "precious"
    assert json.loads((root / RUN_CONFIG).read_text())["batch_size"] == 8


def test_a_record_that_is_a_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / RUN_CONFIG).symlink_to(victim)
    prepare_checkpoint_dir(config(root, overwrite=True), facts())
    assert victim.read_text() == "precious"
    assert not (root / RUN_CONFIG).is_symlink()


def test_two_runs_claiming_one_directory_at_once_one_wins(tmp_path: Path) -> None:
    target = tmp_path / RUN_CONFIG
    write_atomic(target, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(target, "second", exclusive=True)
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_CONFIG]


def test_a_fifo_record_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / RUN_CONFIG)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            saved_model_config(str(tmp_path))
        except BaseException as error:  # handed over to the test's thread
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO hung"
    assert isinstance(outcome[0], UserError)
    assert str(outcome[0]) == f"{tmp_path / RUN_CONFIG}: a FIFO, not a regular file"


def test_dev_zero_as_record_is_refused_without_reading_it(tmp_path: Path) -> None:
    (tmp_path / RUN_CONFIG).symlink_to("/dev/zero")
    with pytest.raises(UserError, match="not a regular file"):
        saved_model_config(str(tmp_path))
    with pytest.raises(UserError, match="not a regular file"):
        prepare_checkpoint_dir(config(tmp_path, resume=True), facts())


def test_a_huge_record_is_refused_by_size(tmp_path: Path) -> None:
    (tmp_path / RUN_CONFIG).write_bytes(b" " * (2 << 20))
    with pytest.raises(UserError, match="larger than"):
        saved_model_config(str(tmp_path))


def test_small_text_reads_back(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a.json", "{}\n", exclusive=False)
    write_atomic(tmp_path / "a.json", "[]\n", exclusive=False)
    assert read_small_text(tmp_path / "a.json") == "[]\n"
