"""shardrec: typed, plugin-based sharded embedding tables for recommendation models.

TorchRec's public names keep their meaning: ``import shardrec as torchrec`` runs its introduction.
``shardrec.distributed`` is imported on first use, so that importing shardrec stays cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# torch.distributed.nn binds the default process group of the moment as a default argument of its
# collectives when it is first imported, and torch imports it lazily (creating any torch optimizer
# does, through torch._dynamo). Imported after init_process_group, it would keep that group alive
# past destroy_process_group, until Python's finalisation, where tearing down a gloo group can
# abort the process (shardrec.distributed.group_ref says how). Imported here, before any group
# exists, it binds None.
import torch.distributed.nn  # noqa: F401

from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

# isort: split
from shardrec.modules import (
    BadBatchError,
    DataType,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    PoolingType,
)

_LAZY_SUBMODULES = frozenset({"distributed"})


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"shardrec.{name}")
    raise AttributeError(f"module 'shardrec' has no attribute {name!r}")


__all__: list[str] = [  # noqa: RUF022 (sparse containers first, then the modules)
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "BadBatchError",
    "DataType",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "PoolingType",
]
