"""``dlrm preprocess``, ``dlrm multihot`` and ``dlrm synth``: thin click commands over
:mod:`shardrec_dlrm.data`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from shardrec_dlrm.data.errors import DataError
from shardrec_dlrm.data.schema import NUM_SPARSE

#: More parsing threads than this gain nothing (see the preprocess docs) and multiply the memory
#: bound.
MAX_WORKERS = 64

_FORCE = click.option(
    "--force",
    is_flag=True,
    help="Write into DST even though it holds other files (same-named outputs are replaced).",
)


def _output_dir(dst: Path) -> None:
    """DST must be a directory this process can create and write: else a usage error (exit 2)."""
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise click.BadParameter(
            f"{dst} exists and is not a directory", param_hint="'DST'"
        ) from None
    except OSError as e:
        raise click.BadParameter(
            f"cannot create {dst}: {e.strerror or e}", param_hint="'DST'"
        ) from None
    if not os.access(dst, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{dst} is not writable", param_hint="'DST'")


@click.command()
@click.argument("src", type=click.Path(exists=True, readable=True, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--format",
    "format_",
    type=click.Choice(["auto", "tsv", "csv"]),
    default="auto",
    show_default=True,
    help="Raw input format; auto tells TSV from CSV-with-header by the first line.",
)
@click.option(
    "--bad-rows",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="On a malformed row: stop with its file and line, or skip it and count it per file.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=MAX_WORKERS),
    default=None,
    help="Parsing threads [default: every core, at most 8].",
)
@click.option(
    "--chunk-mib",
    type=click.IntRange(min=1, max=1024),
    default=1,
    show_default=True,
    help="MiB of text per chunk; memory stays within about 42 x workers x chunk.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_FORCE
def preprocess(
    src: Path,
    dst: Path,
    format_: str,
    bad_rows: str,
    workers: int | None,
    chunk_mib: int,
    quiet: bool,
    force: bool,
) -> None:
    """Convert raw Criteo (Kaggle train.txt, 1TB day_N, plain or gzip; or CSV) at SRC into the
    memory-mapped layout at DST, streaming with bounded memory on every core.

    DST must be new, empty, or the output of an earlier run on the same SRC: an interrupted run
    resumes when the same command runs again (finished files are kept, and the file that was
    being read continues from its last checkpoint, every 256 MiB of text). A second run on the
    same DST while one is running is refused.

    \b
      dlrm preprocess criteo_kaggle/train.txt criteo_pre/
      dlrm preprocess criteo_1tb/ criteo_1tb_pre/ --bad-rows skip
    """
    from shardrec_dlrm.data.preprocess import preprocess as run

    _output_dir(dst)
    try:
        report = run(
            src,
            dst,
            format=format_,  # type: ignore[arg-type]
            bad_rows=bad_rows,  # type: ignore[arg-type]
            workers=workers,
            chunk_bytes=chunk_mib << 20,
            progress=not quiet,
            force=force,
            log=click.echo,
        )
    except DataError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(
            "interrupted: finished files, and the current one up to its last checkpoint, are "
            "kept; run the same command again to resume"
        ) from None
    rate = report.rows / report.seconds if report.seconds else 0.0
    click.echo(
        f"{report.output}: {report.rows} rows in {len(report.written) + len(report.resumed)} "
        f"part(s) ({len(report.written)} written now, {len(report.resumed)} kept from an earlier "
        f"run) in {report.seconds:.1f} s" + (f", {rate:,.0f} rows/s" if report.written else "")
    )
    skipped = {name: n for name, n in report.bad_rows.items() if n}
    for name, n in skipped.items():
        click.echo(f"skipped {n} malformed row(s) in {name}")


@click.command()
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rows", type=click.IntRange(min=14), required=True, help="Rows to write.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of model and data.",
)
@click.option(
    "--multi-hot",
    default=None,
    help="Also make the rows multi-hot as MLPerf does ('mlperf' or 26 comma-separated ids per "
    "sample): DST/multihot is then the data to train on.",
)
@click.option(
    "--num-embeddings",
    type=click.IntRange(min=2),
    default=100_000,
    show_default=True,
    help="With --multi-hot: rows of every table the bags are drawn from; train with the same.",
)
@click.option(
    "--drift",
    is_flag=True,
    help="Draw a stream whose ids drift: each feature's live ids (--live) are replaced --turnover"
    " times over the rows, new ids arriving popular and cooling down (for --managed-ids).",
)
@click.option(
    "--live",
    type=click.IntRange(min=2),
    default=2048,
    show_default=True,
    help="With --drift: ids of a feature live at any time.",
)
@click.option(
    "--turnover",
    type=click.FloatRange(min=0),
    default=4.0,
    show_default=True,
    help="With --drift: how many times the live ids are replaced over the stream.",
)
@_FORCE
def synth(
    dst: Path,
    rows: int,
    seed: int,
    multi_hot: str | None,
    num_embeddings: int,
    drift: bool,
    live: int,
    turnover: float,
    force: bool,
) -> None:
    """Write synthetic Criteo-format TSV drawn from a planted click model to DST/train.txt, and
    the best AUC and log loss any model can reach on it to DST/synth.json. DST must be new or
    empty (or pass --force). With --multi-hot the rows go to DST/onehot/ and their MLPerf-style
    multi-hot form, with the same optimum, to DST/multihot/.

    \b
      dlrm synth demo_data/ --rows 200000 --seed 1
      dlrm train --data demo_data/
      dlrm synth mh_demo/ --rows 200000 --multi-hot mlperf
      dlrm train --data mh_demo/multihot --preset mlperf-dcnv2 --num-embeddings 100000
      dlrm synth drift_demo/ --rows 300000 --drift --live 2048 --turnover 4
      dlrm train --data drift_demo/ --managed-ids lru --num-embeddings 4096 --no-shuffle
    """
    from shardrec_dlrm.data.synth import synth as run

    _output_dir(dst)
    if drift and multi_hot is not None:
        raise click.UsageError("--drift and --multi-hot cannot be combined")
    try:
        if drift:
            from shardrec_dlrm.data.synth_drift import synth_drift

            synth_drift(
                dst, rows=rows, seed=seed, live=live, turnover=turnover, force=force, log=click.echo
            )
            return
        if multi_hot is None:
            run(dst, rows=rows, seed=seed, force=force, log=click.echo)
            return
        from shardrec_dlrm.data.multihot_synth import MULTIHOT_DIR, synth_multihot

        synth_multihot(
            dst,
            rows=rows,
            seed=seed,
            multi_hot=multi_hot,
            num_embeddings_per_feature=(num_embeddings,) * NUM_SPARSE,
            force=force,
            log=click.echo,
        )
        click.echo(f"train on {dst / MULTIHOT_DIR} with --num-embeddings {num_embeddings}")
    except (DataError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--multi-hot",
    default="mlperf",
    show_default=True,
    help="Ids per sample of the 26 tables: 'mlperf' (3,2,1,2,6,...,100,27,10,3,1,1) or 26 "
    "comma-separated integers.",
)
@click.option(
    "--num-embeddings-per-feature",
    default="mlperf",
    show_default=True,
    help="Rows of the 26 tables the ids are hashed to and drawn from: 'mlperf' (the 1TB "
    "cardinalities capped at 40M) or 26 comma-separated integers; train with the same sizes.",
)
@click.option(
    "--distribution",
    type=click.Choice(["uniform", "pareto"]),
    default="uniform",
    show_default=True,
    help="How the extra ids are drawn (MLPerf uses uniform).",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="MLPerf uses 0."
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=1 << 16,
    show_default=True,
    help="Rows handled at once; memory stays within a few x chunk-rows x 428 bytes.",
)
@_FORCE
def multihot(
    src: Path,
    dst: Path,
    multi_hot: str,
    num_embeddings_per_feature: str,
    distribution: str,
    seed: int,
    chunk_rows: int,
    force: bool,
) -> None:
    """Materialise MLPerf DLRMv2-style multi-hot data at DST from one-hot Criteo preprocessed
    by `dlrm preprocess` at SRC: per table a seeded lookup maps each row to itself plus random
    rows, as the MLPerf reference does with the same seed. DST gets the reference's own files
    (day_N_dense.npy, day_N_labels.npy, day_N_sparse_multi_hot.npz), so data made here and by
    the reference read alike. An interrupted run resumes when run again.

    \b
      dlrm preprocess criteo_1tb/ criteo_1tb_pre/
      dlrm multihot criteo_1tb_pre/ criteo_1tb_multihot/
    """
    from shardrec_dlrm.data.multihot import materialize
    from shardrec_dlrm.data.multihot_lookup import MLPERF_NUM_EMBEDDINGS

    _output_dir(dst)
    sizes = MLPERF_NUM_EMBEDDINGS if num_embeddings_per_feature == "mlperf" else None
    try:
        meta = materialize(
            src,
            dst,
            multi_hot=multi_hot,
            num_embeddings_per_feature=sizes or num_embeddings_per_feature,
            distribution="pareto" if distribution == "pareto" else "uniform",
            seed=seed,
            chunk_rows=chunk_rows,
            force=force,
            log=click.echo,
        )
    except DataError as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(
            "interrupted: finished days are kept; run the same command again to resume"
        ) from None
    click.echo(
        f"{dst}: {len(meta.parts)} day(s) of multi-hot data ({sum(meta.multi_hot)} ids per sample)"
    )
