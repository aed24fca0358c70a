"""pytest imports test files by basename (rootdir-relative, no packages): two files of one name in tests/unit,
tests/integration and tests/gpu stop the whole run at collection. This catches it from `pytest tests/unit` alone."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_has_a_unique_basename():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    clashes = sorted(name for name, count in names.items() if count > 1)
    assert not clashes, f"rename one of each: {clashes} (pytest cannot collect two test modules of one name)"
