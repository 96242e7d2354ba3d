"""References to process groups that do not keep them alive.

``torch.distributed`` owns each group it makes (``init_process_group``, ``new_group``) until
``destroy_process_group`` lets go of it, and a group's worker threads end when its last reference
goes. A gloo group that something else still holds outlives ``destroy_process_group``, and with
torch 2.13 on Python 3.11 that can abort the process as it exits, after its work is done: after
each collective a gloo worker thread drops its own references to the collective's tensors, and for
a tensor that Python also knows that takes the GIL; once the interpreter has begun finalising, a
thread that asks for the GIL is stopped (``pthread_exit``), which unwinds through a destructor that
may not throw, so the C++ runtime calls ``std::terminate`` ("terminate called without an active
exception", exit status 134). A group destroyed while the interpreter runs joins its threads first,
so this cannot happen to it.

So every long-lived object of shardrec that needs a group (``ShardingEnv``, ``NodeGroups``, the
autograd records of the collectives) refers to it through a :class:`GroupRef`: destroying the
group ends it, whatever still holds the model or its outputs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["GroupDestroyedError", "GroupRef"]


class GroupDestroyedError(RuntimeError):
    """A process group was used after ``torch.distributed.destroy_process_group`` ended it."""


@dataclass(frozen=True, slots=True)
class GroupRef:
    """A weak reference to a process group; calling it returns the group, or raises
    :class:`GroupDestroyedError` (naming ``owner``) once the group is gone.

    The group must be owned elsewhere, as ``torch.distributed`` owns the groups it makes until they
    are destroyed.
    """

    _ref: weakref.ReferenceType[dist.ProcessGroup]
    owner: str

    @classmethod
    def to(cls, group: dist.ProcessGroup, owner: str) -> GroupRef:
        """A reference to ``group``; ``owner`` says, in an error, whose group it was."""
        return cls(weakref.ref(group), owner)

    @property
    def alive(self) -> bool:
        return self._ref() is not None

    def __call__(self) -> dist.ProcessGroup:
        group = self._ref()
        if group is None:
            raise GroupDestroyedError(
                f"{self.owner}: its process group has been destroyed"
                " (torch.distributed.destroy_process_group), so it can run no collective; build"
                " the model again on a new process group"
            )
        return group
