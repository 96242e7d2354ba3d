"""``dlrm synth --drift``: a planted click stream whose ids drift, for managed (collision-free)
tables.

Each categorical feature ``j`` draws its ids from a *live window* of ``live_j`` ids that slides over
an unbounded sequence of ids as the stream goes on (row ``r`` of ``N`` is at time ``t = r / N``)::

    index of the id at popularity rank k (Zipf, exponent a_j):   i = offset_j(t) + live_j - 1 - k
    offset_j(t) = floor(t * turnover * live_j)
    raw id      = the 32 low bits of splitmix64(seed, j, i)      (an 8-digit hex field)
    weight      = s_j * N(0, 1) drawn from splitmix64(seed, j, i, "w")

So a new id enters at the top of the popularity order, cools down as younger ids arrive, and
leaves the window for good after ``live_j`` steps of the offset: over the stream a feature shows
``live_j * (1 + turnover)`` distinct ids, of which about ``live_j`` are live at any time. Features
whose Kaggle cardinality is at most ``live`` keep their whole vocabulary (no drift), as Criteo's
low-cardinality columns do. The click model is the one of :mod:`.synth` with these ids::

    logit = bias + sum_j w_j(id_j) + sum_i v_i * log(1 + max(I_i, 0)),   label ~ Bernoulli(sigmoid)

Validation and test are the stream's last seventh (Kaggle's rule), so they measure the newest ids.
Output as :func:`.synth.synth`: ``train.txt``, ``synth.json`` (the Bayes-optimal AUC and log loss
of the validation and test splits; ``cardinalities`` are the distinct ids per feature over the
stream) and ``planted_model.npz`` (the parameters from which every id and weight is recomputed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from .files import create_new
from .outdir import claim_output, refuse_non_empty
from .schema import NUM_DENSE, NUM_SPARSE
from .synth import (
    DATA_NAME,
    DENSE_LAWS,
    DENSE_MISSING,
    KAGGLE_CARDINALITIES,
    MODEL_NAME,
    SPARSE_MISSING,
    TARGET_CTR,
    PlantedChunk,
    SynthInfo,
    _bias_for_ctr,
    write_planted_rows,
    write_synth_info,
)
from .textwrite import format_tsv

DEFAULT_LIVE: Final = 2048
DEFAULT_TURNOVER: Final = 4.0
_U64 = np.uint64
_GOLDEN: Final = _U64(0x9E3779B97F4A7C15)
_MIX1: Final = _U64(0xBF58476D1CE4E5B9)
_MIX2: Final = _U64(0x94D049BB133111EB)


def _splitmix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser: a bijection of 64-bit words (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _MIX1
        z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


@dataclass(frozen=True, slots=True)
class DriftModel:
    """The planted stream: per feature its live window, turnover, Zipf exponent and weight scale."""

    seed: int
    live: npt.NDArray[np.int64]
    turnover: npt.NDArray[np.float64]
    zipf: npt.NDArray[np.float64]
    sigmas: npt.NDArray[np.float64]
    missing_weights: npt.NDArray[np.float64]
    dense_weights: npt.NDArray[np.float64]
    bias: float

    def _hash(
        self, feature: int, index: npt.NDArray[np.int64], salt: int
    ) -> npt.NDArray[np.uint64]:
        key = _splitmix(np.array([self.seed * 1_000_003 + feature * 8 + salt], dtype=np.uint64))
        return _splitmix(index.astype(np.uint64) ^ key[0])

    def raw_ids(self, feature: int, index: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The 32-bit id of each index of ``feature``'s id sequence."""
        return (self._hash(feature, index, 0) & _U64(0xFFFFFFFF)).astype(np.int64)

    def weights(self, feature: int, index: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """The planted weight of each index (Box-Muller over two hashes)."""
        h1 = self._hash(feature, index, 1)
        h2 = _splitmix(h1)
        u1 = ((h1 >> _U64(11)).astype(np.float64) + 1.0) * 2.0**-53
        u2 = (h2 >> _U64(11)).astype(np.float64) * 2.0**-53
        normal: npt.NDArray[np.float64] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return normal * float(self.sigmas[feature])

    def distinct_ids(self, rows: int) -> tuple[int, ...]:
        """Ids per feature over a stream of ``rows`` rows (the windows' union)."""
        return tuple(
            int(live + np.floor(turn * live * (rows - 0.5) / rows))
            for live, turn in zip(self.live, self.turnover, strict=True)
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".partial.npz")
        with os.fdopen(create_new(tmp), "wb") as f:
            np.savez(
                f,
                allow_pickle=False,
                kind=np.array("drift"),
                seed=np.array(self.seed),
                live=self.live,
                turnover=self.turnover,
                zipf=self.zipf,
                sigmas=self.sigmas,
                missing_weights=self.missing_weights,
                dense_weights=self.dense_weights,
                bias=np.array(self.bias),
            )
        os.replace(tmp, path)


def draw_drift_model(seed: int, live: int, turnover: float) -> DriftModel:
    rng = np.random.default_rng([seed, 10])
    cards = np.asarray(KAGGLE_CARDINALITIES, dtype=np.int64)
    drifting = cards > live
    return DriftModel(
        seed=seed,
        live=np.where(drifting, live, cards),
        turnover=np.where(drifting, turnover, 0.0),
        zipf=rng.uniform(1.05, 1.3, size=NUM_SPARSE),
        sigmas=rng.choice(np.array([0.15, 0.3, 0.5]), size=NUM_SPARSE),
        missing_weights=rng.normal(0.0, 0.2, size=NUM_SPARSE),
        dense_weights=rng.normal(0.0, 0.08, size=NUM_DENSE),
        bias=0.0,
    )


@dataclass(frozen=True, slots=True)
class _Rows:
    index: npt.NDArray[np.int64]  # [n, 26] position in each feature's id sequence
    sparse_missing: npt.NDArray[np.bool_]
    dense: npt.NDArray[np.int64]
    dense_missing: npt.NDArray[np.bool_]


def _draw_rows(
    rng: np.random.Generator, model: DriftModel, first: int, n: int, total: int
) -> _Rows:
    t = (np.arange(first, first + n, dtype=np.float64) + 0.5) / total
    index = np.empty((n, NUM_SPARSE), dtype=np.int64)
    for j in range(NUM_SPARSE):
        live = int(model.live[j])
        p = np.arange(1, live + 1, dtype=np.float64) ** -model.zipf[j]
        cdf = np.cumsum(p / p.sum())
        rank = np.minimum(np.searchsorted(cdf, rng.random(n)), live - 1)
        offset = np.floor(t * model.turnover[j] * live).astype(np.int64)
        index[:, j] = offset + live - 1 - rank
    sparse_missing = rng.random((n, NUM_SPARSE)) < np.asarray(SPARSE_MISSING)
    laws = np.asarray(DENSE_LAWS)
    dense = np.floor(np.exp(rng.normal(laws[:, 0], laws[:, 1], size=(n, NUM_DENSE))) - 1)
    dense = np.maximum(dense.astype(np.int64), 0)
    dense_missing = rng.random((n, NUM_DENSE)) < np.asarray(DENSE_MISSING)
    return _Rows(index, sparse_missing, dense, dense_missing)


def _logits(model: DriftModel, rows: _Rows) -> npt.NDArray[np.float64]:
    logit = np.full(rows.index.shape[0], model.bias)
    for j in range(NUM_SPARSE):
        w = model.weights(j, rows.index[:, j])
        logit += np.where(rows.sparse_missing[:, j], model.missing_weights[j], w)
    x = np.where(rows.dense_missing, 0, np.log1p(np.maximum(rows.dense, 0)))
    return logit + x @ model.dense_weights


def synth_drift(
    dst: str | os.PathLike[str],
    *,
    rows: int,
    seed: int = 0,
    live: int = DEFAULT_LIVE,
    turnover: float = DEFAULT_TURNOVER,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> SynthInfo:
    """Write a drifting planted stream of ``rows`` rows to ``dst`` (see the module doc)."""
    if rows < 14:
        raise ValueError(f"rows must be at least 14, got {rows}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if live < 2:
        raise ValueError(f"live must be at least 2 ids per feature, got {live}")
    if not turnover >= 0:
        raise ValueError(f"turnover must be >= 0, got {turnover}")
    with claim_output(Path(dst)) as out:
        if out.entries and not force:
            refuse_non_empty(out, "synth")
        return _write(out.root, rows, draw_drift_model(seed, live, turnover), log)


def _write(
    root: Path, rows: int, model: DriftModel, log: Callable[[str], None] | None
) -> SynthInfo:
    start = time.perf_counter()
    seed = model.seed
    pilot = _draw_rows(np.random.default_rng([seed, 11]), model, 0, min(rows, 50_000), rows)
    bias = _bias_for_ctr(_logits(model, pilot), TARGET_CTR)
    model = DriftModel(
        model.seed, model.live, model.turnover, model.zipf, model.sigmas,
        model.missing_weights, model.dense_weights, bias,
    )  # fmt: skip

    def draw_chunk(index: int, lo: int, n: int) -> PlantedChunk:
        rng = np.random.default_rng([seed, 12, index])
        drawn = _draw_rows(rng, model, lo, n, rows)
        probs = 1.0 / (1.0 + np.exp(-_logits(model, drawn)))
        labels = (rng.random(n) < probs).astype(np.uint8)
        ids = np.stack([model.raw_ids(j, drawn.index[:, j]) for j in range(NUM_SPARSE)], 1)
        text = format_tsv(labels, drawn.dense, drawn.dense_missing, ids, drawn.sparse_missing)
        return PlantedChunk(probs, text, labels)

    positives, optimum = write_planted_rows(root, rows, draw_chunk)
    model.save(root / MODEL_NAME)
    info = SynthInfo(
        rows, seed, positives / rows, model.distinct_ids(rows), optimum["val"], optimum["test"]
    )
    write_synth_info(root, info)
    if log is not None:
        log(
            f"wrote {rows} drifting rows to {root / DATA_NAME} in "
            f"{time.perf_counter() - start:.1f} s; click rate {info.ctr:.3f}; up to "
            f"{max(info.cardinalities)} ids per feature, {int(model.live.max())} live at a time; "
            f"Bayes-optimal validation AUC {info.val.auc:.4f}, log loss {info.val.log_loss:.4f}"
        )
    return info
