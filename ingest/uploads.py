"""Sub-packaged uploads of the whole process: the codec's reassembler plus what replies need.

Pure, like the session: no I/O, no clock (every call takes ``now``).  One :class:`Uploads` per
server process is shared by all connections, so a terminal that reconnects in the middle of an
upload goes on with the same series.

Beyond :class:`~protocol.reassembly.Reassembler` it remembers the media id of each unfinished
0x0801 series (the first four bytes of package 1, JT/T 808-2019 8.51), because a multimedia
upload's missing packages are asked for with 0x8800, which names the media id (8.52), rather
than with 0x8003.  The memo has one entry per unfinished series, so the reassembler's caps bound
it too.  It also counts what it dropped, by reason, for the metrics.
"""

from __future__ import annotations

from collections import Counter

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

_SeriesId = tuple[str, int, int]  # (phone, msg id, first serial), as the reassembler keys series

# A 0x0801 body starts with the media id DWORD (8.51).
_MEDIA_ID_BYTES = 4


def _ident(key: SeriesKey) -> _SeriesId:
    return (key.phone, key.msg_id, key.first_serial)


class Uploads:
    """The process' reassembly state.  See the module docstring."""

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.reassembler = Reassembler(limits)
        self.dropped: Counter[str] = Counter()  # series given up, by reason (error kind)
        self.completed = 0  # series reassembled (decoded or not)
        self._media_ids: dict[_SeriesId, int] = {}

    @property
    def limits(self) -> ReassemblyLimits:
        return self.reassembler.limits

    @property
    def series_in_flight(self) -> int:
        return self.reassembler.series_in_flight

    @property
    def bytes_in_flight(self) -> int:
        return self.reassembler.bytes_in_flight

    def next_deadline(self) -> float | None:
        return self.reassembler.next_deadline()

    def media_id(self, key: SeriesKey) -> int | None:
        """The media id of an unfinished 0x0801 series whose package 1 arrived."""
        return self._media_ids.get(_ident(key))

    def feed(self, packet: Packet, *, now: float) -> FeedResult:
        """Feed one sub-package (``packet.message`` is a Fragment)."""
        result = self.reassembler.feed(packet, now=now)
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
        """The reassembler's expiries (retransmit requests and series given up)."""
        expiries = self.reassembler.expire(now)
        self._forget([e for e in expiries if isinstance(e, Dropped)])
        return expiries

    def _forget(self, dropped: tuple[Dropped, ...] | list[Dropped]) -> None:
        for series in dropped:
            self.dropped[series.reason] += 1
            self._media_ids.pop(_ident(series.key), None)
