"""docs/plugins.md shows the example plugin's test file exactly as pytest runs it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_TEST = ROOT / "tests/plugins/shardrec_example_sharder/tests/test_local_copy.py"


def test_the_testing_section_shows_the_example_test_file() -> None:
    page = (ROOT / "docs/plugins.md").read_text()
    marker = page.index("<!-- fragment: the example plugin's test file")
    start = page.index("```python\n", marker) + len("```python\n")
    end = page.index("```\n", start)
    assert page[start:end] == EXAMPLE_TEST.read_text()
