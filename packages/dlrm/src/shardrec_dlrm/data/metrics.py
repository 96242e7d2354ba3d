"""AUC and log loss in numpy, for the optimum ``dlrm synth`` records (ties get average ranks)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def roc_auc(scores: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]) -> float:
    """Area under the ROC curve (Mann-Whitney, tied scores count one half); NaN with one class."""
    positive = np.asarray(labels) > 0
    pos = int(positive.sum())
    neg = positive.shape[0] - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    mean_rank = upper - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = float(mean_rank[inverse.reshape(-1)][positive].sum())
    return float((rank_sum - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(probs: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped to [1e-12, 1 - 1e-12])."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels) > 0
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
