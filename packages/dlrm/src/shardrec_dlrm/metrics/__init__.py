"""What a run measures and where it goes: click-prediction metrics over all ranks, TensorBoard
logging, the progress bar."""

from shardrec_dlrm.metrics.binary import (
    DEFAULT_AUC_BINS,
    EXACT_AUC_MAX_SAMPLES,
    METRIC_NAMES,
    BinaryMetrics,
    StreamingBinaryMetrics,
    binary_auc,
    histogram_auc,
    metrics_for,
    metrics_from_logits,
)

__all__ = [
    "DEFAULT_AUC_BINS",
    "EXACT_AUC_MAX_SAMPLES",
    "METRIC_NAMES",
    "BinaryMetrics",
    "StreamingBinaryMetrics",
    "binary_auc",
    "histogram_auc",
    "metrics_for",
    "metrics_from_logits",
]
