"""Repository layout rules pytest itself relies on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_test_modules_have_unique_basenames() -> None:
    """tests/ has no __init__.py files, so pytest imports test modules by basename: two tiers holding the same
    file name make the whole run fail at collection ("import file mismatch")."""
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], sorted(n for n, c in names.items() if c > 1)
