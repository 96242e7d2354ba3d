"""``--log-every N``: the training loss stays on the device between reads, one copy every N steps
(and at validations, checkpoints and the end). How often it is read must not change what is
trained, nor which loss TensorBoard shows at each step; a non-finite loss still stops the run,
naming the first step that had one, before any checkpoint of it is written."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from shardrec_dlrm.cli import main

from .test_resume import digests
from .test_train import SAMPLE, TINY, scalars, words

#: 120 training rows in batches of 8: 15 steps, checkpoints at 5, 10 and 15.
OPTIONS = words("--batch-size 8 --learning-rate 0.1 --quiet --checkpoint-every 5")


def _tensor_files(root: Path) -> dict[str, str]:
    return {
        k: v for k, v in digests(root).items() if k.startswith("step-") and k.endswith(".distcp")
    }


def test_reading_the_loss_every_n_steps_trains_and_logs_the_same(tmp_path: Path) -> None:
    runs = {}
    for every in ("1", "4"):
        ckpt, logdir = tmp_path / f"ckpt-{every}", tmp_path / f"tb-{every}"
        result = CliRunner().invoke(
            main,
            ["train", "--data", str(SAMPLE), *TINY, *OPTIONS, "--log-every", every,
             "--checkpoint-dir", str(ckpt), "--logdir", str(logdir)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[every] = (_tensor_files(ckpt), result.output, scalars(logdir))
    (each_files, each_out, each_tb), (fourth_files, fourth_out, fourth_tb) = runs["1"], runs["4"]
    assert len(each_files) >= 3
    assert fourth_files == each_files  # the same checkpoints, byte for byte
    assert fourth_out == each_out  # the same final metrics
    for tag in ("train/loss", "train/lr"):
        assert fourth_tb[tag] == each_tb[tag], tag
        assert [step for step, _ in fourth_tb[tag]] == list(range(1, 16)), tag
    # The rate is measured once per read: every 4 steps, at the checkpoints and at the end.
    assert [step for step, _ in each_tb["train/samples_per_s"]] == list(range(1, 16))
    assert [step for step, _ in fourth_tb["train/samples_per_s"]] == [4, 5, 8, 10, 12, 15]


def test_a_non_finite_loss_stops_the_run_naming_its_step(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(SAMPLE), *TINY, *words("--batch-size 8 --quiet --log-every 50"),
         "--learning-rate", "1e30", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    found = re.search(
        r"the training loss became (nan|inf|-inf) at step (\d+): lower", result.output
    )
    assert found is not None, result.output
    # The losses of steps 1..10 are read before step 10's checkpoint: a run that diverged within
    # them saves none.
    assert int(found.group(2)) <= 10
    assert not list(ckpt.glob("step-*"))
