"""The plugin manager: finds sharder plugins through entry points and checks what they register.

Build one with :func:`load_sharder_registry` (there is no global manager, and nothing is loaded at
import time). Plugins come from the ``shardrec`` entry-point group, filtered by two environment
variables, each a comma-separated list of entry-point names or distribution names:

- ``SHARDREC_PLUGINS``: if set and not empty, load only these.
- ``SHARDREC_DISABLE_PLUGINS``: never load these.

Every fault of a plugin is a :class:`PluginError` that names its entry point and distribution.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import pluggy
from torch import nn

from shardrec.distributed import hookspecs
from shardrec.distributed.hookspecs import PROJECT_NAME
from shardrec.distributed.types import ModuleSharder

__all__ = [
    "DISABLE_ENV",
    "ENABLE_ENV",
    "PluginError",
    "PluginInfo",
    "SharderRegistry",
    "load_sharder_registry",
]

ENABLE_ENV: Final[str] = "SHARDREC_PLUGINS"
DISABLE_ENV: Final[str] = "SHARDREC_DISABLE_PLUGINS"
_DEVICE_TYPES: Final[tuple[str, ...]] = ("cpu", "cuda")


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


class SharderRegistry:
    """A typed facade over one pluggy manager: the loaded plugins and their sharders."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._plugins: list[PluginInfo] = []
        self._skipped: list[tuple[PluginInfo, str]] = []
        # (module type, sharding type) -> (sharder, plugin that registered it)
        self._owners: dict[tuple[type[nn.Module], str], tuple[ModuleSharder, PluginInfo]] = {}

    # -- queries -------------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        return list(self._plugins)

    def skipped(self) -> list[tuple[PluginInfo, str]]:
        """Entry points the filters left out (never imported), each with the reason."""
        return list(self._skipped)

    def sharders(self) -> list[ModuleSharder]:
        """Every registered sharder, in registration order."""
        return [s for p in self._plugins for s in p.sharders]

    # -- loading -------------------------------------------------------------------------------
    def _register_from(self, info: PluginInfo, hook_function: object) -> None:
        def register(sharder: ModuleSharder) -> None:
            self._check_and_add(info, sharder)

        if not callable(hook_function):  # pragma: no cover - pluggy guarantees callables
            raise PluginError(f"{info.describe()}: shardrec_register_sharders is not callable")
        try:
            hook_function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{info.describe()}: shardrec_register_sharders raised {type(exc).__name__}: {exc}"
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
        for device_type in _DEVICE_TYPES:
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
                raise PluginError(
                    f"{where} registered sharding type {name!r} for {module_type.__name__}, "
                    f"which {owner[1].describe()} already registered "
                    f"({_describe_sharder(owner[0])})"
                )
        for name in names:
            self._owners[(module_type, name)] = (sharder, info)
        info.sharders.append(sharder)

    def _add_plugin(self, info: PluginInfo, plugin: object) -> None:
        self._plugins.append(info)
        for impl in self.pm.hook.shardrec_register_sharders.get_hookimpls():
            if impl.plugin is plugin:
                self._register_from(info, impl.function)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=PROJECT_NAME)
    # Sorted so that every rank loads plugins, and so sees duplicates, in the same order.
    return sorted(eps, key=lambda ep: (ep.name, ep.value))


def load_sharder_registry(
    *,
    entry_points: bool = True,
    plugins: Sequence[object] = (),
    env: Mapping[str, str] | None = None,
) -> SharderRegistry:
    """Build a fresh plugin manager, load plugins, collect their sharders.

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
    registry = SharderRegistry(pm)

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
    registry: SharderRegistry,
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
