"""``dlrm synth``: raw Criteo-format TSV drawn from a planted click model, with its optimum.

The model (all parameters drawn from ``seed``)::

    logit = bias + sum_j w_j[id_j] + sum_i v_i * log(1 + max(I_i, 0)) + t[id_a, id_b]
    w_j[k] ~ N(0, s_j^2) / sqrt(1 + k / 32)   (k: the id's frequency rank; s_j in 0.05 .. 0.5)
    label ~ Bernoulli(sigmoid(logit))

- ``id_j``: the value of C_j. Each feature has a vocabulary of ``cardinality_j`` random, distinct
  8-digit hex ids, drawn with power-law (Zipf) frequencies of exponent ``a_j`` in [1.05, 1.4].
  ``cardinality_j`` is Kaggle's cardinality of that column scaled to the number of rows (at least
  16, at most Kaggle's). A missing value (an empty field, at about Criteo's per-column rates) has
  its own weight.
- ``I_i``: counts from log-normal laws; I2 is sometimes -1..-3, as in Criteo; missing as in Criteo.
- ``t``: an interaction of two low-cardinality features (C6 and C9) that a linear model misses.
- ``bias`` is set so that about 25% of rows click.

Output: ``DST/train.txt`` (named so that the Kaggle split rule applies: validation is the first half
of the 7th seventh), ``DST/synth.json`` (the run's parameters and the Bayes-optimal AUC and log loss
on the validation and test splits, computed from the true probabilities and the drawn labels), and
``DST/planted_model.npz`` (the model, ids as integers, so that anyone can recompute the optimum).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from .errors import DataError
from .files import MAX_RECORD_BYTES, create_new, read_small, write_atomic
from .outdir import claim_output, refuse_non_empty
from .schema import NUM_DENSE, NUM_SPARSE
from .splits import Segment, SplitName, split_segments
from .textwrite import format_tsv

#: Distinct values per column of Kaggle train.txt (facebookresearch/dlrm; missing counts as one).
KAGGLE_CARDINALITIES: Final = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
KAGGLE_ROWS: Final = 45_840_617
#: Approximate missing rates of Criteo's columns (rounded: the planted data only has to look alike).
DENSE_MISSING: Final = (
    0.45, 0.0, 0.21, 0.22, 0.03, 0.23, 0.04, 0.0, 0.04, 0.45, 0.04, 0.76, 0.22,
)  # fmt: skip
SPARSE_MISSING: Final = (
    0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
    0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44,
)  # fmt: skip
#: Log-normal (mu, sigma) of the dense counts.
DENSE_LAWS: Final = (
    (0.8, 1.2), (3.0, 2.0), (2.5, 1.3), (1.8, 1.0), (7.5, 2.0), (4.0, 1.8), (2.0, 1.3),
    (2.6, 1.0), (3.8, 1.5), (0.4, 0.6), (1.0, 1.0), (0.3, 0.8), (2.0, 1.0),
)  # fmt: skip
INTERACTION: Final = (5, 8)  # C6 x C9
TARGET_CTR: Final = 0.25
CHUNK_ROWS: Final = 100_000
DATA_NAME: Final = "train.txt"
INFO_NAME: Final = "synth.json"
MODEL_NAME: Final = "planted_model.npz"


def scaled_cardinalities(rows: int) -> tuple[int, ...]:
    """Kaggle's cardinalities scaled to ``rows``: ``min(c, max(16, ceil(c * rows / 45840617)))``."""
    return tuple(min(c, max(16, math.ceil(c * rows / KAGGLE_ROWS))) for c in KAGGLE_CARDINALITIES)


@dataclass(frozen=True, slots=True)
class PlantedModel:
    """The click model; ``ids[j]``: the hex ids of feature j as integers, ``weights[j]`` theirs."""

    ids: tuple[npt.NDArray[np.int64], ...]
    weights: tuple[npt.NDArray[np.float64], ...]
    missing_weights: npt.NDArray[np.float64]
    zipf: npt.NDArray[np.float64]
    dense_weights: npt.NDArray[np.float64]
    interaction: npt.NDArray[np.float64]  # [card_a + 1, card_b + 1]; last row/column = missing
    bias: float

    def save(self, path: Path) -> None:
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "missing_weights": self.missing_weights,
            "zipf": self.zipf,
            "dense_weights": self.dense_weights,
            "interaction": self.interaction,
            "bias": np.array(self.bias),
        }
        for j in range(NUM_SPARSE):
            arrays[f"ids_{j}"] = self.ids[j]
            arrays[f"weights_{j}"] = self.weights[j]
        tmp = path.with_name(path.name + ".partial.npz")
        with os.fdopen(create_new(tmp), "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
        os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class SplitOptimum:
    rows: int
    positives: int
    auc: float
    log_loss: float


@dataclass(frozen=True, slots=True)
class SynthInfo:
    """What ``synth.json`` holds."""

    rows: int
    seed: int
    ctr: float
    cardinalities: tuple[int, ...]
    val: SplitOptimum
    test: SplitOptimum
    data_file: str = DATA_NAME
    model_file: str = MODEL_NAME
    note: str = (
        "val/test: Bayes-optimal AUC and log loss, i.e. of the true click probabilities against "
        "the "
        "drawn labels, on the Kaggle-rule validation and test splits of data_file"
    )


def _draw_model(rng: np.random.Generator, cards: tuple[int, ...]) -> PlantedModel:
    ids, weights = [], []
    sigmas = rng.choice(np.array([0.05, 0.15, 0.3, 0.5]), size=NUM_SPARSE, p=[0.3, 0.3, 0.25, 0.15])
    for j, c in enumerate(cards):
        vocab = np.unique(rng.integers(0, 1 << 32, size=c + c // 8 + 8, dtype=np.int64))
        ids.append(rng.permutation(vocab)[:c])
        # Rare ids get small effects, so that the optimum stays within reach of a model that sees
        # each tail id a few times only (the trainer's demo compares its AUC to this optimum).
        decay = (1.0 + np.arange(c) / 32.0) ** -0.5
        weights.append(rng.normal(0.0, sigmas[j], size=c) * decay)
    a, b = INTERACTION
    return PlantedModel(
        ids=tuple(ids),
        weights=tuple(weights),
        missing_weights=rng.normal(0.0, 0.2, size=NUM_SPARSE),
        zipf=rng.uniform(1.05, 1.4, size=NUM_SPARSE),
        dense_weights=rng.normal(0.0, 0.08, size=NUM_DENSE),
        interaction=rng.normal(0.0, 0.6, size=(cards[a] + 1, cards[b] + 1)),
        bias=0.0,
    )


@dataclass(frozen=True, slots=True)
class _Draw:
    labels: npt.NDArray[np.uint8]
    probs: npt.NDArray[np.float64]
    dense: npt.NDArray[np.int64]
    dense_missing: npt.NDArray[np.bool_]
    sparse: npt.NDArray[np.int64]
    sparse_missing: npt.NDArray[np.bool_]


def _logits_without_bias(
    model: PlantedModel,
    rank: npt.NDArray[np.int64],
    sparse_missing: npt.NDArray[np.bool_],
    dense: npt.NDArray[np.int64],
    dense_missing: npt.NDArray[np.bool_],
) -> npt.NDArray[np.float64]:
    n = rank.shape[0]
    logit = np.zeros(n)
    for j in range(NUM_SPARSE):
        logit += np.where(
            sparse_missing[:, j], model.missing_weights[j], model.weights[j][rank[:, j]]
        )
    x = np.where(dense_missing, 0, np.log1p(np.maximum(dense, 0)))
    logit += x @ model.dense_weights
    a, b = INTERACTION
    ia = np.where(sparse_missing[:, a], model.interaction.shape[0] - 1, rank[:, a])
    ib = np.where(sparse_missing[:, b], model.interaction.shape[1] - 1, rank[:, b])
    logit += model.interaction[ia, ib]
    return logit


def _draw_features(
    rng: np.random.Generator, model: PlantedModel, cdfs: list[npt.NDArray[np.float64]], n: int
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.bool_]
]:
    rank = np.empty((n, NUM_SPARSE), dtype=np.int64)
    for j, cdf in enumerate(cdfs):
        rank[:, j] = np.minimum(np.searchsorted(cdf, rng.random(n)), cdf.shape[0] - 1)
    sparse_missing = rng.random((n, NUM_SPARSE)) < np.asarray(SPARSE_MISSING)
    laws = np.asarray(DENSE_LAWS)
    dense = np.floor(np.exp(rng.normal(laws[:, 0], laws[:, 1], size=(n, NUM_DENSE))) - 1).astype(
        np.int64
    )
    dense = np.maximum(dense, 0)
    negative = rng.random(n) < 0.05
    dense[negative, 1] = -rng.integers(1, 4, size=int(negative.sum()))
    dense_missing = rng.random((n, NUM_DENSE)) < np.asarray(DENSE_MISSING)
    return rank, sparse_missing, dense, dense_missing


def _bias_for_ctr(logits: npt.NDArray[np.float64], ctr: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < ctr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def synth(
    dst: str | os.PathLike[str],
    *,
    rows: int,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> SynthInfo:
    """Write ``rows`` planted rows to ``dst/train.txt`` and the optimum to ``dst/synth.json``.

    ``dst`` must be new or empty unless ``force`` (which replaces the three files, and leaves any
    other file there alone); the run holds ``dst``'s lock (:mod:`.outdir`).
    """
    if rows < 14:
        raise ValueError(
            f"rows must be at least 14 (7 Kaggle parts with a val and a test row), got {rows}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    with claim_output(Path(dst)) as out:
        if out.entries and not force:
            refuse_non_empty(out, "synth")
        return _synth(out.root, rows, seed, log)


def _synth(root: Path, rows: int, seed: int, log: Callable[[str], None] | None) -> SynthInfo:
    start = time.perf_counter()
    cards = scaled_cardinalities(rows)
    rng = np.random.default_rng([seed, 0])
    model = _draw_model(rng, cards)
    cdfs = []
    for j, c in enumerate(cards):
        p = np.arange(1, c + 1, dtype=np.float64) ** -model.zipf[j]
        cdfs.append(np.cumsum(p / p.sum()))
    pilot = _draw_features(np.random.default_rng([seed, 1]), model, cdfs, min(rows, 50_000) + 1000)
    bias = _bias_for_ctr(_logits_without_bias(model, *pilot), TARGET_CTR)
    model = PlantedModel(
        model.ids, model.weights, model.missing_weights, model.zipf, model.dense_weights,
        model.interaction, bias,
    )  # fmt: skip

    def draw_chunk(index: int, lo: int, n: int) -> PlantedChunk:
        chunk_rng = np.random.default_rng([seed, 2, index])
        rank, s_missing, dense, d_missing = _draw_features(chunk_rng, model, cdfs, n)
        probs = 1.0 / (
            1.0 + np.exp(-(bias + _logits_without_bias(model, rank, s_missing, dense, d_missing)))
        )
        labels = (chunk_rng.random(n) < probs).astype(np.uint8)
        hex_ids = np.stack([model.ids[j][rank[:, j]] for j in range(NUM_SPARSE)], axis=1)
        return PlantedChunk(probs, format_tsv(labels, dense, d_missing, hex_ids, s_missing), labels)

    positives, optimum = write_planted_rows(root, rows, draw_chunk)
    model.save(root / MODEL_NAME)
    info = SynthInfo(rows, seed, positives / rows, cards, optimum["val"], optimum["test"])
    write_synth_info(root, info)
    if log is not None:
        log(
            f"wrote {rows} rows to {root / DATA_NAME} in {time.perf_counter() - start:.1f} s; "
            f"click rate {info.ctr:.3f}; Bayes-optimal validation AUC {info.val.auc:.4f}, "
            f"log loss {info.val.log_loss:.4f}"
        )
    return info


@dataclass(frozen=True, slots=True)
class PlantedChunk:
    """One chunk of a planted stream: each row's true click probability, the rows as Criteo text
    lines, and the labels drawn from those probabilities."""

    probs: npt.NDArray[np.float64]
    text: bytes
    labels: npt.NDArray[np.uint8]


def write_planted_rows(
    root: Path, rows: int, draw_chunk: Callable[[int, int, int], PlantedChunk]
) -> tuple[int, dict[SplitName, SplitOptimum]]:
    """Write ``rows`` rows to ``root/DATA_NAME`` through a temporary file renamed when complete,
    ``draw_chunk(index, first_row, n)`` giving each chunk of at most ``CHUNK_ROWS`` rows. Returns
    the number of positive labels, and the optimum (the true probabilities' AUC and log loss) of
    the validation and test splits."""
    bounds: dict[SplitName, Segment] = {
        name: split_segments("kaggle", [rows], name)[0] for name in ("val", "test")
    }
    kept: dict[SplitName, list[tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]]] = {
        "val": [],
        "test": [],
    }
    positives = 0
    tmp = root / (DATA_NAME + ".partial")
    with os.fdopen(create_new(tmp), "wb") as out:
        for index, lo in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - lo)
            chunk = draw_chunk(index, lo, n)
            positives += int(chunk.labels.sum())
            out.write(chunk.text)
            for name, seg in bounds.items():
                a, b = max(seg.start, lo), min(seg.stop, lo + n)
                if a < b:
                    kept[name].append((chunk.probs[a - lo : b - lo], chunk.labels[a - lo : b - lo]))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, root / DATA_NAME)
    optimum = {
        name: _optimum(
            np.concatenate([p for p, _ in pieces]), np.concatenate([y for _, y in pieces])
        )
        for name, pieces in kept.items()
    }
    return positives, optimum


def _optimum(probs: npt.NDArray[np.float64], labels: npt.NDArray[np.uint8]) -> SplitOptimum:
    """The AUC and log loss of the true click probabilities: the metrics' own definitions (the
    trainer's AUC), so that the gap the trainer prints compares like with like."""
    import torch

    from shardrec_dlrm.metrics import binary_auc

    y = labels.astype(np.float64)
    auc = binary_auc(torch.from_numpy(probs.astype(np.float64)), torch.from_numpy(y))
    p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    loss = float(-np.mean(np.where(y > 0, np.log(p), np.log1p(-p))))
    return SplitOptimum(int(y.shape[0]), int(labels.sum()), auc, loss)


def write_synth_info(root: str | os.PathLike[str], info: SynthInfo) -> None:
    """Writes ``root/synth.json`` (atomically)."""
    write_atomic(Path(root) / INFO_NAME, json.dumps(asdict(info), indent=2) + "\n")


def find_synth_info(data: str | os.PathLike[str]) -> SynthInfo | None:
    """The ``synth.json`` beside ``data`` (a data directory, or a file in one), or None when
    there is none; one that is there but cannot be trusted is a :class:`DataError`."""
    root = Path(data)
    root = root if root.is_dir() else root.parent
    if not os.path.lexists(root / INFO_NAME):
        return None
    return read_synth_info(root)


def read_synth_info(root: str | os.PathLike[str]) -> SynthInfo:
    """Read ``synth.json`` back (the trainer prints its optimum beside the AUC it reached).

    It must be a regular file of at most 1 MiB; anything else is a one-line :class:`DataError`.
    """
    path = Path(root) / INFO_NAME
    text = read_small(path, MAX_RECORD_BYTES)
    try:
        raw = json.loads(text)
        return SynthInfo(
            rows=int(raw["rows"]),
            seed=int(raw["seed"]),
            ctr=float(raw["ctr"]),
            cardinalities=tuple(raw["cardinalities"]),
            val=SplitOptimum(**raw["val"]),
            test=SplitOptimum(**raw["test"]),
            data_file=str(raw["data_file"]),
            model_file=str(raw["model_file"]),
        )
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise DataError(f"{path}: malformed synth.json ({e})") from None
