"""shardrec: typed, plugin-based sharded embedding tables for recommendation models.

TorchRec's public names keep their meaning: ``import shardrec as torchrec`` runs its introduction.
``shardrec.distributed`` is imported on first use, so that importing shardrec stays cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# --- sparse containers (issue 2) ---
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

# --- end sparse containers ---

# --- embedding modules (issue 3) ---
# isort: split
from shardrec.modules import (
    DataType,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    PoolingType,
)

# --- end embedding modules ---

_LAZY_SUBMODULES = frozenset({"distributed"})


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"shardrec.{name}")
    raise AttributeError(f"module 'shardrec' has no attribute {name!r}")


__all__: list[str] = [  # noqa: RUF022 (sorted within each section)
    # --- sparse containers (issue 2) ---
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    # --- end sparse containers ---
    # --- embedding modules (issue 3) ---
    "DataType",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "PoolingType",
    # --- end embedding modules ---
]
