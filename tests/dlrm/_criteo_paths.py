"""Where the real Criteo sample rows live: ``tests/data/criteo_sample/`` (see its SOURCE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO / "tests" / "data" / "criteo_sample"
SAMPLE_TSV = SAMPLE_DIR / "sample_train.txt"
SAMPLE_CSV = SAMPLE_DIR / "criteo_sample.txt"


def require_samples() -> None:
    if not SAMPLE_TSV.is_file() or not SAMPLE_CSV.is_file():
        pytest.fail(f"the real Criteo sample rows are missing: expected them in {SAMPLE_DIR}")
