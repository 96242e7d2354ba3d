"""``dlrm preprocess`` and ``dlrm synth`` through CliRunner: results, and one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shardrec_dlrm.cli.data import preprocess, synth
from shardrec_dlrm.data import open_dataset

from .._criteo_paths import SAMPLE_TSV, require_samples


def _one_line_error(result: Result, pattern: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit)  # click's error exit, not an escaped exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert pattern in errors[0], errors[0]


def test_synth_then_preprocess_then_resume(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(synth, [str(tmp_path / "raw"), "--rows", "1400", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "Bayes-optimal validation AUC" in result.output
    info = json.loads((tmp_path / "raw" / "synth.json").read_text())
    assert f"{info['val']['auc']:.4f}" in result.output

    args = [str(tmp_path / "raw"), str(tmp_path / "pre"), "--workers", "1"]
    result = runner.invoke(preprocess, args)
    assert result.exit_code == 0, result.output
    assert "1400 rows in 1 part(s) (1 written now, 0 kept" in result.output
    assert "rows/s" in result.output  # the progress bar and the summary give the rate
    assert open_dataset(tmp_path / "pre").num_rows == 1400

    result = runner.invoke(preprocess, args)
    assert result.exit_code == 0, result.output
    assert "(0 written now, 1 kept from an earlier run)" in result.output


def test_bad_rows_skip_reports_per_file(tmp_path: Path) -> None:
    require_samples()
    src = tmp_path / "src"
    src.mkdir()
    lines = SAMPLE_TSV.read_text().splitlines(keepends=True)
    (src / "day_0").write_text("".join(lines))
    (src / "day_1").write_text("".join(lines[:10]) + "1\t2\n" + "".join(lines[10:]))
    runner = CliRunner()
    result = runner.invoke(preprocess, [str(src), str(tmp_path / "a"), "--workers", "1"])
    _one_line_error(result, "day_1:11: expected 40 tab-separated fields, found 2")
    result = runner.invoke(
        preprocess, [str(src), str(tmp_path / "b"), "--bad-rows", "skip", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert f"skipped 1 malformed row(s) in {src / 'day_1'}" in result.output
    assert "day_0" not in result.output.split("skipped", 1)[1]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty_dir", "empty directory (no data files)"),
        ("truncated_gzip", "truncated gzip file"),
        ("bad_metadata", "does not match the files"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, case: str, message: str) -> None:
    require_samples()
    runner = CliRunner()
    src = tmp_path / "src"
    if case == "empty_dir":
        src.mkdir()
    elif case == "truncated_gzip":
        data = gzip.compress(SAMPLE_TSV.read_bytes())
        src.mkdir()
        (src / "day_0.gz").write_bytes(data[:-30])
        (src / "day_1.gz").write_bytes(data)
    elif case == "bad_metadata":
        assert runner.invoke(synth, [str(tmp_path / "raw"), "--rows", "100"]).exit_code == 0
        assert (
            runner.invoke(preprocess, [str(tmp_path / "raw"), str(src), "--workers", "1"]).exit_code
            == 0
        )
        with (src / "train.dense.f32").open("ab") as f:
            f.write(b"\0" * 4)
        # preprocessing a preprocessed dir is refused; opening it checks the files
        _one_line_error(
            runner.invoke(preprocess, [str(src), str(tmp_path / "x")]), "already preprocessed"
        )
        from shardrec_dlrm.data import DataError

        with pytest.raises(DataError, match=message):
            open_dataset(src)
        return
    result = runner.invoke(preprocess, [str(src), str(tmp_path / "dst"), "--workers", "1"])
    _one_line_error(result, message)


def test_synth_rejects_too_few_rows(tmp_path: Path) -> None:
    result = CliRunner().invoke(synth, [str(tmp_path), "--rows", "5"])
    assert result.exit_code == 2
    assert "5 is not in the range x>=14" in result.output


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("preprocess", ["{tmp}/absent", "{tmp}/dst"], "'SRC': Path '{tmp}/absent' does not exist"),
        ("preprocess", ["{raw}", "{tmp}/a_file/dst"], "cannot create {tmp}/a_file/dst"),
        ("preprocess", ["{raw}", "{tmp}/a_file"], "'DST': Directory '{tmp}/a_file' is a file"),
        ("preprocess", ["{raw}", "/proc/no_such_dir/dst"], "cannot create /proc/no_such_dir/dst"),
        ("preprocess", ["{raw}", "{tmp}/dst", "--workers", "0"], "'--workers': 0 is not in"),
        ("preprocess", ["{raw}", "{tmp}/dst", "--workers", "9999"], "'--workers': 9999 is not"),
        ("preprocess", ["{raw}", "{tmp}/dst", "--chunk-mib", "x"], "'x' is not a valid integer"),
        ("preprocess", ["{raw}", "{tmp}/dst", "--chunk-mib", "0"], "'--chunk-mib': 0 is not"),
        ("synth", ["{tmp}/a_file/dst", "--rows", "100"], "cannot create {tmp}/a_file/dst"),
        ("synth", ["{tmp}/s", "--rows", "1e5"], "'1e5' is not a valid integer"),
        ("synth", ["{tmp}/s", "--rows", "-3"], "'--rows': -3 is not in the range x>=14"),
        ("synth", ["{tmp}/s", "--rows", "100", "--seed", "-1"], "'--seed': -1 is not in the range"),
        ("synth", ["{tmp}/s"], "Missing option '--rows'"),
    ],
)
def test_command_line_mistakes_are_usage_errors(
    tmp_path: Path, command: str, args: list[str], message: str
) -> None:
    require_samples()
    (tmp_path / "a_file").write_text("not a directory\n")
    names = {"tmp": str(tmp_path), "raw": str(SAMPLE_TSV)}
    result = CliRunner().invoke(
        {"preprocess": preprocess, "synth": synth}[command], [a.format(**names) for a in args]
    )
    _one_line_error(result, message.format(**names), exit_code=2)
    assert not (tmp_path / "dst").exists()
    assert not (tmp_path / "s").exists()


def test_synth_never_overwrites_without_force(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "data"
    assert runner.invoke(synth, [str(out), "--rows", "100", "--seed", "1"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = runner.invoke(synth, [str(out), "--rows", "200", "--seed", "2"])
    _one_line_error(result, f"{out}: not empty (")
    assert "--force" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    result = runner.invoke(synth, [str(out), "--rows", "200", "--seed", "2", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "synth.json").read_text())["rows"] == 200
    assert open_dataset(out).num_rows == 200


def test_preprocess_never_writes_into_other_files_without_force(tmp_path: Path) -> None:
    runner = CliRunner()
    for name, seed in (("a", "1"), ("b", "2")):
        assert (
            runner.invoke(synth, [str(tmp_path / name), "--rows", "140", "--seed", seed]).exit_code
            == 0
        )
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    args = [str(tmp_path / "a"), str(dst), "--workers", "1", "--quiet"]
    _one_line_error(runner.invoke(preprocess, args), f"{dst}: not empty (notes.txt)")
    assert sorted(p.name for p in dst.iterdir()) == [".dlrm.lock", "notes.txt"]

    assert runner.invoke(preprocess, [*args, "--force"]).exit_code == 0
    assert runner.invoke(preprocess, args).exit_code == 0  # its own output: resumed, no --force
    other = [str(tmp_path / "b"), str(dst), "--workers", "1", "--quiet"]
    _one_line_error(
        runner.invoke(preprocess, other), "holds the preprocessed output of other sources"
    )
    assert (
        open_dataset(dst).part(0).sparse.tolist()
        == open_dataset(tmp_path / "a").part(0).sparse.tolist()
    )
    result = runner.invoke(preprocess, [*other, "--force"])
    assert result.exit_code == 0, result.output
    assert (dst / "notes.txt").read_text() == "mine"
    assert (
        open_dataset(dst).part(0).sparse.tolist()
        == open_dataset(tmp_path / "b").part(0).sparse.tolist()
    )
