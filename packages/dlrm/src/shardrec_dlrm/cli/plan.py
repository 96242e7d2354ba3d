"""``dlrm plan``: how the model's tables would be sharded on N ranks, without the hardware."""

from __future__ import annotations

from typing import Any

import click

from shardrec_dlrm.cli.options import (
    IntList,
    Number,
    config_option,
    model_config_from,
    model_options,
)
from shardrec_dlrm.cli.presets import preset_option
from shardrec_dlrm.training.config import OPTIMIZERS, SHARDINGS

GIB = 1 << 30


@click.command()
@config_option
@preset_option
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
    type=Number(above=0),
    default=None,
    help="Accelerator memory per rank, GiB [default: the planner's].",
)
@click.option(
    "--ddr-gib",
    type=Number(above=0),
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
@click.option(
    "--pooling-factors",
    type=IntList(),
    default=None,
    help="Ids per sample of each table: one value for all, or one per table "
    "(MLPerf DLRMv2: 3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1) [default: 1].",
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
    """Print the sharding plan for a run on --world-size ranks: per rank its memory, the embedding
    bytes it reads per step, the bytes it sends inside its host and to other hosts, and its
    estimated step; per table its sharding and why.

    The model is built on the meta device, so no memory is taken: plan a 1024-rank job on a laptop.

    \b
    Examples:
      dlrm plan --world-size 8
      dlrm plan --world-size 64 --local-world-size 8 --embedding-dim 128 \\
        --num-embeddings 40000000 --optimizer rowwise_adagrad --hbm-gib 80 --batch-size 8192 \\
        --pooling-factors 3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1
    """
    import torch

    from shardrec_dlrm.errors import UserError
    from shardrec_dlrm.model.build import build_dlrm
    from shardrec_dlrm.training.planning import PlanRequest, discover_sharders, plan_model

    model_config = model_config_from(params)
    meta = torch.device("meta")
    # the tables carry the fused optimizer, as in training: the planner counts its state per table
    fused = {"optimizer": params["optimizer"], "learning_rate": 0.01}
    # Managed tables' id maps too: the planner sizes them from their buffers' shapes.
    model = build_dlrm(
        model_config,
        embedding_device=meta,
        dense_device=meta,
        fused_params=fused,
        managed_device=meta,
    )
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
        pooling_factors=tuple(float(p) for p in params["pooling_factors"] or ()),
    )
    try:
        _, report = plan_model(model, request, discover_sharders())
    except UserError as error:
        raise click.ClickException(str(error)) from error
    click.echo(report)
