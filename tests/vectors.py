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


# Standard header keys of the vectors; each is the Header attribute of the same name.
HEADER_KEYS = frozenset(
    {
        "body_length",
        "encryption",
        "subpackage",
        "version_flag",
        "protocol_version",
        "package_total",
        "package_index",
    }
)


def check_standard_keys(packet: Any, expect: dict[str, Any]) -> None:
    """The vector's standard (unprefixed) keys: header fields, then body fields by name."""
    assert expect["checksum_ok"]
    assert expect["length_ok"]
    for key, value in expect.items():
        if ":" in key or key in ("checksum_ok", "length_ok"):
            continue
        source = packet.header if key in HEADER_KEYS else packet.message
        assert getattr(source, key) == value, key
