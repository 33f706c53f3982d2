"""Sub-packaged uploads of the whole process: the codec's reassembler plus what replies need.

Pure, like the session: no I/O, no clock (every call takes ``now``).  One :class:`Uploads` per
server process is shared by all connections, so a terminal that reconnects in the middle of an
upload goes on with the same series.

Beyond :class:`~protocol.reassembly.Reassembler` it remembers the media id of each unfinished
0x0801 series (the first four bytes of package 1, JT/T 808-2019 8.51), because a multimedia
upload's missing packages are asked for with 0x8800, which names the media id (8.52), rather
than with 0x8003.  The memo has one entry per unfinished series, so the reassembler's caps bound
it too.  It also counts what it dropped, by reason, for the metrics.

Memory: the reassembler's byte caps bound what it holds, but the C allocator keeps the pages of
freed package bodies (see :mod:`ingest.memory`).  Given a ``release_memory`` function (the
server passes :func:`ingest.memory.release_free_memory`; it stays the only I/O here, injected),
:class:`Uploads` calls it once :data:`RELEASE_AFTER_BYTES` left the reassembler (series completed,
timed out, evicted), at most every :data:`RELEASE_INTERVAL_S`; a release held back by the
interval is due at :meth:`Uploads.next_deadline`, so the caller's usual :meth:`Uploads.expire`
at that deadline (or the next :meth:`Uploads.feed`, whichever comes first) performs it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol.codec import Packet
from protocol.messages.base import Fragment
from protocol.messages.multimedia import MultimediaData
from protocol.reassembly import (
    Dropped,
    Expiry,
    FeedResult,
    Reassembled,
    Reassembler,
    ReassemblyLimits,
    SeriesKey,
    Stored,
    Undecodable,
)

if TYPE_CHECKING:
    from ingest.config import ServerConfig

_SeriesId = tuple[str, int, int]  # (phone, msg id, first serial), as the reassembler keys series

# A 0x0801 body starts with the media id DWORD (8.51).
_MEDIA_ID_BYTES = 4

# Freed package bytes worth handing back to the operating system.  Below this the freed chunks
# are simply reused by the next uploads; 8 MiB is an eighth of a worker's default budget
# (ServerConfig.reassembly_max_bytes), two terminals at their cap.
RELEASE_AFTER_BYTES = 8 * 1024 * 1024
# A release walks the allocator's free chunks with its locks held: ~20 ms after a 250 MiB flood
# (bench/reassembly_memory.py).  At most every 5 s that is under 0.5% of a core, and a flood
# of series timing out over several seconds is still given back in one or two calls.
RELEASE_INTERVAL_S = 5.0
# The package-count cap in packages per byte of budget: full 1 KiB packages, so a flood of tiny
# packages costs no more bookkeeping entries (~100 bytes each) than the byte budget allows.
_BYTES_PER_COUNTED_PACKAGE = 1024


def reassembly_limits(config: ServerConfig) -> ReassemblyLimits:
    """The reassembler's limits for a server configured by ``config`` (the rest are the
    :class:`~protocol.reassembly.ReassemblyLimits` defaults)."""
    return ReassemblyLimits(
        package_timeout_s=config.reassembly_timeout_s,
        retransmit_timeout_s=config.reassembly_timeout_s,
        max_retransmit_rounds=config.reassembly_rounds,
        max_bytes_per_terminal=config.reassembly_max_bytes_per_terminal,
        max_bytes_total=config.reassembly_max_bytes,
        max_packages_total=max(1, config.reassembly_max_bytes // _BYTES_PER_COUNTED_PACKAGE),
    )


def _ident(key: SeriesKey) -> _SeriesId:
    return (key.phone, key.msg_id, key.first_serial)


class Uploads:
    """The process' reassembly state.  See the module docstring."""

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        *,
        release_memory: Callable[[], object] | None = None,
        release_after_bytes: int = RELEASE_AFTER_BYTES,
        release_interval_s: float = RELEASE_INTERVAL_S,
    ) -> None:
        self.reassembler = Reassembler(limits)
        self.dropped: Counter[str] = Counter()  # series given up, by reason (error kind)
        self.completed = 0  # series reassembled (decoded or not)
        self.releases = 0  # calls of release_memory
        self._media_ids: dict[_SeriesId, int] = {}
        self._release_memory = release_memory
        self._release_after_bytes = release_after_bytes
        self._release_interval_s = release_interval_s
        self._freed = 0  # bytes that left the reassembler since the last release
        self._next_release: float | None = None  # no release before this time

    @property
    def limits(self) -> ReassemblyLimits:
        return self.reassembler.limits

    @property
    def series_in_flight(self) -> int:
        return self.reassembler.series_in_flight

    @property
    def bytes_in_flight(self) -> int:
        return self.reassembler.bytes_in_flight

    @property
    def bytes_freed(self) -> int:
        """Bytes that left the reassembler since memory was last released."""
        return self._freed

    def next_deadline(self) -> float | None:
        """When to call :meth:`expire` next: the earliest series deadline, or a memory release
        held back by the interval; None when neither is pending."""
        deadline = self.reassembler.next_deadline()
        release = self._release_due()
        if release is None:
            return deadline
        return release if deadline is None else min(deadline, release)

    def media_id(self, key: SeriesKey) -> int | None:
        """The media id of an unfinished 0x0801 series whose package 1 arrived."""
        return self._media_ids.get(_ident(key))

    def feed(self, packet: Packet, *, now: float) -> FeedResult:
        """Feed one sub-package (``packet.message`` is a Fragment)."""
        before = self.reassembler.bytes_in_flight
        result = self.reassembler.feed(packet, now=now)
        self._released(before, now)
        self._forget(result.dropped)
        outcome = result.outcome
        if isinstance(outcome, Reassembled | Undecodable):
            self.completed += 1
            self._media_ids.pop(_ident(outcome.key), None)
        elif (
            isinstance(outcome, Stored)
            and outcome.index == 1
            and outcome.key.msg_id == MultimediaData.MSG_ID
            and isinstance(packet.message, Fragment)
            and len(packet.message.data) >= _MEDIA_ID_BYTES
        ):
            media_id = int.from_bytes(packet.message.data[:_MEDIA_ID_BYTES], "big")
            self._media_ids[_ident(outcome.key)] = media_id
        return result

    def expire(self, now: float) -> list[Expiry]:
        """The reassembler's expiries (retransmit requests and series given up); releases
        memory when enough was freed (see the module docstring)."""
        before = self.reassembler.bytes_in_flight
        expiries = self.reassembler.expire(now)
        self._forget([e for e in expiries if isinstance(e, Dropped)])
        self._released(before, now)
        return expiries

    def _released(self, before: int, now: float) -> None:
        """Count the bytes freed since ``before`` and release memory if it is time."""
        self._freed += max(0, before - self.reassembler.bytes_in_flight)
        if self._release_memory is None or self._freed < self._release_after_bytes:
            return
        if self._next_release is not None and now < self._next_release:
            return  # held back: due at next_deadline()
        self._release_memory()
        self.releases += 1
        self._freed = 0
        self._next_release = now + self._release_interval_s

    def _release_due(self) -> float | None:
        if self._release_memory is None or self._freed < self._release_after_bytes:
            return None
        return self._next_release

    def _forget(self, dropped: tuple[Dropped, ...] | list[Dropped]) -> None:
        for series in dropped:
            self.dropped[series.reason] += 1
            self._media_ids.pop(_ident(series.key), None)
