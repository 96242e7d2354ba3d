"""``dlrm synth --multi-hot``: planted one-hot rows made multi-hot the MLPerf way.

::

    DST/
      onehot/        # dlrm synth's train.txt, synth.json, planted_model.npz
      onehot_pre/    # the same rows preprocessed
      multihot/      # dlrm multihot's output, and a copy of synth.json: train on this

The label of a row depends only on its one-hot ids, and each multi-hot bag is a function of the
one-hot row (its first id is that row), so the Bayes-optimal AUC that ``synth.json`` records for
the one-hot rows is still the best any model can reach on the multi-hot rows: the trainer prints
it beside the AUC it got, as for one-hot synthetic data. The splits are the same rows (one part,
the Kaggle rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from .multihot import materialize
from .outdir import claim_output, refuse_non_empty
from .preprocess import preprocess
from .synth import SynthInfo, synth, write_synth_info

ONEHOT_DIR: Final = "onehot"
PREPROCESSED_DIR: Final = "onehot_pre"
MULTIHOT_DIR: Final = "multihot"


def synth_multihot(
    dst: str | os.PathLike[str],
    *,
    rows: int,
    multi_hot: str | Sequence[int],
    num_embeddings_per_feature: str | Sequence[int],
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> SynthInfo:
    """Write planted multi-hot data under ``dst`` (see the module docstring); train on
    ``dst/multihot`` with the same table sizes."""
    root = Path(dst)
    with claim_output(root) as out:
        if out.entries and not force:
            refuse_non_empty(out, "synth")
        info = synth(root / ONEHOT_DIR, rows=rows, seed=seed, force=force, log=log)
        preprocess(root / ONEHOT_DIR, root / PREPROCESSED_DIR, progress=False, force=force)
        materialize(
            root / PREPROCESSED_DIR,
            root / MULTIHOT_DIR,
            multi_hot=multi_hot,
            num_embeddings_per_feature=num_embeddings_per_feature,
            force=force,
            log=log,
        )
        write_synth_info(root / MULTIHOT_DIR, info)
    return info
