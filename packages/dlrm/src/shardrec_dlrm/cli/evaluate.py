"""``dlrm evaluate``: the metrics of a checkpoint on a split of some data."""

from __future__ import annotations

from typing import Any

import click

from shardrec_dlrm.cli.options import config_option, data_options, device_option


@click.command()
@config_option
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A --checkpoint-dir of `dlrm train` (its newest checkpoint), or one step-N in it.",
)
@click.option(
    "--data", required=True, type=click.Path(exists=True), help="Criteo data, as for `dlrm train`."
)
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Samples per step per rank.",
)
@click.option("--limit-batches", type=click.IntRange(min=1), default=None)
@data_options
@device_option
def evaluate(**params: Any) -> None:  # fmt: skip
    """Score a saved model: AUC, log loss, normalized entropy, accuracy and calibration.

    Runs at any world size (alone, or under torchrun), whatever the world size it was trained at.

    \b
    Examples:
      dlrm evaluate --checkpoint ckpt/ --data criteo_pre/
      torchrun --nproc-per-node 2 --no-python dlrm evaluate --checkpoint ckpt/ --data criteo_pre/
    """
    from shardrec_dlrm.errors import UserError
    from shardrec_dlrm.training.evaluate import EvaluateConfig
    from shardrec_dlrm.training.evaluate import evaluate as run

    try:
        result = run(EvaluateConfig(**params))
    except UserError as error:
        raise click.ClickException(str(error)) from error
    if result.rank == 0:
        step, metrics = result.step, result.metrics
        values = "  ".join(f"{name}={value:.5f}" for name, value in metrics.items())
        click.echo(f"{params['split']} after step {step}: {values}")
