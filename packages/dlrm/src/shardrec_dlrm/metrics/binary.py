"""Binary-classification metrics for click prediction, exact and correct across ranks.

A :class:`BinaryMetrics` accumulates logits and labels batch by batch; :meth:`BinaryMetrics.compute`
all-gathers every rank's logits and labels when torch.distributed is initialised (exact AUC needs
every score), so each rank returns the metrics of the whole evaluation set. For sets too large to
gather (above :data:`EXACT_AUC_MAX_SAMPLES`), :class:`StreamingBinaryMetrics` keeps per-class
histograms of the probability instead and bounds its AUC's error (:func:`metrics_for` picks one).

- ``auc``: area under the ROC curve, exact: the Mann-Whitney statistic over all (positive, negative)
  pairs, a tie counting one half. Computed from the logits, which order samples exactly as the
  probabilities do without the float32 sigmoid merging nearby scores into ties.
- ``log_loss``: mean binary cross-entropy of the predicted probability, in nats.
- ``normalized_entropy``: log loss divided by the entropy of the empirical click rate (He et al.,
  2014): below 1 means better than always predicting the base rate.
- ``accuracy``: fraction of samples whose probability is on the label's side of 0.5.
- ``calibration``: sum of predicted probabilities over number of positives (1 is calibrated).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

METRIC_NAMES = ("auc", "log_loss", "normalized_entropy", "accuracy", "calibration")


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC of ``scores`` for binary ``labels`` (ties count one half); NaN with one class
    only."""
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(
            f"scores and labels must be 1-D of one shape, got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    positive = labels.to(torch.float64) > 0.5
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    _, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    groups = int(inverse.max()) + 1
    pos_per_value = torch.zeros(groups, dtype=torch.float64).index_add_(
        0, inverse, positive.to(torch.float64)
    )
    neg_per_value = torch.zeros(groups, dtype=torch.float64).index_add_(
        0, inverse, (~positive).to(torch.float64)
    )
    # Negatives strictly below each distinct score, and those tied with it (worth one half).
    neg_below = torch.cumsum(neg_per_value, 0) - neg_per_value
    wins = (pos_per_value * (neg_below + 0.5 * neg_per_value)).sum()
    return float(wins) / (num_pos * num_neg)


class BinaryMetrics:
    """Accumulates ``(logits, labels)`` of an evaluation pass and computes the metrics of all
    ranks."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.numel() != labels.numel():
            raise ValueError(f"{logits.numel()} logits for {labels.numel()} labels")
        self._logits.append(logits.detach().reshape(-1).to(self.device, torch.float32))
        self._labels.append(labels.detach().reshape(-1).to(self.device, torch.float32))

    def _local(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._logits:
            empty = torch.zeros(0, device=self.device)
            return empty, empty.clone()
        return torch.cat(self._logits), torch.cat(self._labels)

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Metrics over every sample seen by every rank of ``group`` (collective: all ranks must
        call)."""
        logits, labels = self._local()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            logits = _all_gather_varlen(logits, group)
            labels = _all_gather_varlen(labels, group)
        return metrics_from_logits(logits.cpu(), labels.cpu())


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for one set of logits and 0/1 labels (NaN where undefined)."""
    count = labels.numel()
    if count == 0:
        return dict.fromkeys(METRIC_NAMES, math.nan)
    logits = logits.to(torch.float64)
    labels = labels.to(torch.float64)
    log_loss = float(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="mean")
    )
    rate = float(labels.mean())
    base_entropy = (
        -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else math.nan
    )
    probs = torch.sigmoid(logits)
    positives = float(labels.sum())
    return {
        "auc": binary_auc(logits, labels),
        "log_loss": log_loss,
        "normalized_entropy": log_loss / base_entropy,
        "accuracy": float(((probs > 0.5) == (labels > 0.5)).to(torch.float64).mean()),
        "calibration": float(probs.sum()) / positives if positives > 0 else math.nan,
    }


def _all_gather_varlen(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenates every rank's 1-D ``tensor`` in rank order; the ranks may hold different
    lengths."""
    world = dist.get_world_size(group)
    size = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[:length] for part, length in zip(gathered, lengths, strict=True)])


#: Probability bins of :class:`StreamingBinaryMetrics`: 2 x 8 MiB of counts per rank.
DEFAULT_AUC_BINS = 1 << 20


def histogram_auc(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[float, float]:
    """ROC AUC from per-bin counts of positives and negatives (bins in increasing score order),
    scores in one bin counting as tied; and the bound on its distance to the exact AUC of the
    unbinned scores.

    Only a (positive, negative) pair inside one bin can be ordered differently by the exact scores;
    it counts one half here and 0, 1/2 or 1 there, so the error is at most
    ``0.5 * sum_b pos_b * neg_b / (P * N)``. When the scores are quantised to the bins (equal
    within a bin) the result is exact.
    """
    pos = positives.to(torch.float64)
    neg = negatives.to(torch.float64)
    num_pos, num_neg = float(pos.sum()), float(neg.sum())
    if num_pos == 0 or num_neg == 0:
        return math.nan, math.nan
    neg_below = torch.cumsum(neg, 0) - neg
    wins = float((pos * (neg_below + 0.5 * neg)).sum())
    same_bin = float((pos * neg).sum())
    return wins / (num_pos * num_neg), 0.5 * same_bin / (num_pos * num_neg)


class StreamingBinaryMetrics:
    """The metrics of :class:`BinaryMetrics` in memory that does not grow with the samples: for
    the MLPerf validation day (89 million samples) where gathering every score on one rank is not
    an option.

    Each rank keeps, per class, a histogram of the predicted probability over ``bins`` equal bins
    of [0, 1], and exact sums for the other metrics; :meth:`compute` adds them over the ranks (two
    all-reduces). ``auc`` is then exact for scores quantised to the bins, and within
    ``auc_error_bound`` (returned too; see :func:`histogram_auc`) of the exact AUC otherwise.
    """

    def __init__(self, bins: int = DEFAULT_AUC_BINS, device: torch.device | None = None) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.device = device or torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        # rows: positives per bin, negatives per bin; then samples, positives, correct
        self._counts = torch.zeros(2 * self.bins + 3, dtype=torch.int64, device=self.device)
        # summed log loss and summed probability
        self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.numel() != labels.numel():
            raise ValueError(f"{logits.numel()} logits for {labels.numel()} labels")
        x = logits.detach().reshape(-1).to(self.device, torch.float64)
        y = labels.detach().reshape(-1).to(self.device, torch.float64)
        positive = y > 0.5
        probs = torch.sigmoid(x)
        bin_of = (probs * self.bins).to(torch.int64).clamp_(0, self.bins - 1)
        counts = self._counts
        counts[: self.bins] += torch.bincount(bin_of[positive], minlength=self.bins)
        counts[self.bins : 2 * self.bins] += torch.bincount(bin_of[~positive], minlength=self.bins)
        counts[-3] += x.numel()
        counts[-2] += positive.sum()
        counts[-1] += ((probs > 0.5) == positive).sum()
        self._sums[0] += torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="sum")
        self._sums[1] += probs.sum()

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Metrics over every sample of every rank of ``group`` (collective: all ranks call),
        plus ``auc_error_bound``."""
        counts, sums = self._counts.clone(), self._sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
            dist.all_reduce(sums, group=group)
        counts, sums = counts.cpu(), sums.cpu()
        count, positives, correct = (int(v) for v in counts[-3:])
        if count == 0:
            return dict.fromkeys((*METRIC_NAMES, "auc_error_bound"), math.nan)
        auc, bound = histogram_auc(counts[: self.bins], counts[self.bins : 2 * self.bins])
        log_loss = float(sums[0]) / count
        rate = positives / count
        base_entropy = (
            -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else math.nan
        )
        return {
            "auc": auc,
            "log_loss": log_loss,
            "normalized_entropy": log_loss / base_entropy,
            "accuracy": correct / count,
            "calibration": float(sums[1]) / positives if positives > 0 else math.nan,
            "auc_error_bound": bound,
        }


#: Evaluations of more samples than this (all ranks together) keep per-class histograms
#: (:class:`StreamingBinaryMetrics`) instead of gathering every score: 2**24 samples are 128 MiB of
#: logits and labels on every rank, MLPerf's validation half-day (89 million) 680 MiB.
EXACT_AUC_MAX_SAMPLES = 1 << 24


def metrics_for(
    samples: int, device: torch.device | None = None
) -> BinaryMetrics | StreamingBinaryMetrics:
    """The accumulator for an evaluation of ``samples`` samples: exact up to
    :data:`EXACT_AUC_MAX_SAMPLES`, streaming (with ``auc_error_bound``) above."""
    if samples > EXACT_AUC_MAX_SAMPLES:
        return StreamingBinaryMetrics(device=device)
    return BinaryMetrics(device)
