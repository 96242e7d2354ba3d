"""Named sets of option values (``--preset``): a published recipe in one flag.

A preset fills the defaults of the command's options; every option given on the command line, in
``DLRM_*`` variables or in ``--config`` still wins (click's order: command line, environment,
defaults map; ``--config`` is merged over the preset whichever comes first). ``--num-embeddings``
given any of those ways replaces the preset's per-table sizes, as if they had never been set.

``mlperf-dcnv2``, MLPerf Training's DLRMv2 (mlcommons/training ``recommendation_v2``; rules in
mlcommons/training_policies): DCNv2 with embedding dimension 128, the 26 tables of the Criteo 1TB
cardinalities capped at 40,000,000 rows, dense arch 512-256-128, a low-rank cross net of 3 layers
of rank 512, over arch 1024-1024-512-256-1; exact Adagrad (fused for the tables) with eps 1e-8 and a
constant learning rate of 0.004, which the convergence reference runs used at global batches of
32,768 to 102,400; one epoch, validated 20 times per epoch. ``--batch-size`` is per rank: 8,192
gives the global 65,536 on 8 ranks (pass ``--batch-size`` for another world size; the validation
interval of 3,200 steps is 1/20 epoch at that global batch). The data is multi-hot
(``dlrm multihot``): its ids per sample, 3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1
summed per table, come with the data files; ``dlrm plan`` takes them as its pooling factors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import click
from click.core import ParameterSource

from shardrec_dlrm.data.multihot_lookup import MLPERF_MULTI_HOT, MLPERF_NUM_EMBEDDINGS

F = TypeVar("F", bound=Callable[..., Any])

#: Training samples of the 1TB logs' days 0-22 (MLPerf's epoch).
MLPERF_TRAIN_SAMPLES: Final = 4_195_197_692
MLPERF_GLOBAL_BATCH: Final = 65_536
MLPERF_EVALS_PER_EPOCH: Final = 20


@dataclass(frozen=True, slots=True)
class Preset:
    """A preset: its name, one line of what it is, and option values keyed by parameter name."""

    name: str
    summary: str
    values: Mapping[str, Any]


MLPERF_DCNV2: Final = Preset(
    name="mlperf-dcnv2",
    summary="MLPerf Training DLRMv2: DCNv2 on multi-hot Criteo 1TB, 40M-capped tables, Adagrad",
    values={
        "embedding_dim": 128,
        "num_embeddings_per_feature": MLPERF_NUM_EMBEDDINGS,
        "dense_arch_layer_sizes": (512, 256, 128),
        "over_arch_layer_sizes": (1024, 1024, 512, 256, 1),
        "interaction_type": "dcn",
        "dcn_num_layers": 3,
        "dcn_low_rank_dim": 512,
        "optimizer": "adagrad",
        "learning_rate": 0.004,
        "eps": 1e-8,
        "lr_warmup_steps": 0,
        "lr_decay_start": 0,
        "lr_decay_steps": 0,
        "batch_size": MLPERF_GLOBAL_BATCH // 8,
        "epochs": 1,
        "validation_freq": MLPERF_TRAIN_SAMPLES // (MLPERF_GLOBAL_BATCH * MLPERF_EVALS_PER_EPOCH),
        "pooling_factors": MLPERF_MULTI_HOT,
    },
)

PRESETS: Final[Mapping[str, Preset]] = {p.name: p for p in (MLPERF_DCNV2,)}
#: ``ctx.meta`` key: the parameters whose defaults the preset (not ``--config``) supplied.
PRESET_KEYS: Final = "shardrec_dlrm.preset_keys"


def preset_defaults(name: str, known: set[str]) -> dict[str, Any]:
    """The values of preset ``name`` that a command with parameters ``known`` takes."""
    return {key: value for key, value in PRESETS[name].values.items() if key in known}


def _apply_preset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    known = {p.name for p in ctx.command.params if p.name}
    values = preset_defaults(value, known)
    config = ctx.default_map or {}
    # the preset sits under whatever --config already put in the defaults map
    ctx.default_map = {**values, **config}
    ctx.meta[PRESET_KEYS] = {key for key in values if key not in config}
    return value


def from_preset(ctx: click.Context, name: str) -> bool:
    """Whether parameter ``name`` took its value from ``--preset`` (nothing else gave one)."""
    source = ctx.get_parameter_source(name)
    return source is ParameterSource.DEFAULT_MAP and name in ctx.meta.get(PRESET_KEYS, ())


def preset_option(function: F) -> F:
    """``--preset NAME``: fills the command's defaults from :data:`PRESETS`."""
    lines = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
    return click.option(
        "--preset",
        type=click.Choice(sorted(PRESETS)),
        is_eager=True,
        expose_value=False,
        callback=_apply_preset,
        help=f"Start from a published recipe ({lines}); any option given still overrides it.",
    )(function)
