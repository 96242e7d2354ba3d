"""Shared pieces of the ``dlrm`` command line: parameter types, ``--config run.toml``, option
sets."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from shardrec_dlrm.cli.presets import PRESET_KEYS, from_preset
from shardrec_dlrm.data.schema import NUM_SPARSE
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.model.config import INTERACTION_TYPES, MANAGED_IDS, ModelConfig
from shardrec_dlrm.training.config import DATA_FORMATS, DEVICES

F = TypeVar("F", bound=Callable[..., Any])


class IntList(click.ParamType[tuple[int, ...]]):
    """Comma-separated positive integers (``512,256,64``); a TOML array of integers works too."""

    name = "INTS"

    def __init__(self, length: int | None = None) -> None:
        self.length = length

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            items: Sequence[Any] = value
        elif isinstance(value, list):
            items = value
        elif isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        else:
            self.fail(f"expected comma-separated integers, got {value!r}", param, ctx)
        numbers: list[int] = []
        for item in items:
            try:
                number = int(item)
            except (TypeError, ValueError):
                self.fail(f"{item!r} is not an integer (in {value!r})", param, ctx)
            if number <= 0:
                self.fail(f"{number} is not positive (in {value!r})", param, ctx)
            numbers.append(number)
        if not numbers:
            self.fail("expected at least one integer", param, ctx)
        if self.length is not None and len(numbers) != self.length:
            self.fail(f"expected {self.length} integers, got {len(numbers)}", param, ctx)
        return tuple(numbers)


class Number(click.ParamType[float]):
    """A finite float in a range: click's FloatRange lets ``nan`` and ``inf`` through."""

    name = "FLOAT"

    def __init__(
        self,
        *,
        above: float | None = None,
        at_least: float | None = None,
        below: float | None = None,
    ) -> None:
        self.above, self.at_least, self.below = above, at_least, below

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.above is not None and not number > self.above:
            self.fail(f"{number} is not above {self.above}", param, ctx)
        if self.at_least is not None and not number >= self.at_least:
            self.fail(f"{number} is below {self.at_least}", param, ctx)
        if self.below is not None and not number < self.below:
            self.fail(f"{number} is not below {self.below}", param, ctx)
        return number


class WritableDir(click.ParamType[str]):
    """A directory ``dlrm`` may write into: one that exists and is writable, or one it can create
    (the nearest existing ancestor is a writable directory). Checked before any process starts,
    so that a typo costs one line, not a run that fails at its first save."""

    name = "DIRECTORY"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        path = os.path.abspath(os.fspath(value))
        probe = path
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            what = "is" if probe == path else f"lies under {probe}, which is"
            self.fail(f"{value} {what} not a directory", param, ctx)
        if not os.access(probe, os.W_OK | os.X_OK):
            what = "" if probe == path else f" ({probe}, where it would be created)"
            self.fail(f"{value} is not writable{what}", param, ctx)
        return str(value)


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Reads ``--config`` into the command's defaults: the command line and ``DLRM_*`` still win."""
    if value is None:
        return None
    from shardrec_dlrm.data.files import read_small_text

    path = Path(value)
    try:
        table = tomllib.loads(read_small_text(path))
    except UserError as error:
        raise click.BadParameter(str(error), ctx, param) from error
    except tomllib.TOMLDecodeError as error:
        raise click.BadParameter(f"{path}: {error}", ctx, param) from error
    # A [train] (or [evaluate]...) table applies to that command; top-level keys apply to all.
    section = table.get(ctx.info_name or "", {})
    flat = {key: item for key, item in table.items() if not isinstance(item, dict)}
    if isinstance(section, dict):
        flat.update(section)
    known = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    defaults: dict[str, Any] = {}
    for key, item in flat.items():
        name = key.replace("-", "_")
        if name not in known:
            raise click.BadParameter(
                f"{path}: unknown setting {key!r} for 'dlrm {ctx.info_name}'", ctx, param
            )
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    # a --preset read before this file no longer supplies what the file sets
    if PRESET_KEYS in ctx.meta:
        ctx.meta[PRESET_KEYS] = ctx.meta[PRESET_KEYS] - defaults.keys()
    return value


def config_option(function: F) -> F:
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config_file,
        help="TOML file of option values (keys as the options, dashes or underscores); "
        "command-line options and DLRM_* variables override it.",
    )(function)


def apply(function: F, options: Sequence[Callable[[F], F]]) -> F:
    for option in reversed(options):
        function = option(function)
    return function


def data_options(function: F) -> F:
    """How ``--data`` is read and split (shared by ``train`` and ``evaluate``: the same values
    give the same validation and test rows)."""
    return apply(
        function,
        [
            click.option(
                "--data-format",
                "--format",
                "data_format",
                type=click.Choice(DATA_FORMATS),
                default="auto",
                show_default=True,
                help="Force the input format instead of detecting it.",
            ),
            click.option(
                "--val-fraction",
                type=Number(at_least=0, below=1),
                default=0.05,
                show_default=True,
                help="Validation rows, in [0, 1), for inputs other than Kaggle's train.txt and the"
                " 1TB days.",
            ),
            click.option(
                "--test-fraction",
                type=Number(at_least=0, below=1),
                default=0.05,
                show_default=True,
                help="Test rows, likewise (the last rows; validation just before them).",
            ),
        ],
    )


def device_option(function: F) -> F:
    return click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="auto: CUDA (NCCL) when available, else CPU (gloo).",
    )(function)


#: The dense arch's hidden layers when --dense-arch-layer-sizes is not given (then + embedding dim).
DEFAULT_DENSE_HIDDEN = (512, 256)

_MODEL_FIELDS = (
    "embedding_dim",
    "num_embeddings",
    "num_embeddings_per_feature",
    "dense_arch_layer_sizes",
    "over_arch_layer_sizes",
    "interaction_type",
    "dcn_num_layers",
    "dcn_low_rank_dim",
    "managed_ids",
    "managed_buckets",
)


def model_options(function: F) -> F:
    """The options that shape the model (shared by ``train`` and ``plan``)."""
    defaults = ModelConfig()
    options = [
        click.option(
            "--embedding-dim",
            type=click.IntRange(min=1),
            default=defaults.embedding_dim,
            show_default=True,
            help="Dimension of every embedding table (and of the dense arch's output).",
        ),
        click.option(
            "--num-embeddings",
            type=click.IntRange(min=1),
            default=defaults.num_embeddings,
            show_default=True,
            help="Rows of every table (ids are hashed into it).",
        ),
        click.option(
            "--num-embeddings-per-feature",
            type=IntList(NUM_SPARSE),
            default=None,
            help=f"Rows per table, {NUM_SPARSE} comma-separated numbers (C1..C26); "
            "overrides --num-embeddings.",
        ),
        click.option(
            "--dense-arch-layer-sizes",
            type=IntList(),
            default=None,
            help="Bottom MLP; the last size must equal --embedding-dim "
            f"[default: {','.join(map(str, DEFAULT_DENSE_HIDDEN))},EMBEDDING_DIM].",
        ),
        click.option(
            "--over-arch-layer-sizes",
            type=IntList(),
            default=",".join(map(str, defaults.over_arch_layer_sizes)),
            show_default=True,
            help="Top MLP; the last size must be 1.",
        ),
        click.option(
            "--interaction-type",
            type=click.Choice(INTERACTION_TYPES),
            default=defaults.interaction_type,
            show_default=True,
            help="dot: DLRM's pairwise dot products; dcn: DCNv2's low-rank cross network.",
        ),
        click.option(
            "--dcn-num-layers",
            type=click.IntRange(min=1),
            default=defaults.dcn_num_layers,
            show_default=True,
            help="Cross layers (dcn only).",
        ),
        click.option(
            "--dcn-low-rank-dim",
            type=click.IntRange(min=1),
            default=defaults.dcn_low_rank_dim,
            show_default=True,
            help="Rank of each cross layer's weight (dcn only).",
        ),
        click.option(
            "--managed-ids",
            type=click.Choice(MANAGED_IDS),
            default=defaults.managed_ids,
            show_default=True,
            help="lru/lfu: the raw 32-bit ids get rows of their own in managed tables (no modulo),"
            " the least recently/frequently read row giving way when a table is full; off: ids"
            " are hashed to rows (1 + id % (rows - 1)).",
        ),
        click.option(
            "--managed-buckets",
            type=click.IntRange(min=1),
            default=defaults.managed_buckets,
            show_default=True,
            help="Buckets per managed table (with --managed-ids): a sharded model spreads them"
            " over the ranks, 1 keeping each table's map on one rank. Part of the model: a"
            " resume keeps it, at any number of processes.",
        ),
    ]
    return apply(function, options)


def model_config_from(params: dict[str, Any]) -> ModelConfig:
    """Takes the :func:`model_options` values out of a command's ``params`` as a ModelConfig."""
    values = {name: params.pop(name) for name in _MODEL_FIELDS}
    ctx = click.get_current_context(silent=True)
    # --num-embeddings given with --preset: the preset's per-table sizes would otherwise override it
    if (
        ctx is not None
        and from_preset(ctx, "num_embeddings_per_feature")
        and ctx.get_parameter_source("num_embeddings") is not ParameterSource.DEFAULT
    ):
        values["num_embeddings_per_feature"] = None
    if values["dense_arch_layer_sizes"] is None:
        values["dense_arch_layer_sizes"] = (*DEFAULT_DENSE_HIDDEN, values["embedding_dim"])
    try:
        return ModelConfig(**values)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
