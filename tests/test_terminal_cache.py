"""The auth-code cache that decides logins while the database is down."""

from __future__ import annotations

import stat
from pathlib import Path

from storage.terminal_cache import TerminalCodeCache


def test_saved_codes_come_back_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "terminals.cache"
    cache = TerminalCodeCache(path)
    cache.put("013800000001", "a" * 16)
    cache.put("00000000013800000002", "b" * 16)
    assert cache.save()
    assert not cache.save()  # nothing changed since
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = TerminalCodeCache(path)
    assert again.load() == 2
    assert again.get("013800000001") == "a" * 16


def test_a_damaged_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "terminals.cache"
    for content in ("{not json", '{"version": 9, "codes": {}}', "[1, 2]", '{"codes": 3}'):
        path.write_text(content)
        cache = TerminalCodeCache(path)
        assert cache.load() == 0
        assert len(cache) == 0


def test_the_cache_is_bounded_oldest_first() -> None:
    cache = TerminalCodeCache(max_entries=3)
    for n in range(5):
        cache.put(str(n), "c")
    assert [cache.get(str(n)) for n in range(5)] == [None, None, "c", "c", "c"]


def test_a_refresh_keeps_codes_issued_while_it_read() -> None:
    cache = TerminalCodeCache()
    cache.put("released", "old")
    cache.begin_refresh()
    cache.put("fresh", "new")  # registered while the table was being read
    cache.replace_all({"kept": "k", "fresh": "stale"})
    assert cache.get("released") is None  # released by the platform centre: gone
    assert cache.get("kept") == "k"
    assert cache.get("fresh") == "new"
