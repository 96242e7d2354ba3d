"""Reading raw Criteo: real rows (Kaggle TSV, a CSV sample), hand-checked values, formats."""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from shardrec_dlrm.data import (
    MISSING_ID,
    DataError,
    discover,
    hash_ids,
    open_dataset,
    parse_num_embeddings,
    read_file,
)
from shardrec_dlrm.data.sources import SourceFile
from shardrec_dlrm.data.tsv import parse_tsv

from .._criteo_paths import SAMPLE_CSV, SAMPLE_TSV, require_samples


@pytest.fixture(autouse=True)
def _samples() -> None:
    require_samples()


def _only_file(path: Path) -> SourceFile:
    return discover(path).files[0]


def test_kaggle_tsv_rows_hand_checked() -> None:
    rows, skipped = read_file(_only_file(SAMPLE_TSV))
    assert skipped == 0
    assert len(rows) == 100
    assert int(rows.labels.sum()) == 29  # SOURCE.md: 29 positives
    # line 1: 0 | (I1 empty) 0 5 4 13275 14 35 4 41 (I10 empty) 4 0 4 | 05db9164 ... C22 empty ...
    assert rows.labels[0] == 0
    expected_dense = [0, 0, 5, 4, 13275, 14, 35, 4, 41, 0, 4, 0, 4]
    np.testing.assert_allclose(rows.dense[0], [math.log1p(x) for x in expected_dense], rtol=1e-6)
    assert rows.sparse[0, 0] == 0x05DB9164 == 98275684
    assert rows.sparse[0, 1] == 0xF0CF0024 == 4040097828  # above 2**31: kept exact in int64
    assert rows.sparse[0, 21] == MISSING_ID  # C22 is empty on line 1
    assert rows.sparse[0, 25] == 0x731C3655
    # line 2: a click; I1 = 0, I2 = 559
    assert rows.labels[1] == 1
    assert rows.dense[1, 1] == pytest.approx(math.log(560))
    assert rows.sparse[1, 0] == 0x68FD1E64
    # line 12: I2 = -1 is clamped to 0 before log(1 + x)
    assert rows.labels[11] == 1
    assert rows.dense[11, 0] == pytest.approx(math.log(3))
    assert rows.dense[11, 1] == 0.0
    # line 100 (the last): I5 = 159966
    assert rows.dense[99, 4] == pytest.approx(math.log(159967))


def test_tsv_parser_matches_a_plain_python_reading_of_every_row() -> None:
    rows, _ = read_file(_only_file(SAMPLE_TSV))
    for i, line in enumerate(SAMPLE_TSV.read_text().splitlines()):
        f = line.split("\t")
        assert rows.labels[i] == int(f[0])
        dense = [math.log1p(max(int(x), 0)) if x else 0.0 for x in f[1:14]]
        np.testing.assert_allclose(rows.dense[i], dense, rtol=1e-6)
        assert rows.sparse[i].tolist() == [int(x, 16) if x else -1 for x in f[14:]]


def test_csv_rows_hand_checked() -> None:
    rows, skipped = read_file(_only_file(SAMPLE_CSV))
    assert skipped == 0
    assert len(rows) == 200
    assert int(rows.labels.sum()) == 49  # SOURCE.md: 49 positives
    # data row 2: 0,,-1,19.0,35.0,30251.0,247.0,1.0,35.0,160.0,,1.0,,35.0,68fd1e64,...
    expected = [0, 0, 19, 35, 30251, 247, 1, 35, 160, 0, 1, 0, 35]  # I2 = -1 clamps to 0
    np.testing.assert_allclose(rows.dense[1], [math.log1p(x) for x in expected], rtol=1e-6)
    assert rows.sparse[1, 0] == 0x68FD1E64 == 1761418852
    assert rows.sparse[1, 18] == MISSING_ID
    assert rows.sparse[1, 19] == MISSING_ID
    # data row 3: 0,0.0,0,2.0,12.0,2013.0,...
    assert rows.dense[2, 4] == pytest.approx(math.log(2014))
    assert rows.sparse[2, 1] == 0x38A947A1


def test_detection_and_override(tmp_path: Path) -> None:
    assert discover(SAMPLE_TSV).format == "tsv"
    assert discover(SAMPLE_CSV).format == "csv"
    assert discover(SAMPLE_TSV, "tsv").format == "tsv"
    # a CSV file read as TSV: every line has the wrong number of fields, and the error says where
    with pytest.raises(DataError, match=r"criteo_sample\.txt:1: expected 40 tab-separated fields"):
        read_file(discover(SAMPLE_CSV, "tsv").files[0])
    # headerless CSV cannot be recognised: the message asks for --format
    body = tmp_path / "rows.csv"
    body.write_text("".join(SAMPLE_CSV.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(DataError, match="--format"):
        discover(body)


def test_gzip_is_read_like_plain(tmp_path: Path) -> None:
    gz = tmp_path / "day_0.gz"
    gz.write_bytes(gzip.compress(SAMPLE_TSV.read_bytes()))
    plain, _ = read_file(_only_file(SAMPLE_TSV))
    zipped, _ = read_file(_only_file(gz))
    np.testing.assert_array_equal(plain.sparse, zipped.sparse)
    np.testing.assert_array_equal(plain.dense, zipped.dense)


def test_small_chunks_give_the_same_rows_and_line_numbers(tmp_path: Path) -> None:
    whole, _ = read_file(_only_file(SAMPLE_TSV))
    chunked, _ = read_file(_only_file(SAMPLE_TSV), chunk_bytes=700)  # about 3 lines per chunk
    np.testing.assert_array_equal(whole.sparse, chunked.sparse)
    lines = SAMPLE_TSV.read_text().splitlines(keepends=True)
    lines[56] = lines[56].replace("\t", "\tzz", 1)
    bad = tmp_path / "bad.txt"
    bad.write_text("".join(lines))
    with pytest.raises(DataError, match=r"bad\.txt:57: I1 is not an integer"):
        read_file(_only_file(bad), chunk_bytes=700)


def test_crlf_and_missing_final_newline(tmp_path: Path) -> None:
    text = SAMPLE_TSV.read_text()
    f = tmp_path / "crlf.txt"
    f.write_bytes(text.rstrip("\n").replace("\n", "\r\n").encode())
    rows, _ = read_file(_only_file(f))
    ref, _ = read_file(_only_file(SAMPLE_TSV))
    assert len(rows) == 100
    np.testing.assert_array_equal(rows.sparse, ref.sparse)


def test_uppercase_and_short_hex_ids_take_the_slow_path() -> None:
    line = "1" + "\t" * 14 + "\t".join(["ABCDEF01", "ff", "0"] + [""] * 23) + "\n"
    rows, _ = parse_tsv(line.encode(), path="x", first_line=1)
    assert rows.sparse[0, :4].tolist() == [0xABCDEF01, 0xFF, 0, -1]


def test_long_dense_values_take_the_slow_path() -> None:
    line = "0\t" + "\t".join(["123456789012", "-45"] + [""] * 11) + "\t" * 26 + "\n"
    rows, _ = parse_tsv(line.encode(), path="x", first_line=1)
    assert rows.dense[0, 0] == pytest.approx(math.log1p(123456789012), rel=1e-6)
    assert rows.dense[0, 1] == 0.0


def test_hashing_reserves_row_zero_for_missing() -> None:
    ids = np.array([[-1] * 26, [0] * 26, [10] * 26, [2**32 - 1] * 26], dtype=np.int64)
    sizes = parse_num_embeddings(None, ",".join(["5"] * 25 + ["1000"]))
    assert sizes is not None
    out = hash_ids(ids, sizes)
    assert out[0].tolist() == [0] * 26  # missing -> 0
    assert out[1].tolist() == [1] * 26  # id 0 -> 1 + 0 % 4
    assert out[2, 0] == 1 + 10 % 4
    assert out[2, 25] == 1 + 10 % 999
    assert out[3, 0] == 1 + (2**32 - 1) % 4
    assert (out[:, :25] < 5).all()
    assert (out > 0)[1:].all()
    assert hash_ids(ids, None)[2, 0] == 11  # unhashed: shifted by one


def test_num_embeddings_options_are_checked() -> None:
    assert parse_num_embeddings(100, None) == (100,) * 26
    with pytest.raises(ValueError, match="26 sizes"):
        parse_num_embeddings(None, "1,2,3")
    with pytest.raises(ValueError, match="C1 must be >= 2"):
        parse_num_embeddings(1, None)
    with pytest.raises(ValueError, match="not both"):
        parse_num_embeddings(10, [10] * 26)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_num_embeddings(None, "a,b")


def test_directory_layouts(tmp_path: Path) -> None:
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    shutil.copy(SAMPLE_TSV, kaggle / "train.txt")
    (kaggle / "test.txt").write_text("no labels here\n")
    found = discover(kaggle)
    assert found.layout == "kaggle"
    assert [f.part for f in found.files] == ["train"]

    tb = tmp_path / "tb"
    tb.mkdir()
    for day in (10, 2, 0):
        (tb / f"day_{day}.gz").write_bytes(gzip.compress(SAMPLE_TSV.read_bytes()))
    found = discover(tb)
    assert found.layout == "terabyte"
    assert [f.part for f in found.files] == ["day_0", "day_2", "day_10"]  # numeric day order

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(SAMPLE_TSV, other / "b.tsv")
    shutil.copy(SAMPLE_TSV, other / "a.tsv")
    (other / "notes.md").write_text("ignored")
    ds = open_dataset(other)
    assert ds.layout == "files"
    assert ds.part_names == ("a", "b")
    assert ds.num_rows == 200


def _one_row(dense: list[str], sparse: list[str]) -> bytes:
    return ("\t".join(["0", *dense, *sparse]) + "\n").encode("latin-1")


@pytest.mark.parametrize("position", [0, 3, 7])
def test_every_byte_in_a_hex_id_is_accepted_iff_it_is_a_hex_digit(position: int) -> None:
    for code in range(256):
        if code in (9, 10, 13):
            continue
        token = list("0a1b2c3d")
        token[position] = chr(code)
        line = _one_row([""] * 13, ["".join(token)] + [""] * 25)
        valid = chr(code) in "0123456789abcdefABCDEF"
        if valid:
            rows, _ = parse_tsv(line, path="x", first_line=1)
            assert rows.sparse[0, 0] == int("".join(token), 16)
        else:
            with pytest.raises(DataError, match="C1 is not a hex id"):
                parse_tsv(line, path="x", first_line=1)


@pytest.mark.parametrize("token_template", ["7", "12345678", "1234567890123", "-5"])
def test_every_byte_in_a_dense_value_is_accepted_iff_it_is_a_digit(token_template: str) -> None:
    for code in range(256):
        if code in (9, 10, 13):
            continue
        token = list(token_template)
        token[-1] = chr(code)
        line = _one_row(["".join(token)] + [""] * 12, [""] * 26)
        if chr(code).isdigit() and code < 128:
            rows, _ = parse_tsv(line, path="x", first_line=1)
            value = int("".join(token))
            assert rows.dense[0, 0] == pytest.approx(math.log1p(max(value, 0)), rel=1e-6)
        else:
            with pytest.raises(DataError, match="I1 is not an integer"):
                parse_tsv(line, path="x", first_line=1)
