"""What ``dlrm train`` promises about a checkpoint directory, end to end: another run's directory is
refused (or replaced with ``--overwrite``, never mixed), a resume on another process count trains
the very sample the old run would have trained next, and TensorBoard keeps one point per step."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from shardrec_dlrm.cli import main
from shardrec_dlrm.model.config import ModelConfig
from shardrec_dlrm.training.config import TrainConfig
from shardrec_dlrm.training.parallel import ParallelState
from shardrec_dlrm.training.run_data import Batch, RunData, open_run_data

from .test_train import DLRM, SAMPLE, TINY, _run, scalars, summary_metrics, words

#: TINY's model.
MODEL = ModelConfig(
    embedding_dim=4, num_embeddings=64, dense_arch_layer_sizes=(8, 4), over_arch_layer_sizes=(8, 1)
)


def digests(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def train(*args: str) -> Any:
    return CliRunner().invoke(main, ["train", "--data", str(SAMPLE), *TINY, "--quiet", *args])


def test_another_runs_directory_is_refused_then_replaced_only_with_overwrite(
    tmp_path: Path,
) -> None:
    ckpt = str(tmp_path / "ckpt")
    first = train("--batch-size", "32", "--checkpoint-dir", ckpt)
    assert first.exit_code == 0, first.output
    before = digests(tmp_path / "ckpt")

    second = train("--batch-size", "16", "--learning-rate", "0.5", "--checkpoint-dir", ckpt)
    assert second.exit_code == 1
    assert "Traceback" not in second.output
    [line] = second.output.strip().splitlines()
    for fragment in (ckpt, "--resume", "another --checkpoint-dir", "--overwrite"):
        assert fragment in line
    assert digests(tmp_path / "ckpt") == before  # not a byte changed

    third = train("--batch-size", "16", "--checkpoint-dir", ckpt, "--overwrite")
    assert third.exit_code == 0, third.output
    # Only the new run's checkpoint (7 steps of 16) and its record remain: never a mix.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "run_config.json",
        "step-00000007",
    ]
    assert '"batch_size": 16' in (tmp_path / "ckpt" / "run_config.json").read_text()


def _record_training_batches(monkeypatch: pytest.MonkeyPatch) -> list[Batch]:
    """Every batch the trainer of this process takes from its data, in order."""
    seen: list[Batch] = []
    original = RunData.train_batches

    def recording(self: RunData, epoch: int, *, start: int, stop: int) -> Iterator[Batch]:
        for batch in original(self, epoch, start=start, stop=stop):
            seen.append(batch)
            yield batch

    monkeypatch.setattr(RunData, "train_batches", recording)
    return seen


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def rows(batch: Batch) -> Rows:
    """A batch's samples: dense features ``[B, 13]``, sparse ids ``[B, 26]``, labels ``[B]``."""
    ids = batch.sparse_features.values().view(26, batch.batch_size).T
    return batch.dense_features, ids, batch.labels


def _global_batches(world_size: int, batch_size: int, epoch: int, start: int) -> list[Rows]:
    """The global batches a run of ``world_size`` processes trains from step ``start`` of
    ``epoch`` on, each rank's slice read as that rank reads it."""
    config = TrainConfig(
        data=str(SAMPLE), model=MODEL, batch_size=batch_size, val_fraction=0.2, test_fraction=0.2
    )
    per_rank = []
    for rank in range(world_size):
        state = ParallelState.local(rank, world_size)
        data = open_run_data(config, state)
        stop = data.train_steps(None)
        per_rank.append(list(data.train_batches(epoch, start=start, stop=stop)))
    return [
        (
            torch.cat([rows(b)[0] for b in slices]),
            torch.cat([rows(b)[1] for b in slices]),
            torch.cat([rows(b)[2] for b in slices]),
        )
        for slices in zip(*per_rank, strict=True)
    ]


@pytest.mark.multiprocess
def test_a_resume_on_another_process_count_trains_the_next_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt"
    # Two processes of 4 samples: global batches of 8, 15 steps per epoch, a checkpoint every 5.
    options = words("--sharding table_wise --learning-rate 0.1 --checkpoint-every 5 --quiet")
    two = _run(
        [str(DLRM), "train", "--data", str(SAMPLE), *TINY, *options, "--nproc", "2",
         "--batch-size", "4", "--checkpoint-dir", str(ckpt)]
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    record = (ckpt / "run_config.json").read_bytes()
    # Rank 0 looks at the directory and every rank refuses with its words: no rank is left waiting.
    again = _run(
        [str(DLRM), "train", "--data", str(SAMPLE), *TINY, *options, "--nproc", "2",
         "--batch-size", "4", "--checkpoint-dir", str(ckpt)]
    )  # fmt: skip
    assert again.returncode == 1
    assert "Traceback" not in again.stderr
    [line] = [line for line in again.stderr.splitlines() if line.startswith("Error")]
    assert f"{ckpt} holds another run" in line
    # As if the run had stopped after step 5: its later checkpoints never happened.
    for step in (10, 15):
        shutil.rmtree(ckpt / f"step-{step:08d}")

    # One process must then take global batches of 8 itself; 4 would be another sample order.
    refused = train("--batch-size", "4", *options, "--checkpoint-dir", str(ckpt), "--resume")
    assert refused.exit_code == 1
    assert "on 1 process(es) use --batch-size 8" in refused.output
    assert (ckpt / "run_config.json").read_bytes() == record

    # What the two processes would have trained next: epoch 0 from step 6, then epoch 1.
    expected = _global_batches(2, 4, epoch=0, start=5) + _global_batches(2, 4, epoch=1, start=0)
    seen = _record_training_batches(monkeypatch)
    resumed = train(
        "--batch-size", "8", *options, "--checkpoint-dir", str(ckpt), "--resume", "--epochs", "2"
    )
    assert resumed.exit_code == 0, resumed.output
    assert "finished after 30 steps" in resumed.output
    assert (ckpt / "run_config.json").read_bytes() == record  # never rewritten by a resume

    assert len(seen) == len(expected) == 25
    for step, (got, want) in enumerate(zip(seen, expected, strict=True), start=6):
        for mine, theirs in zip(rows(got), want, strict=True):
            assert torch.equal(mine, theirs), f"step {step}"
    assert summary_metrics(resumed.output, "test:")["auc"] > 0.0


def test_tensorboard_after_a_resume_keeps_one_point_per_step_in_order(tmp_path: Path) -> None:
    ckpt, logdir = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    # An unrelated earlier run logged into the same directory: 3 epochs, validated every step.
    earlier = train(
        "--batch-size", "32", "--epochs", "3", "--validation-freq", "1", "--logdir", logdir
    )
    assert earlier.exit_code == 0, earlier.output
    options = ["--batch-size", "16", "--checkpoint-every", "2", "--validation-freq", "2"]
    first = train(*options, "--checkpoint-dir", ckpt, "--logdir", logdir)
    assert first.exit_code == 0, first.output
    # As if the run had died after logging step 7 but before its checkpoints of steps 6 and 7.
    for step in (6, 7):
        shutil.rmtree(Path(ckpt) / f"step-{step:08d}")
    resumed = train(*options, "--checkpoint-dir", ckpt, "--logdir", logdir, "--resume")
    assert resumed.exit_code == 0, resumed.output

    found = scalars(Path(logdir))
    for tag in ("train/loss", "train/lr"):
        assert [step for step, _ in found[tag]] == list(range(1, 8)), tag
    assert [step for step, _ in found["train/samples_per_s"]] == [2, 4, 6, 7]
    assert [step for step, _ in found["val/auc"]] == [2, 4, 6, 7]
    assert [step for step, _ in found["test/auc"]] == [7]
    assert len(list(Path(logdir).iterdir())) == 3  # three runs' event files, read as one


def step_dirs(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.startswith("step-"))


def damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_latest_checkpoint_is_refused_by_evaluate_and_passed_over_by_resume(
    tmp_path: Path, how: str
) -> None:
    ckpt = tmp_path / "ckpt"
    options = ["--batch-size", "16", "--checkpoint-every", "2", "--checkpoint-dir", str(ckpt)]
    first = train(*options)
    assert first.exit_code == 0, first.output
    # Saved at steps 2, 4, 6 and 7; the default --keep-checkpoints 3 deleted step 2.
    assert step_dirs(ckpt) == ["step-00000004", "step-00000006", "step-00000007"]
    victim = max((ckpt / "step-00000007").glob("*.distcp"), key=lambda p: p.stat().st_size)
    damage(victim, how)

    scoring = words("--val-fraction 0.2 --test-fraction 0.2 --device cpu")
    scored = CliRunner().invoke(
        main, ["evaluate", "--checkpoint", str(ckpt), "--data", str(SAMPLE), *scoring]
    )
    assert scored.exit_code == 1
    assert "Traceback" not in scored.output
    [line] = scored.output.strip().splitlines()
    assert str(victim) in line

    resumed = train(*options, "--resume", "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    [warning] = [line for line in resumed.output.splitlines() if line.startswith("warning:")]
    assert str(victim) in warning
    assert "resuming from the older step-00000006" in warning
    assert "finished after 14 steps" in resumed.output
    # Pruned as it went on: the damaged checkpoint is gone, the three newest remain.
    assert step_dirs(ckpt) == ["step-00000010", "step-00000012", "step-00000014"]


def test_keep_checkpoints_bounds_what_a_run_leaves(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    options = ["--batch-size", "16", "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    result = train(*options, "--checkpoint-dir", str(ckpt))
    assert result.exit_code == 0, result.output
    assert step_dirs(ckpt) == ["step-00000006", "step-00000007"]
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # nothing half-deleted
    # With every checkpoint damaged there is nothing to resume from: refused, not restarted.
    for step in (6, 7):
        damage(next((ckpt / f"step-{step:08d}").glob("*.distcp")), "flip")
    refused = train(*options, "--checkpoint-dir", str(ckpt), "--resume", "--epochs", "2")
    assert refused.exit_code == 1
    errors = [line for line in refused.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1
    assert "no intact checkpoint to resume from" in errors[0]
    assert "--overwrite" in errors[0]


def test_a_resume_follows_the_rows_not_the_path(tmp_path: Path) -> None:
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    first = train("--batch-size", "16", *ckpt)
    assert first.exit_code == 0, first.output
    # The same rows, preprocessed elsewhere: the run goes on.
    done = CliRunner().invoke(main, ["preprocess", str(SAMPLE), str(tmp_path / "pre"), "--quiet"])
    assert done.exit_code == 0, done.output
    moved = CliRunner().invoke(
        main,
        ["train", "--data", str(tmp_path / "pre"), *TINY, "--quiet", "--batch-size", "16", *ckpt,
         "--resume", "--epochs", "2"],
    )  # fmt: skip
    assert moved.exit_code == 0, moved.output
    assert "finished after 14 steps" in moved.output
    # As many rows, two of them swapped: other data, refused.
    lines = SAMPLE.read_text().splitlines(keepends=True)
    lines[10], lines[11] = lines[11], lines[10]
    (tmp_path / "other.txt").write_text("".join(lines))
    other = CliRunner().invoke(
        main,
        ["train", "--data", str(tmp_path / "other.txt"), *TINY, "--quiet", "--batch-size", "16",
         *ckpt, "--resume", "--epochs", "3"],
    )  # fmt: skip
    assert other.exit_code == 1
    assert "--data: " in other.output
    assert "does not hold the training rows the run trained on" in other.output


def test_a_run_that_cannot_start_leaves_its_checkpoint_directory_unclaimed(tmp_path: Path) -> None:
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    too_large = train("--batch-size", "4096", *ckpt)
    assert too_large.exit_code == 1
    assert "lower --batch-size" in too_large.output
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
    fixed = train("--batch-size", "32", *ckpt)  # the same directory, no --overwrite needed
    assert fixed.exit_code == 0, fixed.output
