"""``synth``: realistic raw rows from a planted model whose recorded optimum the test recomputes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from shardrec_dlrm.data import open_dataset
from shardrec_dlrm.data.synth import (
    INTERACTION,
    KAGGLE_CARDINALITIES,
    read_synth_info,
    scaled_cardinalities,
    synth,
)


def _auc_by_pairs(scores: list[float], labels: list[int]) -> float:
    """AUC straight from its definition: P(score of a positive > score of a negative), ties 1/2."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _true_probability(fields: list[str], model: dict[str, np.ndarray]) -> float:
    """The planted model evaluated on one raw line, by hand (no code shared with synth)."""
    logit = float(model["bias"])
    ranks = []
    for j in range(26):
        token = fields[14 + j]
        if token:
            where = np.flatnonzero(model[f"ids_{j}"] == int(token, 16))
            assert where.shape == (1,), f"C{j + 1} id {token} is not in the planted vocabulary"
            ranks.append(int(where[0]))
            logit += float(model[f"weights_{j}"][where[0]])
        else:
            ranks.append(-1)
            logit += float(model["missing_weights"][j])
    for i in range(13):
        token = fields[1 + i]
        logit += float(model["dense_weights"][i]) * (
            math.log1p(max(int(token), 0)) if token else 0.0
        )
    a, b = INTERACTION
    table = model["interaction"]
    logit += float(table[ranks[a] if ranks[a] >= 0 else -1, ranks[b] if ranks[b] >= 0 else -1])
    return 1.0 / (1.0 + math.exp(-logit))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth(root, rows=7000, seed=3)
    return root


def test_recorded_optimum_matches_the_true_probabilities(synth_dir: Path) -> None:
    info = read_synth_info(synth_dir)
    model = dict(np.load(synth_dir / "planted_model.npz", allow_pickle=False))
    lines = (synth_dir / "train.txt").read_text().splitlines()
    assert len(lines) == 7000
    # Kaggle rule on 7000 rows: 6000 train, rows 6000..6499 validation, 6500..6999 test
    for name, lo, hi in (("val", 6000, 6500), ("test", 6500, 7000)):
        fields = [line.split("\t") for line in lines[lo:hi]]
        labels = [int(f[0]) for f in fields]
        probs = [_true_probability(f, model) for f in fields]
        recorded = getattr(info, name)
        assert recorded.rows == hi - lo
        assert recorded.positives == sum(labels)
        assert recorded.auc == pytest.approx(_auc_by_pairs(probs, labels), abs=1e-9)
        bce = -sum(
            math.log(p) if y else math.log(1 - p) for p, y in zip(probs, labels, strict=True)
        ) / len(labels)
        assert recorded.log_loss == pytest.approx(bce, rel=1e-9)
    assert 0.6 < info.val.auc < 0.95  # an informative, Criteo-like model
    reader = open_dataset(synth_dir)
    assert reader.layout == "kaggle"
    assert reader.split("val").num_rows == info.val.rows


def test_rows_look_like_criteo(synth_dir: Path) -> None:
    info = json.loads((synth_dir / "synth.json").read_text())
    assert 0.2 < info["ctr"] < 0.3
    lines = (synth_dir / "train.txt").read_text().splitlines()
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 40 for f in fields)
    assert all(len(f[14 + j]) in (0, 8) for f in fields for j in range(26))
    missing_i1 = sum(not f[1] for f in fields) / len(fields)
    missing_c22 = sum(not f[14 + 21] for f in fields) / len(fields)
    assert 0.4 < missing_i1 < 0.5  # Criteo: about 45%
    assert 0.7 < missing_c22 < 0.8  # Criteo: about 76%
    assert any(f[2].startswith("-") for f in fields)  # I2 takes small negative values
    # power law: the most frequent C3 id is much more frequent than the median one
    _, counts = np.unique([f[16] for f in fields if f[16]], return_counts=True)
    assert counts.max() > 20 * np.median(counts)


def test_cardinalities_scale_with_rows() -> None:
    small, large = scaled_cardinalities(10_000), scaled_cardinalities(45_840_617)
    assert large == KAGGLE_CARDINALITIES
    assert small[2] == math.ceil(10_131_227 * 10_000 / 45_840_617)
    assert small[8] == 3  # tiny vocabularies are kept whole
    assert all(s >= 16 or s == k for s, k in zip(small, KAGGLE_CARDINALITIES, strict=True))


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    synth(tmp_path / "a", rows=300, seed=9)
    synth(tmp_path / "b", rows=300, seed=9)
    synth(tmp_path / "c", rows=300, seed=10)
    a = (tmp_path / "a" / "train.txt").read_bytes()
    assert a == (tmp_path / "b" / "train.txt").read_bytes()
    assert a != (tmp_path / "c" / "train.txt").read_bytes()
