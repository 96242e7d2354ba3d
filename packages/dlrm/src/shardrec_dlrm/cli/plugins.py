"""``dlrm plugins``: what shardrec discovered through the ``shardrec`` entry-point group."""

from __future__ import annotations

import click


@click.command()
def plugins() -> None:
    """List the sharder plugins shardrec loads: distribution, version and the sharders each one
    registered (module type and sharding types on CPU and CUDA).

    \b
    SHARDREC_PLUGINS / SHARDREC_DISABLE_PLUGINS restrict what loads (see docs/plugins.md).
    """
    from shardrec.distributed.plugins import PluginError, load_sharder_registry

    try:
        registry = load_sharder_registry()
    except PluginError as error:
        raise click.ClickException(str(error)) from error
    loaded = registry.plugins()
    if not loaded:
        click.echo("no sharder plugins loaded (is shardrec-sharders installed?)")
        return
    for info in loaded:
        version = f" {info.version}" if info.version else ""
        origin = f"{info.distribution}{version}" if info.distribution else "in-process"
        click.echo(f"{info.name}  ({origin})")
        for sharder in info.sharders:
            cls = type(sharder)
            per_device = "; ".join(
                f"{device}: {', '.join(sharder.sharding_types(device)) or '-'}"
                for device in ("cpu", "cuda")
            )
            click.echo(
                f"  {cls.__module__}.{cls.__qualname__} shards "
                f"{sharder.module_type.__name__} ({per_device})"
            )
