"""One writer per output directory: a second run is refused at once; a killed run (``kill -9``)
releases the directory and resumes to byte-identical output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardrec_dlrm.cli.data import preprocess as preprocess_command
from shardrec_dlrm.cli.data import synth as synth_command
from shardrec_dlrm.data import DataError, preprocess, synth

COLUMN_FILES = ("train.labels.u8", "train.dense.f32", "train.sparse.i64")

# A preprocess run slowed down (a sleep per chunk) so that the test can kill it mid-file.
SLOW_RUN = textwrap.dedent(
    """
    import importlib, sys, time

    module = importlib.import_module("shardrec_dlrm.data.preprocess")  # the name is re-exported

    real = module.parse_job

    def slow(job):
        time.sleep(0.02)
        return real(job)

    module.parse_job = slow
    module.preprocess(sys.argv[1], sys.argv[2], workers=1, chunk_bytes=20_000,
                      checkpoint_bytes=40_000, progress=False)
    """
)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_run_is_refused_and_a_killed_run_resumes_byte_identical(tmp_path: Path) -> None:
    synth(tmp_path / "raw", rows=3000, seed=3)
    src = tmp_path / "raw" / "train.txt"
    preprocess(src, tmp_path / "reference", workers=1, chunk_bytes=20_000, progress=False)
    dst = tmp_path / "dst"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(src), str(dst)], stderr=subprocess.PIPE
    )
    try:
        _wait_for(dst / "train.resume.json", proc)  # mid-file, past a checkpoint
        before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}

        # a second run on the same output: refused at once, and nothing of the first touched
        with pytest.raises(DataError, match="another dlrm preprocess or synth is writing"):
            preprocess(src, dst, workers=1, progress=False)
        result = CliRunner().invoke(preprocess_command, [str(src), str(dst), "--quiet"])
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        assert "another dlrm preprocess or synth is writing" in result.output
        result = CliRunner().invoke(synth_command, [str(dst), "--rows", "100", "--force"])
        assert result.exit_code == 1, result.output
        assert not (dst / "synth.json").exists()
        after = {p.name: p.stat().st_mtime_ns for p in dst.iterdir() if p.name in before}
        assert set(after) == set(before)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # the kernel dropped the lock with the process: the same command resumes at once
    logged: list[str] = []
    report = preprocess(
        src, dst, workers=1, chunk_bytes=20_000, checkpoint_bytes=40_000, progress=False,
        log=logged.append,
    )  # fmt: skip
    assert report.resumed_within["train"] > 0
    assert logged[0].startswith("resuming train at line ")
    for name in COLUMN_FILES:
        assert (dst / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [".dlrm.lock", "metadata.json", *COLUMN_FILES]
    )


def test_a_planted_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(victim, dst / ".dlrm.lock")
    with pytest.raises(DataError, match=r"\.dlrm\.lock: cannot create the lock file"):
        synth(dst, rows=100, force=True)
    assert victim.read_text() == "keep me"


def test_planted_partial_symlinks_are_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in ("train.txt.partial", "synth.json.partial", "planted_model.npz.partial.npz"):
        os.symlink(victim, dst / name)
    synth(dst, rows=100, force=True)
    assert victim.read_text() == "keep me"
    assert (dst / "train.txt").stat().st_size > 0
    raw = tmp_path / "raw"
    synth(raw, rows=100)
    pre = tmp_path / "pre"
    pre.mkdir()
    for name in ("metadata.json.partial", "train.sparse.i64.partial"):
        os.symlink(victim, pre / name)
    preprocess(raw, pre, workers=1, progress=False, force=True)
    assert victim.read_text() == "keep me"
