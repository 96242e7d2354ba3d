"""``dlrm plan``: how the model's tables would be sharded on N ranks, without the hardware."""

from __future__ import annotations

from typing import Any

import click

from shardrec_dlrm.cli_options import config_option
from shardrec_dlrm.cli_train import model_config_from, model_options
from shardrec_dlrm.config import OPTIMIZERS, SHARDINGS

GIB = 1 << 30


@click.command()
@config_option
@click.option("--world-size", type=click.IntRange(min=1), required=True, help="Ranks to plan for.")
@click.option(
    "--local-world-size",
    type=click.IntRange(min=1),
    default=None,
    help="Ranks per host [default: all on one host].",
)
@click.option(
    "--compute-device", type=click.Choice(["cpu", "cuda"]), default="cuda", show_default=True
)
@click.option(
    "--hbm-gib",
    type=click.FloatRange(min=0),
    default=None,
    help="Accelerator memory per rank, GiB [default: the planner's].",
)
@click.option(
    "--ddr-gib",
    type=click.FloatRange(min=0),
    default=None,
    help="Host memory per rank, GiB [default: the planner's].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Samples per step per rank.",
)
@click.option("--sharding", type=click.Choice(SHARDINGS), default="auto", show_default=True)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default="sgd",
    show_default=True,
    help="Fused optimizer whose state the tables carry.",
)
@model_options
def plan(**params: Any) -> None:  # fmt: skip
    """Print the sharding plan and the memory and time per rank for a run on --world-size ranks.

    The model is built on the meta device, so no memory is taken: plan a 1024-rank job on a laptop.

    \b
    Examples:
      dlrm plan --world-size 8
      dlrm plan --world-size 64 --embedding-dim 128 --num-embeddings 40000000 \\
        --optimizer rowwise_adagrad --hbm-gib 80
    """
    import torch

    from shardrec_dlrm.errors import UserError
    from shardrec_dlrm.model.build import build_dlrm
    from shardrec_dlrm.planning import PlanRequest, discover_sharders, plan_model

    model_config = model_config_from(params)
    meta = torch.device("meta")
    model = build_dlrm(model_config, embedding_device=meta, dense_device=meta)
    hbm, ddr = params["hbm_gib"], params["ddr_gib"]
    request = PlanRequest(
        world_size=params["world_size"],
        local_world_size=params["local_world_size"],
        compute_device=params["compute_device"],
        batch_size=params["batch_size"],
        sharding=params["sharding"],
        optimizer=params["optimizer"],
        hbm_cap=int(hbm * GIB) if hbm is not None else None,
        ddr_cap=int(ddr * GIB) if ddr is not None else None,
    )
    try:
        _, report = plan_model(model, request, discover_sharders())
    except UserError as error:
        raise click.ClickException(str(error)) from error
    click.echo(report)
