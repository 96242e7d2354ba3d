"""The ``dlrm`` command line. Each command lives in its own module and is attached here."""

from __future__ import annotations

import click

from shardrec_dlrm.cli.data import multihot, preprocess, synth
from shardrec_dlrm.cli.evaluate import evaluate
from shardrec_dlrm.cli.plan import plan
from shardrec_dlrm.cli.plugins import plugins
from shardrec_dlrm.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DLRM"})
@click.version_option(package_name="shardrec-dlrm")
def main() -> None:
    """Train DLRM and DCNv2 click-through models on Criteo data, with embedding tables sharded by
    shardrec over one or many processes.

    \b
    Two commands to a trained model (synthetic data with a known best AUC):
      dlrm synth demo_data/ --rows 200000
      dlrm train --data demo_data/ --logdir runs/demo
      tensorboard --logdir runs/demo
    \b
    Criteo Kaggle or 1TB (see docs/dlrm.md):
      dlrm preprocess criteo_raw/ criteo_pre/
      dlrm train --data criteo_pre/ --epochs 1 --checkpoint-dir ckpt/
      dlrm evaluate --checkpoint ckpt/ --data criteo_pre/
    \b
    Many processes (gloo on CPU, NCCL on GPU):
      dlrm train --data criteo_pre/ --nproc 4
      torchrun --nproc-per-node 8 --no-python dlrm train --data criteo_pre/
    \b
    Before buying hardware:
      dlrm plan --world-size 64 --embedding-dim 128
    \b
    Every option can also come from --config run.toml, or from the environment as
    DLRM_<COMMAND>_<OPTION> (for example DLRM_TRAIN_BATCH_SIZE=4096).
    """


for command in (train, evaluate, plan, preprocess, multihot, synth, plugins):
    main.add_command(command)

if __name__ == "__main__":
    main()
