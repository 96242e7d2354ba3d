"""``dlrm synth --drift``: a planted stream whose ids drift, with its optimum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shardrec_dlrm.cli import main
from shardrec_dlrm.data import open_dataset
from shardrec_dlrm.data.synth import KAGGLE_CARDINALITIES, read_synth_info
from shardrec_dlrm.data.synth_drift import draw_drift_model, synth_drift

ROWS = 7_000
LIVE = 64


def _sparse(root: Path) -> np.ndarray:
    split = open_dataset(root, num_embeddings_per_feature=None)
    parts = [split.split(name).rows().sparse for name in ("train", "val", "test")]
    return np.concatenate(parts)


def test_ids_drift_and_the_optimum_is_recorded(tmp_path: Path) -> None:
    info = synth_drift(tmp_path / "d", rows=ROWS, seed=3, live=LIVE, turnover=3.0)
    sparse = _sparse(tmp_path / "d")
    assert sparse.shape == (ROWS, 26)
    model = draw_drift_model(3, LIVE, 3.0)
    drifting = [j for j in range(26) if model.turnover[j] > 0]
    # every column with more than LIVE values in Kaggle's data drifts
    assert drifting == [j for j, c in enumerate(KAGGLE_CARDINALITIES) if c > LIVE]
    seventh = ROWS // 7
    for j in drifting:
        column = sparse[:, j][sparse[:, j] >= 0]
        assert len(np.unique(column)) <= info.cardinalities[j] == LIVE * 4 - 1
        early = set(sparse[:seventh, j].tolist())
        late = set(sparse[-seventh:, j].tolist())
        assert len(early & late - {-1}) < len(late) // 4  # the late ids are new ones
    c9 = sparse[:, 8]
    assert len(np.unique(c9[c9 >= 0])) <= 3  # a low-cardinality column keeps its vocabulary
    stored = read_synth_info(tmp_path / "d")
    assert stored == info
    assert 0.6 < info.val.auc < 1.0
    assert 0.2 < info.ctr < 0.3


def test_the_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        synth_drift(tmp_path / name, rows=500, seed=1, live=16, turnover=2.0)
    a = (tmp_path / "a" / "train.txt").read_bytes()
    assert a == (tmp_path / "b" / "train.txt").read_bytes()
    synth_drift(tmp_path / "c", rows=500, seed=2, live=16, turnover=2.0)
    assert a != (tmp_path / "c" / "train.txt").read_bytes()


def test_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        main, ["synth", str(tmp_path / "d"), "--rows", "700", "--drift", "--live", "16"]
    )
    assert out.exit_code == 0, out.output
    assert "drifting rows" in out.output
    both = runner.invoke(
        main, ["synth", str(tmp_path / "e"), "--rows", "700", "--drift", "--multi-hot", "mlperf"]
    )
    assert both.exit_code == 2
    assert "--drift and --multi-hot cannot be combined" in both.output


@pytest.mark.parametrize(("live", "turnover"), [(1, 1.0), (4, -1.0)])
def test_bad_parameters_are_named(tmp_path: Path, live: int, turnover: float) -> None:
    with pytest.raises(ValueError, match=r"live|turnover"):
        synth_drift(tmp_path / "d", rows=100, live=live, turnover=turnover)
