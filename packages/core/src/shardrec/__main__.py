"""``python -m shardrec plugins``: list the plugins that load, and the sharders and storage backends
each registered."""

from __future__ import annotations

import sys


def _plugins() -> int:
    from shardrec.distributed.plugins import PluginError, load_sharder_registry

    try:
        registry = load_sharder_registry()
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    plugins = registry.plugins()
    for info, reason in registry.skipped():
        origin = f"{info.distribution} {info.version}" if info.distribution else "unknown"
        print(f"skipped {info.name}  ({origin}; entry point: {info.entry_point}): {reason}")
    builtin = [b.name for info in registry.builtin_plugins() for b in info.storage_backends]
    if not plugins:
        print("no shardrec plugins loaded (install shardrec-sharders for the built-in sharders)")
        print(f"built-in storage backends: {', '.join(builtin)}")
        return 0
    for info in plugins:
        origin = f"{info.distribution} {info.version}" if info.distribution else "in-process"
        print(f"{info.name}  ({origin}; entry point: {info.entry_point})")
        for sharder in info.sharders:
            types = ", ".join(sharder.sharding_types("cpu"))
            kernels = sorted(
                {
                    k
                    for t in sharder.sharding_types("cpu")
                    for k in sharder.compute_kernels(t, "cpu")
                }
            )
            print(
                f"    {sharder.module_type.__name__:<24} {types:<16} kernels: {', '.join(kernels)}"
                f"  [{type(sharder).__module__}.{type(sharder).__qualname__}]"
            )
        for backend in info.storage_backends:
            print(
                f"    storage backend          {backend.name:<16}"
                f"  [{type(backend).__module__}.{type(backend).__qualname__}]"
            )
    print(f"built-in storage backends: {', '.join(builtin)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["plugins"]:
        return _plugins()
    print("usage: python -m shardrec plugins", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
