"""DLRM and DCNv2 models built from shardrec's EmbeddingBagCollection.

The classes load on first use (they import torch), so that :mod:`.config`, which the command line
reads to build its options, stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardrec_dlrm.model.arches import DenseArch, OverArch, SparseArch
    from shardrec_dlrm.model.config import InteractionType, ModelConfig
    from shardrec_dlrm.model.dlrm import DLRM, DLRMTrain
    from shardrec_dlrm.model.interaction import (
        InteractionArch,
        InteractionDCNArch,
        LowRankCrossNet,
    )
    from shardrec_dlrm.model.mlp import MLP

_HOMES = {
    "DLRM": "dlrm",
    "DLRMTrain": "dlrm",
    "DenseArch": "arches",
    "InteractionArch": "interaction",
    "InteractionDCNArch": "interaction",
    "InteractionType": "config",
    "LowRankCrossNet": "interaction",
    "MLP": "mlp",
    "ModelConfig": "config",
    "OverArch": "arches",
    "SparseArch": "arches",
}

__all__ = [
    "DLRM",
    "MLP",
    "DLRMTrain",
    "DenseArch",
    "InteractionArch",
    "InteractionDCNArch",
    "InteractionType",
    "LowRankCrossNet",
    "ModelConfig",
    "OverArch",
    "SparseArch",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
