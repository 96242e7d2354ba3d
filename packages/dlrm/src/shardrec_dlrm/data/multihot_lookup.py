"""The MLPerf DLRMv2 one-hot -> multi-hot lookup: per table, each row maps to ``hot`` rows.

MLPerf's "Criteo 1TB multi-hot" data is synthesised from the one-hot data. For table ``j`` of ``n``
rows and ``hot`` ids per sample, a lookup ``[n, hot]`` is drawn once: column 0 is the row itself,
the other ``hot - 1`` columns are random rows. A sample's one-hot id ``r`` becomes the ``hot`` ids
``lookup[r]``. The draws follow the reference materialiser (``torchrec_dlrm/multi_hot.py`` in
facebookresearch/dlrm and mlcommons/training ``recommendation_v2``, class ``Multihot``): numpy's
legacy generator seeded once with ``seed`` (0 in the reference) before table 0, then for each
table in order

- ``uniform``: ``randint(0, n, size=(n, hot - 1))``;
- ``pareto``: ``pareto(a=0.25, size=(n, hot - 1))`` cast to int32, then ``% n``.

Here the draws are made ``chunk_rows`` rows at a time: the legacy generator draws value after
value, so cutting a call by rows gives the same numbers (the tests check it against the whole-table
call) while memory stays bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from .schema import NUM_SPARSE

Distribution = Literal["uniform", "pareto"]
DISTRIBUTIONS: Final[tuple[Distribution, ...]] = ("uniform", "pareto")
#: Ids per sample of the 26 tables in MLPerf DLRMv2 (sum pooling): 214 per sample.
MLPERF_MULTI_HOT: Final = (
    3,
    2,
    1,
    2,
    6,
    1,
    1,
    1,
    1,
    7,
    3,
    8,
    1,
    6,
    9,
    5,
    1,
    1,
    1,
    12,
    100,
    27,
    10,
    3,
    1,
    1,
)
#: The 1TB table sizes, the large ones capped at 40,000,000 rows (sum 204,184,588).
MLPERF_NUM_EMBEDDINGS: Final = (
    40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956,
    405_282, 10, 2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152,
    12_973, 108, 36,
)  # fmt: skip
#: The seed of the reference materialiser.
MLPERF_SEED: Final = 0
#: Rows of a lookup drawn at once: 64 Ki rows of 100 ids are 50 MiB of int64 draws.
DEFAULT_CHUNK_ROWS: Final = 1 << 16

I32Array = npt.NDArray[np.int32]


def parse_multi_hot(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"mlperf"`` or 26 comma-separated ids-per-sample (each >= 1) -> 26 sizes."""
    if isinstance(value, str):
        if value.strip().lower() == "mlperf":
            return MLPERF_MULTI_HOT
        try:
            sizes = tuple(int(s) for s in value.split(","))
        except ValueError:
            raise ValueError(
                f"multi-hot sizes must be 'mlperf' or {NUM_SPARSE} comma-separated integers, "
                f"got {value!r}"
            ) from None
    else:
        sizes = tuple(int(s) for s in value)
    if len(sizes) != NUM_SPARSE:
        raise ValueError(f"multi-hot sizes need {NUM_SPARSE} values (C1..C26), got {len(sizes)}")
    for i, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"multi-hot size of C{i + 1} must be >= 1, got {size}")
    return sizes


def lookup_chunks(
    num_embeddings_per_feature: Sequence[int],
    multi_hot: Sequence[int],
    *,
    distribution: Distribution = "uniform",
    seed: int = MLPERF_SEED,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[tuple[int, int, I32Array]]:
    """``(table, first_row, lookup[first_row : first_row + k])`` for every table in order, each
    block int32 ``[k, hot]`` with ``k <= chunk_rows``: the reference's lookups, drawn in pieces."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if len(num_embeddings_per_feature) != len(multi_hot):
        raise ValueError("one multi-hot size per table is needed")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    # The legacy generator on purpose: the reference seeds numpy's global RandomState.
    rng = np.random.RandomState(seed)
    for table, (n, hot) in enumerate(zip(num_embeddings_per_feature, multi_hot, strict=True)):
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            block = np.empty((hi - lo, hot), dtype=np.int32)
            block[:, 0] = np.arange(lo, hi, dtype=np.int64)
            if hot > 1:
                shape = (hi - lo, hot - 1)
                if distribution == "uniform":
                    block[:, 1:] = rng.randint(0, n, size=shape)
                else:
                    # the reference's cast: values past int32 wrap, then Python-style modulo
                    with np.errstate(invalid="ignore"):
                        block[:, 1:] = rng.pareto(a=0.25, size=shape).astype(np.int32) % n
            yield table, lo, block
