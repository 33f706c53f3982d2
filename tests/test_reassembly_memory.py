"""The server's reassembly budget: caps sized from ServerConfig hold under a flood of series
that never complete, the series leave with the right reasons, and the memory they held is
handed back to the operating system (rate-limited) once they are gone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ingest.config import ServerConfig
from ingest.memory import CAN_RELEASE
from ingest.uploads import RELEASE_AFTER_BYTES, RELEASE_INTERVAL_S, Uploads, reassembly_limits
from protocol.codec import decode, encode_raw
from protocol.header import Header
from protocol.reassembly import (
    ReassemblyOverloadError,
    Refused,
    RetransmitRequest,
    SeriesEvictedError,
    SeriesTooLargeError,
    Stored,
)

MIB = 1024 * 1024
BODY = bytes(range(250)) * 4  # 1000 bytes, what devices put in a package
ANNOUNCED = 8192  # the largest series: none of the flood's ever completes


def header(phone: str, index: int, *, first_serial: int = 0, total: int = ANNOUNCED) -> Header:
    return Header(
        msg_id=0x0801,
        body_length=len(BODY),
        phone=phone,
        serial=(first_serial + index - 1) & 0xFFFF,
        subpackage=True,
        package_total=total,
        package_index=index,
    )


def phone(n: int) -> str:
    return f"0139{n:08d}"


class Releases:
    """A stand-in for ingest.memory.release_free_memory that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return True


def test_limits_follow_the_configured_budget() -> None:
    limits = reassembly_limits(ServerConfig())
    assert limits.max_bytes_total == 64 * MIB
    assert limits.max_bytes_per_terminal == 4 * MIB
    assert limits.max_packages_total == 64 * 1024  # the byte budget in full 1 KiB packages
    assert (limits.package_timeout_s, limits.max_retransmit_rounds) == (30.0, 3)
    custom = ServerConfig(
        reassembly_max_bytes=16 * MIB,
        reassembly_max_bytes_per_terminal=2 * MIB,
        reassembly_timeout_s=10,
        reassembly_rounds=1,
    )
    limits = reassembly_limits(custom)
    assert (limits.max_bytes_total, limits.max_bytes_per_terminal) == (16 * MIB, 2 * MIB)
    assert limits.max_packages_total == 16 * 1024
    assert (limits.package_timeout_s, limits.retransmit_timeout_s) == (10.0, 10.0)
    assert limits.max_retransmit_rounds == 1


def test_the_worker_cap_holds_under_a_flood_and_the_series_time_out() -> None:
    """40 terminals x 2000 packages (80 MB offered): the worker holds at most its budget,
    refuses the rest as an overload (0x8001 result 1: send again later), and after the
    retransmit rounds every series leaves as timed out."""
    releases = Releases()
    uploads = Uploads(reassembly_limits(ServerConfig()), release_memory=releases)
    limits = uploads.limits
    refused: dict[str, int] = {}
    peak = 0
    for index in range(1, 2001):
        for n in range(40):
            result = uploads.reassembler.add(header(phone(n), index), BODY, now=index * 0.001)
            assert not result.dropped
            outcome = result.outcome
            if isinstance(outcome, Refused):
                assert isinstance(outcome.error, ReassemblyOverloadError)
                assert outcome.error.result_code == 1
                refused[outcome.error.kind] = refused.get(outcome.error.kind, 0) + 1
            else:
                assert isinstance(outcome, Stored)
            assert uploads.bytes_in_flight <= limits.max_bytes_total
            assert uploads.reassembler.packages_in_flight <= limits.max_packages_total
            assert uploads.reassembler.terminal_bytes(phone(n)) <= limits.max_bytes_per_terminal
            peak = max(peak, uploads.bytes_in_flight)
    assert uploads.reassembler.packages_in_flight == limits.max_packages_total
    assert peak == limits.max_packages_total * len(BODY)  # 62.5 MiB of the 64 MiB
    assert refused == {"reassembly_overload": 40 * 2000 - limits.max_packages_total}
    assert uploads.series_in_flight == 40
    assert releases.calls == 0  # nothing freed yet

    # Time moves on as the server's upload task moves it: deadline after deadline.
    requests = 0
    now = 2.0
    deadline = uploads.next_deadline()
    while deadline is not None:
        now = max(now, deadline)
        requests += sum(isinstance(e, RetransmitRequest) for e in uploads.expire(now))
        deadline = uploads.next_deadline()
    assert requests == 40 * limits.max_retransmit_rounds
    assert uploads.dropped == {"series_timeout": 40}
    assert (uploads.bytes_in_flight, uploads.series_in_flight) == (0, 0)
    # The series time out within a few ms of each other: one release at once, the rest of the
    # freed bytes at most RELEASE_INTERVAL_S later.
    assert releases.calls == 2
    assert uploads.bytes_freed == 0


def test_one_terminal_cannot_hold_more_than_its_share() -> None:
    uploads = Uploads(reassembly_limits(ServerConfig()))
    limits = uploads.limits
    fits = limits.max_bytes_per_terminal // len(BODY)  # 4194 packages of 1000 bytes

    # One series larger than the share can never complete: dropped once it passes the share.
    for index in range(1, fits + 1):
        outcome = uploads.reassembler.add(header(phone(1), index), BODY, now=0.0).outcome
        assert isinstance(outcome, Stored)
    result = uploads.reassembler.add(header(phone(1), fits + 1), BODY, now=0.0)
    assert isinstance(result.outcome, Refused)
    assert isinstance(result.outcome.error, SeriesTooLargeError)
    assert [d.reason for d in result.dropped] == ["series_too_large"]
    assert uploads.reassembler.terminal_bytes(phone(1)) == 0

    # Several series: past the share the least recently fed one is evicted.
    per_series = fits // 2
    for first_serial in (0, 10_000):
        for index in range(1, per_series + 1):
            uploads.reassembler.add(
                header(phone(2), index, first_serial=first_serial), BODY, now=1.0
            )
    assert uploads.reassembler.terminal_series(phone(2)) == 2
    result = uploads.reassembler.add(header(phone(2), 1, first_serial=20_000), BODY, now=2.0)
    assert isinstance(result.outcome, Stored)
    assert [d.reason for d in result.dropped] == ["series_evicted"]
    assert isinstance(result.dropped[0].error, SeriesEvictedError)
    assert result.dropped[0].key.first_serial == 0
    assert uploads.reassembler.terminal_bytes(phone(2)) <= limits.max_bytes_per_terminal


def test_memory_is_released_after_large_frees_and_at_most_every_interval() -> None:
    releases = Releases()
    uploads = Uploads(
        reassembly_limits(
            ServerConfig(
                reassembly_timeout_s=10,
                reassembly_rounds=0,
                reassembly_max_bytes_per_terminal=16 * MIB,
            )
        ),
        release_memory=releases,
    )
    # Two series per terminal, together worth a release.
    per_series = RELEASE_AFTER_BYTES // (2 * len(BODY)) + 1

    def fill(terminal: int, now: float) -> None:
        for first_serial in (0, 10_000):
            for index in range(1, per_series + 1):
                uploads.reassembler.add(
                    header(phone(terminal), index, first_serial=first_serial), BODY, now=now
                )

    fill(1, now=0.0)
    fill(2, now=3.0)
    assert uploads.next_deadline() == 10.0
    uploads.expire(10.0)  # terminal 1's series times out: released at once
    assert releases.calls == 1
    assert uploads.next_deadline() == 13.0
    uploads.expire(13.0)  # terminal 2's, within the interval: held back
    assert releases.calls == 1
    assert uploads.bytes_freed >= RELEASE_AFTER_BYTES
    assert uploads.next_deadline() == 10.0 + RELEASE_INTERVAL_S  # the held-back release is due
    uploads.expire(10.0 + RELEASE_INTERVAL_S)
    assert releases.calls == 2
    assert uploads.next_deadline() is None

    # Small frees do not call for a release.
    uploads.reassembler.add(header(phone(3), 1), BODY, now=20.0)
    uploads.expire(30.0)
    assert releases.calls == 2
    assert 0 < uploads.bytes_freed < RELEASE_AFTER_BYTES
    assert uploads.next_deadline() is None


def test_completed_series_count_as_freed() -> None:
    releases = Releases()
    # A series of three frees its two stored packages when the third completes it.
    uploads = Uploads(release_memory=releases, release_after_bytes=2 * len(BODY))
    for first_serial in (0, 100):
        for index in range(1, 4):
            packet = decode(
                encode_raw(
                    0x0801,
                    BODY,
                    phone=phone(1),
                    serial=first_serial + index - 1,
                    package=(3, index),
                )
            )
            uploads.feed(packet, now=first_serial / 100)
    assert uploads.completed == 2
    assert releases.calls == 1  # the first completion; the second within the interval
    assert uploads.next_deadline() == RELEASE_INTERVAL_S


def test_without_a_release_function_nothing_is_due() -> None:
    uploads = Uploads(reassembly_limits(ServerConfig(reassembly_rounds=0)))
    for n in range(3):
        for index in range(1, 3001):  # 3 MB each, within a terminal's share
            uploads.reassembler.add(header(phone(n), index), BODY, now=0.0)
    assert uploads.bytes_in_flight == 3 * 3000 * len(BODY)
    uploads.expire(30.0)
    assert uploads.bytes_in_flight == 0
    assert uploads.bytes_freed >= RELEASE_AFTER_BYTES
    assert uploads.next_deadline() is None
    assert uploads.releases == 0


# Run in a process of its own: a fresh heap, whatever the test session allocated before.
_RELEASE_PROBE = """
import json
from ingest.memory import release_free_memory, resident_bytes
before = resident_bytes()
bodies = [bytes([i & 0xFF]) * 1000 for i in range(64 * 1024)]
pin = bytes(1000)  # allocated above the bodies: keeps the heap from shrinking by itself
peak = resident_bytes()
del bodies
release_free_memory()
print(json.dumps({"before": before, "peak": peak, "after": resident_bytes()}))
"""


@pytest.mark.skipif(not CAN_RELEASE, reason="malloc_trim is glibc's")
def test_freed_package_bodies_go_back_to_the_operating_system() -> None:
    """The mechanism itself: ~64 MiB of 1000-byte bodies stored, then freed, then released.
    A live allocation made after them pins the heap, as the reassembler's bookkeeping does."""
    probe = subprocess.run(
        [sys.executable, "-c", _RELEASE_PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    figures = json.loads(probe.stdout)
    before, peak, after = figures["before"], figures["peak"], figures["after"]
    assert peak - before > 48 * MIB
    assert after - before < (peak - before) / 4
