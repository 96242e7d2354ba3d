"""What a module may do once a checkpoint's values are in its state.

A checkpoint load writes values straight into the tensors of a model's state (into this rank's
shards, in place), so ``nn.Module._load_from_state_dict`` and load hooks never run. A module that
keeps something derived from its state outside it (a cache) implements :class:`StateLoaded`:
after every value has been written, ``state_loaded()`` runs on each such module of the model, so
that a model that loads a checkpoint goes on exactly like a fresh model loading it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

__all__ = ["StateLoaded", "notify_state_loaded"]


@runtime_checkable
class StateLoaded(Protocol):
    """A module told when a load has replaced its state (its buffers and parameters)."""

    def state_loaded(self) -> None:
        """Drop whatever was derived from the state before the load; the new values are in."""
        ...


def notify_state_loaded(model: nn.Module) -> None:
    """Calls ``state_loaded()`` on every module of ``model`` (itself included) that has it, in
    :meth:`nn.Module.modules` order."""
    for module in model.modules():
        if isinstance(module, StateLoaded):
            module.state_loaded()
