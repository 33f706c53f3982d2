"""The durable spool: records, torn tails, the size cap, rotation and restarts (no database)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from storage.spool import MAGIC, Spool


def _records(spool: Spool) -> list[bytes]:
    return [r for seg in spool.sealed_segments() for r in spool.records(seg)]


def test_append_rotate_read_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.is_empty()
    assert spool.append(b"one")
    assert spool.append(b"two")
    assert not spool.is_empty()
    assert spool.sealed_segments() == []  # still active
    spool.rotate()
    assert spool.append(b"three")  # goes to a new segment
    spool.rotate()
    assert _records(spool) == [b"one", b"two", b"three"]
    for seg in spool.sealed_segments():
        spool.remove(seg)
    assert spool.is_empty()
    assert spool.bytes_used == 0
    assert list(tmp_path.iterdir()) == []


def test_restart_finds_previous_segments_sealed(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    assert first.append(b"a")
    assert first.append(b"b")
    first.close()
    second = Spool(tmp_path)
    assert not second.is_empty()
    assert _records(second) == [b"a", b"b"]
    assert second.append(b"c")  # a new segment, never the old one
    second.rotate()
    assert _records(second) == [b"a", b"b", b"c"]


@pytest.mark.parametrize(
    "damage",
    ["short_header", "short_payload", "crc", "magic"],
)
def test_torn_last_record_is_ignored(tmp_path: Path, damage: str) -> None:
    spool = Spool(tmp_path)
    assert spool.append(b"good record")
    spool.close()
    (segment,) = tmp_path.iterdir()
    payload = b"cut short by a crash"
    header = struct.pack(">4sII", MAGIC, len(payload), zlib.crc32(payload))
    torn = {
        "short_header": header[:7],
        "short_payload": header + payload[:5],
        "crc": struct.pack(">4sII", MAGIC, len(payload), zlib.crc32(payload) ^ 1) + payload,
        "magic": struct.pack(">4sII", b"XXXX", len(payload), zlib.crc32(payload)) + payload,
    }[damage]
    with segment.open("ab") as f:
        f.write(torn)
    reopened = Spool(tmp_path)
    assert _records(reopened) == [b"good record"]


def test_full_spool_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=64)
    assert spool.append(b"x" * 40)  # 12-byte header + 40
    assert not spool.append(b"y" * 40)
    assert spool.bytes_used == 52
    spool.rotate()
    assert _records(spool) == [b"x" * 40]
    for seg in spool.sealed_segments():
        spool.remove(seg)
    assert spool.append(b"y" * 40)  # room again after replay


def test_segments_rotate_at_their_size(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=100)
    for i in range(5):
        assert spool.append(bytes([i]) * 50)
    spool.rotate()
    assert len(spool.sealed_segments()) == 5
    assert _records(spool) == [bytes([i]) * 50 for i in range(5)]


def test_active_segment_cannot_be_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.append(b"z")
    active = next(tmp_path.iterdir())
    with pytest.raises(ValueError, match="active"):
        spool.remove(active)


def test_quarantine_keeps_payload_out_of_replay(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.quarantine(b"refused")
    assert kept.read_bytes() == b"refused"
    assert spool.is_empty()
    assert Spool(tmp_path).is_empty()
