"""TorchRec's module path for the managed-collision modules (``torchrec.modules.mc_modules``).

The classes live in small files of their own (the id map, the policies, admission, the per-table
module, the collection); this module gathers them under the path a TorchRec user imports from.
"""

from shardrec.modules.managed_collision import ManagedTableStats, MCHManagedCollisionModule
from shardrec.modules.mc_admission import CountThresholdAdmission
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_policies import (
    EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    TTL_EvictionPolicy,
)

__all__ = [
    "CountThresholdAdmission",
    "EvictionPolicy",
    "LFU_EvictionPolicy",
    "LRU_EvictionPolicy",
    "MCHManagedCollisionModule",
    "ManagedCollisionCollection",
    "ManagedTableStats",
    "TTL_EvictionPolicy",
]
