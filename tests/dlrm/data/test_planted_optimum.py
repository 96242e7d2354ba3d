"""The trainer's summary line reads ``synth.json`` as it reads any dataset file it did not make."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardrec_dlrm.data import synth
from shardrec_dlrm.training.loop import planted_optimum


def test_the_optimum_synth_recorded_is_read_back(tmp_path: Path) -> None:
    info = synth(tmp_path / "d", rows=2_000, seed=3)
    assert planted_optimum(str(tmp_path / "d")) == {"val": info.val.auc, "test": info.test.auc}


def test_data_without_a_record_has_no_optimum(tmp_path: Path) -> None:
    assert planted_optimum(str(tmp_path)) is None


@pytest.mark.timeout(30)
def test_a_fifo_record_is_passed_over_with_a_warning_not_waited_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkfifo(tmp_path / "synth.json")
    assert planted_optimum(str(tmp_path)) is None
    warning = capsys.readouterr().err
    assert "synth.json" in warning
    assert warning.count("\n") == 1
