"""The ``dlrm`` command line. Each command group lives in its own module and is attached here."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardrec-dlrm")
def main() -> None:
    """Train DLRM and DCNv2 recommendation models on Criteo data with shardrec."""
