"""``dlrm train`` and ``dlrm evaluate`` end to end on real Criteo rows, TensorBoard read back, one
process against two under torchrun, and a run killed with SIGKILL then resumed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from shardrec_dlrm.cli import main

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "tests" / "data" / "criteo_sample" / "criteo_sample.txt"
DLRM = Path(sys.executable).parent / "dlrm"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def words(text: str) -> list[str]:
    return text.split()


#: A model small enough for seconds of training on 200 rows.
TINY = words(
    "--embedding-dim 4 --num-embeddings 64 --dense-arch-layer-sizes 8,4 "
    "--over-arch-layer-sizes 8,1 --val-fraction 0.2 --test-fraction 0.2 --device cpu"
)
METRICS = ("auc", "log_loss", "normalized_entropy", "accuracy", "calibration")


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: Any = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def text_tags(logdir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: Any = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    return list(events.Tags()["tensors"])


def summary_metrics(output: str, split: str) -> dict[str, float]:
    line = next(line for line in output.splitlines() if line.startswith(f"{split}"))
    return {name: float(value) for name, value in re.findall(r"(\w+)=([-\d.e+na]+)", line)}


def test_train_then_evaluate_on_real_rows(tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt, logdir = tmp_path / "ckpt", tmp_path / "tb"
    options = words(
        "--batch-size 16 --epochs 2 --validation-freq 4 --learning-rate 0.1 --optimizer "
        "adagrad --quiet"
    )
    outputs = ["--checkpoint-dir", str(ckpt), "--logdir", str(logdir)]
    result = runner.invoke(main, ["train", "--data", str(SAMPLE), *TINY, *options, *outputs])
    assert result.exit_code == 0, result.output
    trained = summary_metrics(result.output, "test:")
    assert set(trained) == set(METRICS)
    assert 0.0 <= trained["auc"] <= 1.0
    # 120 training rows (60 %) in global batches of 16: 7 steps per epoch, 2 epochs.
    assert "finished after 14 steps" in result.output
    assert (ckpt / "step-00000014").is_dir()

    found = scalars(logdir)
    for tag in ("train/loss", "train/lr"):
        assert [step for step, _ in found[tag]] == list(range(1, 15)), tag
    # Losses are read (and the rate measured) every --log-every steps, at validations, at the end.
    assert [step for step, _ in found["train/samples_per_s"]] == [4, 8, 12, 14]
    for name in METRICS:
        assert [step for step, _ in found[f"val/{name}"]] == [4, 8, 12, 14]
        assert [step for step, _ in found[f"test/{name}"]] == [14]
    assert found["test/auc"][0][1] == pytest.approx(trained["auc"], abs=1e-5)
    texts = text_tags(logdir)
    assert any(tag.startswith("config") for tag in texts)
    assert any(tag.startswith("sharding_plan") for tag in texts)

    options = words("--batch-size 7 --val-fraction 0.2 --test-fraction 0.2 --device cpu")
    scored = runner.invoke(
        main, ["evaluate", "--checkpoint", str(ckpt), "--data", str(SAMPLE), *options]
    )
    assert scored.exit_code == 0, scored.output
    assert "after step 14" in scored.output
    evaluated = summary_metrics(scored.output, "test")
    for name in METRICS:
        assert evaluated[name] == pytest.approx(trained[name], abs=2e-5), name


def test_evaluate_of_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["evaluate", "--checkpoint", str(tmp_path), "--data", str(SAMPLE)]
    )
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "run_config.json" in result.output


def test_a_batch_larger_than_the_data_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["train", "--data", str(SAMPLE), *TINY, "--batch-size", "4096"]
    )
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "lower --batch-size" in result.output


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kwargs)


@pytest.mark.multiprocess
def test_two_processes_under_torchrun_or_nproc_match_one_process(tmp_path: Path) -> None:
    # Table-wise: the tables live on one rank each, so their gradients cross processes.
    options = words(
        "--epochs 2 --learning-rate 0.5 --quiet --eval-batch-size 5 --sharding table_wise"
    )
    common = ["--data", str(SAMPLE), *TINY, *options]
    one = _run([str(DLRM), "train", *common, "--batch-size", "16", "--logdir", str(tmp_path / "1")])
    assert one.returncode == 0, one.stderr
    launcher = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python", str(DLRM)]
    saved = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--logdir", str(tmp_path / "2")]
    two = _run([*launcher, "train", *common, "--batch-size", "8", *saved])
    assert two.returncode == 0, two.stderr
    # Trained sharded over 2 processes, scored by 1: the checkpoint reshards as it loads.
    scoring = words("--val-fraction 0.2 --test-fraction 0.2 --device cpu --batch-size 3")
    scored = CliRunner().invoke(
        main, ["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(SAMPLE), *scoring]
    )
    assert scored.exit_code == 0, scored.output
    evaluated = summary_metrics(scored.output, "test")
    trained = scalars(tmp_path / "2")
    for name in METRICS:
        assert evaluated[name] == pytest.approx(trained[f"test/{name}"][0][1], abs=2e-5), name
    # The same through `dlrm train --nproc 2` (torch's elastic launcher, started by the command).
    launched = CliRunner().invoke(
        main,
        ["train", *common, "--batch-size", "8", "--nproc", "2", "--logdir", str(tmp_path / "3")],
    )
    assert launched.exit_code == 0, launched.output
    single = scalars(tmp_path / "1")
    for run in ("2", "3"):
        double = scalars(tmp_path / run)
        # Same global batches, same data order: the same training, up to float summation order.
        for split in ("val", "test"):
            for name in METRICS:
                tag = f"{split}/{name}"
                assert double[tag][0][1] == pytest.approx(single[tag][0][1], rel=1e-4), tag
        assert len(double["train/loss"]) == len(single["train/loss"])


def _final_weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    """The saved model of ``ckpt`` loaded into an unsharded model."""
    from shardrec.distributed.checkpoint import load
    from shardrec_dlrm.model.build import build_dlrm
    from shardrec_dlrm.training.checkpointing import saved_model_config

    model = build_dlrm(saved_model_config(str(ckpt)))
    assert load(ckpt / f"step-{step:08d}", model) == step
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.multiprocess
def test_a_run_killed_mid_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    options = words(
        "--batch-size 4 --epochs 2 --optimizer adagrad --learning-rate 0.1 "
        "--checkpoint-every 2 --quiet --sharding table_wise"
    )
    common = [str(DLRM), "train", "--data", str(SAMPLE), *TINY, *options]
    steps = 2 * (120 // 4)
    whole_logs, killed_logs = tmp_path / "whole-tb", tmp_path / "killed-tb"
    whole = _run(
        [*common, "--checkpoint-dir", str(tmp_path / "whole"), "--logdir", str(whole_logs)]
    )
    assert whole.returncode == 0, whole.stderr

    killed_dir = tmp_path / "killed"
    logged = ["--logdir", str(killed_logs)]
    process = subprocess.Popen(
        [*common, "--checkpoint-dir", str(killed_dir), *logged],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while not (killed_dir / "step-00000006").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / f"step-{steps:08d}").exists()

    resumed = _run([*common, "--checkpoint-dir", str(killed_dir), "--resume", *logged])
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming from step \d+", resumed.stdout) is None  # --quiet
    for split in ("val:", "test:"):
        assert summary_metrics(resumed.stdout, split) == summary_metrics(whole.stdout, split)
    expected = _final_weights(tmp_path / "whole", steps)
    got = _final_weights(killed_dir, steps)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    # TensorBoard: every step once, in order, with the values of the run never interrupted.
    uninterrupted, interrupted = scalars(whole_logs), scalars(killed_logs)
    for tag in ("train/loss", "train/lr", "val/auc", "test/auc"):
        assert interrupted[tag] == uninterrupted[tag], tag
    assert [step for step, _ in interrupted["train/loss"]] == list(range(1, steps + 1))


def test_resume_refuses_checkpoints_of_another_model(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["train", "--data", str(SAMPLE), "--batch-size", "32", "--quiet", "--epochs", "1"]
    first = runner.invoke(main, [*base, *TINY, "--checkpoint-dir", str(tmp_path)])
    assert first.exit_code == 0, first.output
    other = [*TINY, "--embedding-dim", "8", "--dense-arch-layer-sizes", "8,8"]  # later wins
    second = runner.invoke(main, [*base, *other, "--checkpoint-dir", str(tmp_path), "--resume"])
    assert second.exit_code != 0
    assert "Traceback" not in second.output
    assert "embedding_dim 4 -> 8" in second.output
    shutil.rmtree(tmp_path)


def test_preprocessed_data_trains_exactly_as_the_raw_file(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["preprocess", str(SAMPLE), str(tmp_path / "pre"), "--quiet"])
    assert done.exit_code == 0, done.output
    options = [*TINY, "--batch-size", "16", "--quiet"]
    raw = runner.invoke(main, ["train", "--data", str(SAMPLE), *options])
    pre = runner.invoke(main, ["train", "--data", str(tmp_path / "pre"), *options])
    assert raw.exit_code == 0, raw.output
    assert pre.exit_code == 0, pre.output
    for split in ("val:", "test:"):
        assert summary_metrics(pre.output, split) == summary_metrics(raw.output, split)


SCHEDULE = words("--learning-rate 0.4 --lr-warmup-steps 2 --lr-decay-start 3 --lr-decay-steps 2")
#: LRSchedule(base_lr=0.4, warmup_steps=2, decay_start=3, decay_steps=2).lr(step) for 7 steps.
SCHEDULED_LRS = [0.2, 0.4, 0.4, 0.4, 0.1, 1e-7, 1e-7]


def _record_fused_lrs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, float]]:
    """After every training step, the learning rate each fused lookup of the model holds (the one
    that step's backward used), read back from the lookups themselves."""
    from shardrec.kernels import fused_learning_rates
    from shardrec_dlrm.training import loop as train_module

    seen: list[dict[str, float]] = []
    original = train_module._Trainer._train_step

    def recording(self: Any, batch: Any) -> float:
        loss: float = original(self, batch)
        seen.append(fused_learning_rates(self.run_state.model))
        return loss

    monkeypatch.setattr(train_module._Trainer, "_train_step", recording)
    return seen


@pytest.mark.parametrize("sharding", ["auto", "row_wise", "data_parallel"])
def test_learning_rate_schedule_drives_fused_tables_and_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharding: str
) -> None:
    fused = _record_fused_lrs(monkeypatch)
    options = [*TINY, *SCHEDULE, "--batch-size", "16", "--quiet", "--sharding", sharding]
    result = CliRunner().invoke(
        main, ["train", "--data", str(SAMPLE), *options, "--logdir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    lrs = [value for _, value in scalars(tmp_path)["train/lr"]]
    assert lrs == pytest.approx(SCHEDULED_LRS)
    assert len(fused) == len(SCHEDULED_LRS)
    # Data-parallel tables are fused too: their replicas apply the schedule like every sharding.
    for step, (expected, lookups) in enumerate(zip(SCHEDULED_LRS, fused, strict=True)):
        assert lookups, f"step {step}: the model has no fused lookup"
        for name, lr in lookups.items():
            assert lr == pytest.approx(expected), f"step {step}: {name} trained at lr {lr}"


def test_resume_continues_the_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    # 14 steps in all: warm-up 4, decay over steps 8..11, then the floor.
    schedule = words(
        "--learning-rate 0.4 --lr-warmup-steps 4 --lr-decay-start 8 --lr-decay-steps 4"
    )
    options = [*TINY, *schedule, "--batch-size", "16", "--quiet", "--sharding", "table_wise"]
    runner = CliRunner()
    first = runner.invoke(
        main, ["train", "--data", str(SAMPLE), *options, *ckpt, "--logdir", str(tmp_path / "a")]
    )
    assert first.exit_code == 0, first.output
    assert "finished after 7 steps" in first.output
    fused = _record_fused_lrs(monkeypatch)
    resumed = runner.invoke(
        main,
        [
            "train", "--data", str(SAMPLE), *options, *ckpt, "--epochs", "2", "--resume",
            "--logdir", str(tmp_path / "b"),
        ],
    )  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert "finished after 14 steps" in resumed.output
    from shardrec_dlrm.training.schedule import LRSchedule

    expected = LRSchedule(base_lr=0.4, warmup_steps=4, decay_start=8, decay_steps=4)
    logged = scalars(tmp_path / "b")["train/lr"]
    assert [step for step, _ in logged] == list(range(8, 15))
    assert [lr for _, lr in logged] == pytest.approx([expected.lr(s - 1) for s in range(8, 15)])
    assert len(fused) == 7
    for offset, lookups in enumerate(fused):
        assert lookups
        want = expected.lr(7 + offset)
        assert all(lr == pytest.approx(want) for lr in lookups.values()), (offset, lookups)


def test_bf16_dense_precision_trains_like_fp32(tmp_path: Path) -> None:
    options = [*TINY, *words("--batch-size 16 --epochs 2 --learning-rate 0.1 --quiet")]
    results = {
        precision: CliRunner().invoke(
            main, ["train", "--data", str(SAMPLE), *options, "--dense-precision", precision]
        )
        for precision in ("fp32", "bf16")
    }
    for precision, result in results.items():
        assert result.exit_code == 0, (precision, result.output)
    exact, mixed = (summary_metrics(results[p].output, "test:") for p in ("fp32", "bf16"))
    assert mixed != exact  # the option reached the model
    assert mixed["log_loss"] == pytest.approx(exact["log_loss"], abs=0.01)
    assert mixed["auc"] == pytest.approx(exact["auc"], abs=0.05)
