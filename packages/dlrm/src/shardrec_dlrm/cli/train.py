"""``dlrm train``: the command line of the trainer. Parsing only; the work is in
:mod:`shardrec_dlrm.training.loop`."""

from __future__ import annotations

import os
from typing import Any

import click

from shardrec_dlrm.cli.options import (
    Number,
    WritableDir,
    config_option,
    data_options,
    device_option,
    model_config_from,
    model_options,
)
from shardrec_dlrm.cli.presets import preset_option
from shardrec_dlrm.model.config import DENSE_PRECISIONS
from shardrec_dlrm.training.config import COMM_PRECISIONS, OPTIMIZERS, SHARDINGS, TrainConfig


@click.command()
@config_option
@preset_option
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    help="Criteo data: raw TSV/CSV (file or directory) or a `dlrm preprocess` output directory.",
)
@data_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Samples per step per rank.",
)
@click.option(
    "--eval-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per validation/test step per rank [default: --batch-size].",
)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--limit-train-batches",
    type=click.IntRange(min=1),
    default=None,
    help="Stop each epoch after this many steps.",
)
@click.option("--limit-val-batches", type=click.IntRange(min=1), default=None)
@click.option("--limit-test-batches", type=click.IntRange(min=1), default=None)
@click.option(
    "--validation-freq",
    type=click.IntRange(min=1),
    default=None,
    help="Validate every N steps (and always at the end).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Initial weights and the order of the training samples.",
)
@model_options
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default="sgd",
    show_default=True,
    help="For the embedding tables (fused) and the dense layers alike.",
)
@click.option(
    "--learning-rate",
    type=Number(above=0),
    default=1.0,
    show_default=True,
    help="Base learning rate (> 0), of the tables and the dense layers.",
)
@click.option(
    "--eps",
    type=Number(above=0),
    default=1e-8,
    show_default=True,
    help="Adagrad/Adam epsilon (> 0).",
)
@click.option("--lr-warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--lr-decay-start", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--lr-decay-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Polynomial (power 2) decay length; 0: no decay.",
)
@click.option(
    "--sharding",
    type=click.Choice(SHARDINGS),
    default="auto",
    show_default=True,
    help="auto: the planner chooses per table; otherwise force one sharding type.",
)
@device_option
@click.option(
    "--dense-precision",
    type=click.Choice(DENSE_PRECISIONS),
    default="fp32",
    show_default=True,
    help="bf16: run the dense arch, interaction and over arch under bf16 autocast (weights,"
    " embeddings, loss and the dot interaction's products stay fp32); faster on CPUs with AMX or"
    " AVX512-BF16 and on GPUs.",
)
@click.option(
    "--comm-precision",
    type=click.Choice(COMM_PRECISIONS),
    default="fp32",
    show_default=True,
    help="Send the pooled embeddings between ranks, and their gradients back, in this dtype:"
    " fp16 or bf16 halve those bytes (sums stay fp32; see docs/benchmarks.md for the accuracy).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Launch this many local processes (torch's elastic launcher, as torchrun).",
)
@click.option(
    "--logdir",
    type=WritableDir(),
    default=None,
    help="Write TensorBoard event files here.",
)
@click.option(
    "--checkpoint-dir",
    type=WritableDir(),
    default=None,
    help="Write checkpoints here (at the end, and every --checkpoint-every steps). A directory"
    " holds one run: one that holds another is refused unless --resume or --overwrite.",
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None)
@click.option(
    "--keep-checkpoints",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Keep this many newest checkpoints (and the newest intact one); older ones are deleted"
    " after each save.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --checkpoint-dir from its newest intact checkpoint (refused if an"
    " option would change what it trains).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Delete the run that --checkpoint-dir holds and start a new one there.",
)
@click.option("--quiet", is_flag=True, help="No progress bar; only the final metrics.")
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Read the training loss every N steps (one host synchronisation; the losses in between"
    " wait on the device) and log each step's loss then; a NaN loss stops the run at that read."
    " Validation and checkpoints read it too. Training is the same for any N.",
)
@click.option(
    "--pipeline/--no-pipeline",
    default=True,
    show_default=True,
    help="Distribute the next batch's ids while this batch trains (the same weights either way).",
)
@click.option(
    "--shuffle/--no-shuffle",
    default=True,
    show_default=True,
    help="Train on the global batches in a random order per epoch, or in file order (a stream whose"
    " ids drift, as 'dlrm synth --drift' writes, is trained in the order it happened).",
)
def train(**params: Any) -> None:
    """Train DLRM or DCNv2 on Criteo data and report validation and test metrics.

    \b
    Examples:
      dlrm train --data criteo_kaggle/ --epochs 1 --logdir runs/kaggle
      dlrm train --data synth/ --nproc 2 --interaction-type dcn
      torchrun --nproc-per-node 8 --no-python dlrm train --data /criteo_1tb/
    """
    nproc: int = params.pop("nproc")
    model = model_config_from(params)
    try:
        config = TrainConfig(model=model, **params)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    if nproc > 1 and "LOCAL_RANK" in os.environ:
        raise click.UsageError("--nproc launches processes itself: do not combine it with torchrun")
    from shardrec_dlrm.training.launch import run_training

    run_training(config, nproc=nproc)
