"""Access to the shared JT/T 808 conformance vectors."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_CANDIDATES = [
    ROOT.parent / "shared" / "testdata" / "jt808_vectors.json",
    ROOT / "tests" / "data" / "jt808_vectors.json",
]


@cache
def load_cases() -> list[dict[str, Any]]:
    for path in _CANDIDATES:
        if path.exists():
            cases: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))["cases"]
            return cases
    raise FileNotFoundError(f"jt808_vectors.json not found in {_CANDIDATES}")


def case_ids(case: dict[str, Any]) -> str:
    """pytest ``ids=`` callback: a case is named by its id."""
    return str(case["id"])
