"""DLRM and DCNv2 models built from shardrec's EmbeddingBagCollection."""

from shardrec_dlrm.model.arches import DenseArch, OverArch, SparseArch
from shardrec_dlrm.model.dlrm import DLRM, DLRMTrain, InteractionType
from shardrec_dlrm.model.interaction import InteractionArch, InteractionDCNArch, LowRankCrossNet
from shardrec_dlrm.model.mlp import MLP

__all__ = [
    "DLRM",
    "MLP",
    "DLRMTrain",
    "DenseArch",
    "InteractionArch",
    "InteractionDCNArch",
    "InteractionType",
    "LowRankCrossNet",
    "OverArch",
    "SparseArch",
]
