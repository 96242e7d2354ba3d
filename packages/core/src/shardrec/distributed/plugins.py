"""The plugin manager: finds plugins through entry points and checks what they register.

Plugins offer sharders (``shardrec_register_sharders``) and storage backends
(``shardrec_register_storage_backends``). Build a manager with :func:`load_plugins` (alias
:func:`load_sharder_registry`; there is no global manager, and nothing is loaded at import time).
The built-in storage backends (``shardrec.kernels.builtin_storage``) are registered in every
manager first; the other plugins come from the ``shardrec`` entry-point group, filtered by two
environment variables, each a comma-separated list of entry-point names or distribution names:

- ``SHARDREC_PLUGINS``: if set and not empty, load only these.
- ``SHARDREC_DISABLE_PLUGINS``: never load these.

Every fault of a plugin is a :class:`PluginError` that names its entry point and distribution.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import pluggy
from torch import nn

from shardrec.distributed import hookspecs
from shardrec.distributed.hookspecs import PROJECT_NAME
from shardrec.distributed.sharder_index import DEVICE_TYPES, SharderIndex
from shardrec.distributed.types import ModuleSharder
from shardrec.kernels.storage import StorageBackend, UnknownStorageBackendError

__all__ = [
    "BUILTIN_STORAGE_MODULE",
    "DISABLE_ENV",
    "ENABLE_ENV",
    "PluginError",
    "PluginInfo",
    "PluginRegistry",
    "SharderRegistry",
    "find_storage_backend",
    "load_plugins",
    "load_sharder_registry",
]

ENABLE_ENV: Final[str] = "SHARDREC_PLUGINS"
DISABLE_ENV: Final[str] = "SHARDREC_DISABLE_PLUGINS"
BUILTIN_STORAGE_MODULE: Final[str] = "shardrec.kernels.builtin_storage"
"""The built-in plugin that registers the ``torch`` and ``fbgemm`` storage backends."""


class PluginError(RuntimeError):
    """A plugin failed to load, raised in its hook, or registered something invalid."""


@dataclass(slots=True)
class PluginInfo:
    """One loaded plugin: its name (the entry point's), its origin, and what it registered."""

    name: str
    distribution: str | None
    version: str | None
    entry_point: str | None
    sharders: list[ModuleSharder] = field(default_factory=list)
    storage_backends: list[StorageBackend] = field(default_factory=list)

    def describe(self) -> str:
        """``entry point 'x' (distribution 'd' 1.0)``, or ``plugin 'x'`` for in-process plugins."""
        if self.entry_point is None:
            return f"plugin {self.name!r}"
        return (
            f"entry point {self.entry_point!r} of distribution "
            f"{self.distribution!r} {self.version or ''}".rstrip()
        )


def _names(env: Mapping[str, str], var: str) -> frozenset[str]:
    return frozenset(n.strip() for n in env.get(var, "").split(",") if n.strip())


def _describe_sharder(sharder: object) -> str:
    cls = type(sharder)
    return f"{cls.__module__}.{cls.__qualname__}"


class PluginRegistry:
    """A typed facade over one pluggy manager: the loaded plugins, their sharders (one
    :class:`SharderIndex`, built while they register) and their storage backends."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._plugins: list[PluginInfo] = []
        self._builtins: list[PluginInfo] = []
        self._skipped: list[tuple[PluginInfo, str]] = []
        self._index = SharderIndex()
        # (module type, sharding type) -> the plugin that registered it, for duplicate errors.
        self._owners: dict[tuple[type[nn.Module], str], PluginInfo] = {}
        self._storage: dict[str, tuple[StorageBackend, PluginInfo]] = {}

    # -- queries -------------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        """The plugins loaded from entry points or passed in (not the built-in storage one)."""
        return list(self._plugins)

    def builtin_plugins(self) -> list[PluginInfo]:
        """The plugins every manager registers first (the built-in storage backends)."""
        return list(self._builtins)

    def skipped(self) -> list[tuple[PluginInfo, str]]:
        """Entry points the filters left out (never imported), each with the reason."""
        return list(self._skipped)

    def sharders(self) -> SharderIndex:
        """Every registered sharder, in registration order, indexed by what each shards (the
        same index every time: pass it on, and nothing scans the sharders again)."""
        return self._index

    def storage_backends(self) -> dict[str, StorageBackend]:
        """Name -> backend, built-in ones first."""
        return {name: backend for name, (backend, _) in self._storage.items()}

    def storage_backend(self, name: str, *, table: str) -> StorageBackend:
        """The backend called ``name``; :class:`UnknownStorageBackendError` (naming ``table`` and
        the available backends) when no plugin registered it."""
        found = self._storage.get(name)
        if found is None:
            raise UnknownStorageBackendError(table, name, list(self._storage))
        return found[0]

    # -- loading -------------------------------------------------------------------------------
    def _call_hook(self, info: PluginInfo, hook: str, function: object, add: object) -> None:
        if not callable(function):  # pragma: no cover - pluggy guarantees callables
            raise PluginError(f"{info.describe()}: {hook} is not callable")
        try:
            function(register=add)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{info.describe()}: {hook} raised {type(exc).__name__}: {exc}"
            ) from exc

    def _check_and_add(self, info: PluginInfo, sharder: object) -> None:
        where = info.describe()
        if not isinstance(sharder, ModuleSharder):
            raise PluginError(
                f"{where} registered {_describe_sharder(sharder)}, which is not a ModuleSharder "
                "(needs module_type, sharding_types, compute_kernels, storage_usage and shard)"
            )
        module_type: object = sharder.module_type  # untrusted: checked before use
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise PluginError(
                f"{where} registered {_describe_sharder(sharder)} whose module_type "
                f"{module_type!r} is not an nn.Module subclass"
            )
        names: list[str] = []
        for device_type in DEVICE_TYPES:
            offered: list[object] = list(sharder.sharding_types(device_type))
            for name in offered:
                if not isinstance(name, str) or not name:
                    raise PluginError(
                        f"{where}: {_describe_sharder(sharder)}.sharding_types({device_type!r}) "
                        f"returned {name!r}, not a non-empty str"
                    )
                if name not in names:
                    names.append(name)
        for name in names:
            owner = self._owners.get((module_type, name))
            if owner is not None:
                existing = self._index.sharder_for(module_type, name, "cpu") or (
                    self._index.sharder_for(module_type, name, "cuda")
                )
                raise PluginError(
                    f"{where} registered sharding type {name!r} for {module_type.__name__}, "
                    f"which {owner.describe()} already registered "
                    f"({_describe_sharder(existing)})"
                )
        for name in names:
            self._owners[(module_type, name)] = info
        self._index._add(sharder)
        info.sharders.append(sharder)

    def _check_and_add_storage(self, info: PluginInfo, backend: object) -> None:
        where = info.describe()
        if not isinstance(backend, StorageBackend):
            raise PluginError(
                f"{where} registered {_describe_sharder(backend)}, which is not a StorageBackend "
                "(needs name, group_key, unsupported_reason and build_group)"
            )
        name: object = backend.name  # untrusted: checked before use
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"{where} registered storage backend {_describe_sharder(backend)} whose name "
                f"{name!r} is not a non-empty str"
            )
        if name in self._storage:
            other, owner = self._storage[name]
            raise PluginError(
                f"{where} registered storage backend {name!r}, which {owner.describe()} already "
                f"registered ({_describe_sharder(other)})"
            )
        self._storage[name] = (backend, info)
        info.storage_backends.append(backend)

    def _add_plugin(self, info: PluginInfo, plugin: object, *, builtin: bool = False) -> None:
        (self._builtins if builtin else self._plugins).append(info)
        hooks = self.pm.hook
        for impl in hooks.shardrec_register_sharders.get_hookimpls():
            if impl.plugin is plugin:

                def add_sharder(sharder: ModuleSharder) -> None:
                    self._check_and_add(info, sharder)

                self._call_hook(info, "shardrec_register_sharders", impl.function, add_sharder)
        for impl in hooks.shardrec_register_storage_backends.get_hookimpls():
            if impl.plugin is plugin:

                def add_storage(backend: StorageBackend) -> None:
                    self._check_and_add_storage(info, backend)

                self._call_hook(
                    info, "shardrec_register_storage_backends", impl.function, add_storage
                )


SharderRegistry = PluginRegistry
"""The name this registry had when it only held sharders (same class)."""


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=PROJECT_NAME)
    # Sorted so that every rank loads plugins, and so sees duplicates, in the same order.
    return sorted(eps, key=lambda ep: (ep.name, ep.value))


def load_plugins(
    *,
    entry_points: bool = True,
    plugins: Sequence[object] = (),
    env: Mapping[str, str] | None = None,
) -> PluginRegistry:
    """Build a fresh plugin manager, load plugins, collect their sharders and storage backends.

    ``plugins`` are extra in-process plugin objects (modules or instances with ``@hookimpl``
    functions), registered before the entry points; tests use them. ``entry_points=False`` skips
    discovery. ``env`` defaults to ``os.environ`` (for the two filter variables). An entry point
    the filters leave out is never imported.
    """
    environ = os.environ if env is None else env
    enabled = _names(environ, ENABLE_ENV)
    disabled = _names(environ, DISABLE_ENV)

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = PluginRegistry(pm)

    builtin = importlib.import_module(BUILTIN_STORAGE_MODULE)
    info = PluginInfo(BUILTIN_STORAGE_MODULE, "shardrec", _version("shardrec"), None)
    _register(pm, info, builtin)
    registry._add_plugin(info, builtin, builtin=True)

    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__qualname__}#{i}"
        info = PluginInfo(name, None, None, None)
        _register(pm, info, plugin)
        registry._add_plugin(info, plugin)

    if entry_points:
        _load_entry_points(pm, registry, _entry_points(), enabled, disabled)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # pragma: no cover - _check_hooks sees these first
        raise PluginError(" ".join(str(exc).split())) from None
    return registry


load_sharder_registry = load_plugins
"""The name :func:`load_plugins` had when plugins only offered sharders (same function)."""


@functools.cache
def _builtin_registry() -> PluginRegistry:
    return load_plugins(entry_points=False)


@functools.lru_cache(maxsize=4)
def _discovered_registry(enabled: str, disabled: str, path: tuple[str, ...]) -> PluginRegistry:
    return load_plugins(env={ENABLE_ENV: enabled, DISABLE_ENV: disabled})


def find_storage_backend(name: str, *, table: str) -> StorageBackend:
    """The storage backend called ``name``, for a lookup that builds ``table``.

    A built-in backend comes from a manager of the built-in plugin alone (a broken third-party
    plugin cannot stop the default tables); another name loads the entry points (the filters of
    :func:`load_plugins` apply) once per interpreter, ``sys.path`` and filters, and once more
    before :class:`UnknownStorageBackendError` is raised, in case a plugin was installed since.
    """
    builtin = _builtin_registry().storage_backends().get(name)
    if builtin is not None:
        return builtin
    key = (os.environ.get(ENABLE_ENV, ""), os.environ.get(DISABLE_ENV, ""), tuple(sys.path))
    found = _discovered_registry(*key).storage_backends().get(name)
    if found is not None:
        return found
    _discovered_registry.cache_clear()
    return _discovered_registry(*key).storage_backend(name, table=table)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _spec_args() -> dict[str, list[str]]:
    """Each hook of :mod:`hookspecs` and the arguments shardrec passes it."""
    return {
        name: list(inspect.signature(getattr(hookspecs, name)).parameters)
        for name in hookspecs.__all__
        if name.startswith(f"{PROJECT_NAME}_")
    }


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_hooks(pm: pluggy.PluginManager, info: PluginInfo, plugin: object) -> None:
    """Refuse a misspelled hook, an unmarked function named like a hook, or a hook argument that
    shardrec does not pass, naming the plugin, the hook and the nearest valid name."""
    specs = _spec_args()
    where = info.describe()
    for attr in dir(plugin):
        if not attr.startswith(f"{PROJECT_NAME}_"):
            continue
        try:
            function = getattr(plugin, attr)
        except Exception:  # a property that raises is not a hook
            continue
        marked = pm.parse_hookimpl_opts(plugin, attr) is not None
        if not marked:
            if callable(function) and difflib.get_close_matches(attr, specs, n=1, cutoff=0.8):
                raise PluginError(
                    f"{where}: {attr!r} looks like a shardrec hook but is not marked with "
                    f"@hookimpl{_suggest(attr, specs)}"
                )
            continue
        if attr not in specs:
            raise PluginError(
                f"{where}: hook {attr!r} is not a shardrec hook{_suggest(attr, specs)}"
            )
        args = [
            name
            for name, p in inspect.signature(function).parameters.items()
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        for arg in args:
            if arg not in specs[attr]:
                raise PluginError(
                    f"{where}: hook {attr!r} takes an argument {arg!r} that shardrec does not "
                    f"pass{_suggest(arg, specs[attr])}; it passes: {', '.join(specs[attr])}"
                )


def _register(pm: pluggy.PluginManager, info: PluginInfo, plugin: object) -> None:
    _check_hooks(pm, info, plugin)
    try:
        pm.register(plugin, name=info.name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{info.describe()}: {' '.join(str(exc).split())}") from None
    except ValueError as exc:  # a name or object already registered
        raise PluginError(f"{info.describe()} could not be registered: {exc}") from None


def _load_entry_points(
    pm: pluggy.PluginManager,
    registry: PluginRegistry,
    eps: Iterable[importlib.metadata.EntryPoint],
    enabled: frozenset[str],
    disabled: frozenset[str],
) -> None:
    """Import each entry point that passes the filters, from its own distribution (the
    ``EntryPoint`` object itself is loaded, never looked up again by name), and register it."""
    selected: list[tuple[importlib.metadata.EntryPoint, PluginInfo]] = []
    seen: dict[str, PluginInfo] = {}
    for ep in eps:
        dist = ep.dist
        dist_name = dist.name if dist is not None else None
        version = dist.version if dist is not None else None
        tags = {ep.name} | ({dist_name} if dist_name else set())
        info = PluginInfo(ep.name, dist_name, version, f"{ep.name} = {ep.value}")
        if enabled and not tags & enabled:
            registry._skipped.append((info, f"not listed in {ENABLE_ENV}"))
            continue
        if tags & disabled:
            registry._skipped.append((info, f"disabled by {DISABLE_ENV}"))
            continue
        if ep.name in seen:  # refused before anything is imported
            raise PluginError(
                f"{info.describe()} has the same name as {seen[ep.name].describe()}; "
                "entry-point names in the 'shardrec' group must be unique (disable one by its "
                f"distribution name in {DISABLE_ENV})"
            )
        seen[ep.name] = info
        selected.append((ep, info))
    for ep, info in selected:
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"{info.describe()} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        _register(pm, info, plugin)
        registry._add_plugin(info, plugin)
