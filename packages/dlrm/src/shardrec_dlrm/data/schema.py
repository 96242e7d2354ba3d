"""The Criteo row schema, the dense transform and the categorical hashing, in one place.

A Criteo row is ``label, I1..I13, C1..C26``. In memory the rows of a file are held column-wise as
:class:`Rows`: ``labels`` uint8 ``[N]``, ``dense`` float32 ``[N, 13]`` (already transformed) and
``sparse`` int64 ``[N, 26]`` (the 32-bit hex ids as integers, :data:`MISSING_ID` where the field was
empty). Hashing to table sizes happens only when batches are made, so one preprocessed copy serves
every table size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

NUM_DENSE: Final = 13
NUM_SPARSE: Final = 26
NUM_FIELDS: Final = 1 + NUM_DENSE + NUM_SPARSE
DENSE_NAMES: Final = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
SPARSE_NAMES: Final = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
COLUMN_NAMES: Final = ("label", *DENSE_NAMES, *SPARSE_NAMES)
#: KeyedJaggedTensor keys of the 26 categorical features (TorchRec's names).
SPARSE_KEYS: Final = tuple(f"cat_{i}" for i in range(NUM_SPARSE))
#: Stored for an empty categorical field; never a valid id (ids are unsigned 32-bit hashes).
MISSING_ID: Final = -1
#: The largest id a categorical may hold: Criteo's ids are 32-bit hashes (8 hex digits).
MAX_ID: Final = (1 << 32) - 1
#: The largest dense value the transform gives: log(1 + x) of the largest 18-digit count.
DENSE_MAX: Final = 41.5
#: Row 0 of every table is reserved for a missing categorical value.
RESERVED_ROW: Final = 0

U8Array = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]
I64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Rows:
    """Column-wise rows: ``labels`` uint8 [N], ``dense`` float32 [N, 13] transformed, ``sparse``
    int64 [N, 26]."""

    labels: U8Array
    dense: F32Array
    sparse: I64Array

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def empty() -> Rows:
        return Rows(
            np.zeros(0, np.uint8),
            np.zeros((0, NUM_DENSE), np.float32),
            np.zeros((0, NUM_SPARSE), np.int64),
        )

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        if not parts:
            return Rows.empty()
        if len(parts) == 1:
            return parts[0]
        return Rows(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
        )

    def select(self, mask_or_index: npt.NDArray[np.bool_] | npt.NDArray[np.intp]) -> Rows:
        return Rows(
            self.labels[mask_or_index], self.dense[mask_or_index], self.sparse[mask_or_index]
        )


DENSE_TRANSFORM: Final = "log(1 + max(x, 0)), missing -> 0, float32"
SPARSE_TRANSFORM: Final = "hex -> int64 (the raw 32-bit id, unhashed), missing -> -1"
HASHING: Final = "when batches are read: missing -> row 0, id h -> 1 + h mod (num_embeddings - 1)"


def transform_dense(raw: npt.NDArray[np.int64] | npt.NDArray[np.float64]) -> F32Array:
    """The DLRM reference transform: missing was read as 0; negatives clamp to 0; log(1 + x)."""
    return np.log1p(np.maximum(raw, 0).astype(np.float32))


def hash_ids(sparse: I64Array, num_embeddings_per_feature: Sequence[int] | None) -> I64Array:
    """Map raw ids ``[N, 26]`` to table rows: missing -> 0, a present id h -> ``1 + h % (n - 1)``.

    Row 0 is reserved for "missing" so that an absent value never shares a row with a real id. With
    ``num_embeddings_per_feature=None`` ids are only shifted by one (tables must then hold 2**32 + 1
    rows: for tests and for callers that hash themselves).
    """
    present = sparse >= 0
    if num_embeddings_per_feature is None:
        out = sparse + 1
    else:
        mod = np.asarray(num_embeddings_per_feature, dtype=np.int64) - 1
        out = np.remainder(sparse, mod) + 1
    out[~present] = RESERVED_ROW
    return out


def parse_num_embeddings(
    num_embeddings: int | None, num_embeddings_per_feature: Sequence[int] | str | None
) -> tuple[int, ...] | None:
    """Resolve ``--num-embeddings N`` / ``--num-embeddings-per-feature a,b,...`` to 26 sizes."""
    if num_embeddings is not None and num_embeddings_per_feature is not None:
        raise ValueError("give either num_embeddings or num_embeddings_per_feature, not both")
    if num_embeddings_per_feature is not None:
        if isinstance(num_embeddings_per_feature, str):
            try:
                sizes = tuple(int(s) for s in num_embeddings_per_feature.split(","))
            except ValueError:
                raise ValueError(
                    "num_embeddings_per_feature must be 26 comma-separated integers, "
                    f"got {num_embeddings_per_feature!r}"
                ) from None
        else:
            sizes = tuple(int(s) for s in num_embeddings_per_feature)
        if len(sizes) != NUM_SPARSE:
            raise ValueError(
                f"num_embeddings_per_feature needs {NUM_SPARSE} sizes (C1..C26), got {len(sizes)}"
            )
    elif num_embeddings is not None:
        sizes = (int(num_embeddings),) * NUM_SPARSE
    else:
        return None
    for name, size in zip(SPARSE_NAMES, sizes, strict=True):
        if size < 2:
            raise ValueError(
                f"table size for {name} must be >= 2 (row 0 is reserved for missing), got {size}"
            )
    return sizes
