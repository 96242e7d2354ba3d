"""Metrics against plain reference implementations, in one process and across two gloo ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from shardrec_dlrm.metrics import BinaryMetrics, binary_auc, metrics_from_logits


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """O(P*N): each (positive, negative) pair scores 1 if ordered right, 1/2 if tied."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def reference_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    log_loss = float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))
    rate = labels.mean()
    entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return {
        "auc": pairwise_auc(logits, labels),
        "log_loss": log_loss,
        "normalized_entropy": log_loss / float(entropy),
        "accuracy": float(np.mean((probs > 0.5) == (labels == 1))),
        "calibration": float(probs.sum() / labels.sum()),
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("distinct_scores", [3, 50, 10_000])
def test_auc_matches_pairwise_count_with_ties(seed: int, distinct_scores: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    scores = rng.integers(0, distinct_scores, n).astype(np.float32)
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    got = binary_auc(torch.from_numpy(scores), torch.from_numpy(labels).float())
    assert got == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


def test_auc_of_perfect_reversed_and_constant_scores() -> None:
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert binary_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert binary_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert binary_auc(torch.zeros(4), labels) == 0.5
    assert math.isnan(binary_auc(torch.zeros(3), torch.ones(3)))


def test_auc_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="1-D of one shape"):
        binary_auc(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("seed", range(3))
def test_all_metrics_match_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, 500)
    labels = (rng.random(500) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    metrics = BinaryMetrics()
    for start in range(0, 500, 64):  # batch by batch, as an evaluation loop feeds it
        metrics.update(
            torch.from_numpy(logits[start : start + 64]).float(),
            torch.from_numpy(labels[start : start + 64]),
        )
    got = metrics.compute()
    want = reference_metrics(logits.astype(np.float32), labels)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


def test_metrics_of_empty_set_are_nan() -> None:
    assert all(math.isnan(v) for v in metrics_from_logits(torch.zeros(0), torch.zeros(0)).values())


_TWO_RANKS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
    from shardrec_dlrm.metrics import BinaryMetrics

    def work(rank, store_path, out_path):
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
        rng = np.random.default_rng(7)
        logits = rng.normal(0, 1, 301).astype(np.float32)
        labels = (rng.random(301) < 0.3).astype(np.float32)
        cut = 120  # uneven shares: 120 and 181 samples
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        metrics = BinaryMetrics()
        metrics.update(torch.from_numpy(logits[part]), torch.from_numpy(labels[part]))
        got = metrics.compute()
        whole = BinaryMetrics()
        whole.update(torch.from_numpy(logits), torch.from_numpy(labels))
        if rank == 0:
            dist.destroy_process_group()
            with open(out_path, "w") as f:
                json.dump({"ranks": got, "whole": whole.compute()}, f)
        else:
            dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(sys.argv[1], sys.argv[2]), nprocs=2)
    """
)


@pytest.mark.multiprocess
def test_metrics_across_two_ranks_equal_metrics_of_all_samples(tmp_path: Path) -> None:
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), str(out)], check=True, timeout=120
    )
    result = json.loads(out.read_text())
    for name, value in result["whole"].items():
        assert result["ranks"][name] == pytest.approx(value, rel=1e-9), name
