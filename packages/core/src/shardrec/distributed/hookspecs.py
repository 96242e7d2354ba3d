"""The hooks a shardrec plugin implements, and the ``hookimpl`` marker it uses.

A plugin is a module (or any object) named by an entry point in the ``shardrec`` group::

    [project.entry-points.shardrec]
    my_sharder = "my_pkg.plugin"

and ``my_pkg/plugin.py`` holds::

    from shardrec.distributed.hookspecs import hookimpl

    @hookimpl
    def shardrec_register_sharders(register):
        register(MySharder())

    @hookimpl
    def shardrec_register_storage_backends(register):
        register(MyStorage())

A plugin implements either hook or both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import pluggy

from shardrec.distributed.types import ModuleSharder
from shardrec.kernels.storage import StorageBackend

__all__ = [
    "PROJECT_NAME",
    "RegisterSharder",
    "RegisterStorageBackend",
    "hookimpl",
    "hookspec",
    "shardrec_register_sharders",
    "shardrec_register_storage_backends",
]

PROJECT_NAME: Final[str] = "shardrec"
"""The pluggy project name and the entry-point group."""

_F = TypeVar("_F", bound=Callable[..., Any])

hookspec: Final[Callable[[_F], _F]] = cast(
    "Callable[[_F], _F]", pluggy.HookspecMarker(PROJECT_NAME)
)
hookimpl: Final[Callable[[_F], _F]] = cast(
    "Callable[[_F], _F]", pluggy.HookimplMarker(PROJECT_NAME)
)
"""Marks a plugin's implementation of a shardrec hook."""

RegisterSharder = Callable[[ModuleSharder], None]
"""The callback a plugin calls once per sharder it offers."""

RegisterStorageBackend = Callable[[StorageBackend], None]
"""The callback a plugin calls once per storage backend it offers."""


@hookspec
def shardrec_register_sharders(register: RegisterSharder) -> None:
    """Offer sharders: call ``register(sharder)`` once for each.

    Each sharder must satisfy :class:`shardrec.distributed.types.ModuleSharder`. The
    sharding-type names it returns for a module type must not already belong to another
    registered sharder of that module type: the host refuses duplicates, naming both plugins.
    """


@hookspec
def shardrec_register_storage_backends(register: RegisterStorageBackend) -> None:
    """Offer storage backends: call ``register(backend)`` once for each.

    Each backend must satisfy :class:`shardrec.kernels.StorageBackend`; its ``name`` (what a
    table's ``StorageChoice`` names) must not be taken by another plugin's backend: the host
    refuses duplicates, naming both plugins. The built-in ``torch`` and ``fbgemm`` backends are
    registered through this hook too.
    """
