"""``dlrm train`` pipelines by default (``--pipeline``): the next batch's ids travel while this
batch trains. It must train exactly what ``--no-pipeline`` trains: the same checkpoint tensors, byte
for byte, on two processes; and a pipelined resume continues a run exactly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from shardrec_dlrm.cli import main

from .test_resume import digests
from .test_train import DLRM, SAMPLE, TINY, _run, words

OPTIONS = words("--learning-rate 0.1 --quiet --batch-size 4 --checkpoint-every 5")


def _steps(root: Path) -> dict[str, str]:
    # The tensors' files of every checkpoint (run_config.json records the options, --pipeline
    # among them; a checkpoint's metadata names when and where it was written).
    return {
        k: v for k, v in digests(root).items() if k.startswith("step-") and k.endswith(".distcp")
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_pipelined_and_plain_runs_write_the_same_checkpoints(tmp_path: Path, sharding: str) -> None:
    runs = {}
    for flag in ("--pipeline", "--no-pipeline"):
        ckpt = tmp_path / flag.strip("-")
        done = _run(
            [str(DLRM), "train", "--data", str(SAMPLE), *TINY, *OPTIONS, "--sharding", sharding,
             "--nproc", "2", "--checkpoint-dir", str(ckpt), flag]
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "is not pipelined" not in done.stderr
        runs[flag] = (_steps(ckpt), done.stdout)
    piped, plain = runs["--pipeline"], runs["--no-pipeline"]
    assert len(piped[0]) > 3
    assert piped[0] == plain[0]
    assert piped[1] == plain[1]  # the same final metrics


@pytest.mark.multiprocess
def test_a_pipelined_resume_continues_a_plain_run_exactly(tmp_path: Path) -> None:
    plain, resumed = tmp_path / "plain", tmp_path / "resumed"
    base = [str(DLRM), "train", "--data", str(SAMPLE), *TINY, *OPTIONS, "--sharding", "row_wise"]
    done = _run([*base, "--nproc", "2", "--checkpoint-dir", str(plain), "--no-pipeline"])
    assert done.returncode == 0, done.stderr
    shutil.copytree(plain, resumed)
    # As if the run had been killed after step 5.
    later = sorted(p for p in resumed.glob("step-*") if p.name != "step-00000005")
    for path in later:
        shutil.rmtree(path)
    again = _run([*base, "--nproc", "2", "--checkpoint-dir", str(resumed), "--resume"])
    assert again.returncode == 0, again.stderr
    assert _steps(resumed) == _steps(plain)


def test_dlrm_pipelines_every_sharded_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardrec.distributed.train_pipeline import TrainPipelineSparseDist

    seen: list[list[str]] = []
    original = TrainPipelineSparseDist.progress

    def recording(self: Any, it: Any) -> Any:
        out = original(self, it)
        seen.append(self.pipelined_modules)
        return out

    monkeypatch.setattr(TrainPipelineSparseDist, "progress", recording)
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(SAMPLE), *TINY, *OPTIONS[:-2], "--limit-train-batches", "4"],
    )
    assert result.exit_code == 0, result.output
    assert len(seen) == 4
    assert all(modules and modules == seen[0] for modules in seen), seen
