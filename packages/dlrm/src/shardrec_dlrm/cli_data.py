"""``dlrm preprocess`` and ``dlrm synth``: thin click commands over :mod:`shardrec_dlrm.data`."""

from __future__ import annotations

from pathlib import Path

import click

from shardrec_dlrm.data.errors import DataError


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
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
    type=click.IntRange(min=1),
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
def preprocess(
    src: Path,
    dst: Path,
    format_: str,
    bad_rows: str,
    workers: int | None,
    chunk_mib: int,
    quiet: bool,
) -> None:
    """Convert raw Criteo (Kaggle train.txt, 1TB day_N, plain or gzip; or CSV) at SRC into the
    memory-mapped layout at DST, streaming with bounded memory on every core.

    An interrupted run resumes: run the same command again; finished files are kept, and the
    file that was being read continues from its last checkpoint (every 256 MiB of text).

    \b
      dlrm preprocess criteo_kaggle/train.txt criteo_pre/
      dlrm preprocess criteo_1tb/ criteo_1tb_pre/ --bad-rows skip
    """
    from shardrec_dlrm.data.preprocess import preprocess as run

    try:
        report = run(
            src,
            dst,
            format=format_,  # type: ignore[arg-type]
            bad_rows=bad_rows,  # type: ignore[arg-type]
            workers=workers,
            chunk_bytes=chunk_mib << 20,
            progress=not quiet,
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
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--rows", type=click.IntRange(min=14), required=True, help="Rows to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of model and data.")
def synth(dst: Path, rows: int, seed: int) -> None:
    """Write synthetic Criteo-format TSV drawn from a planted click model to DST/train.txt, and
    the best AUC and log loss any model can reach on it to DST/synth.json.

    \b
      dlrm synth demo_data/ --rows 200000 --seed 1
      dlrm train --data demo_data/
    """
    from shardrec_dlrm.data.synth import synth as run

    try:
        run(dst, rows=rows, seed=seed, log=click.echo)
    except (DataError, ValueError) as e:
        raise click.ClickException(str(e)) from None
