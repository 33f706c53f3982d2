"""Sub-package reassembly (JT/T 808-2019 clause 4.4.3, tables 2-4; 0x8003 in clause 8.4).

A message body longer than a frame can carry (1023 bytes, the 10-bit length of table 2) is sent
as a series of packages: header bit 13 is set and the header carries the package total and the
package index (both WORD, the index counting from 1).  This module puts the series back
together.  It is sans-IO and clock-free: it never reads the time; every call that needs it takes
``now`` (monotonic seconds) from the caller, and the caller sends whatever the results ask for.

Input
    :meth:`Reassembler.feed` takes the :class:`~protocol.codec.Packet` that
    :func:`~protocol.codec.decode_frame` makes of a sub-package (its message is a
    :class:`~protocol.messages.base.Fragment`); :meth:`Reassembler.add` takes the header and the
    body bytes directly, for callers that hold a :class:`~protocol.codec.Frame`.

Identifying a series
    The packages of one message take consecutive serial numbers (clause 4.4.3: serial of package
    *i* = first serial + *i* - 1, modulo 65536), so every package names its series' first
    serial: ``first_serial = (serial - (index - 1)) & 0xFFFF``.  A series is keyed by
    (terminal phone, message id, first serial); its :class:`SeriesKey` adds the package total.
    Retransmitted packages (after 0x8003, or the terminal's own retransmission when an 0x8001
    got lost) keep their original serials, so they land in the same series.

Serials restart
    Devices restart their serial counter at 0 when they reboot, so a new message can reuse the
    key of a stale, unfinished series.  A package whose key matches a stored series but whose
    total differs, or whose bytes differ from the package stored at the same index, means exactly
    that: the stored series is dropped (reported as :class:`Dropped` with a
    :class:`SeriesConflictError`) and the package starts a new series (the newest sender wins; a
    buggy device that alternates two bodies only thrashes its own series).  A new message that
    happens to repeat the old bytes at every index it has sent so far cannot be told apart;
    the deadlines below bound how long a stale series can wait to be mixed up like that.

Duplicates
    A package identical to the stored one is a :class:`Duplicate` and changes nothing (it does
    not even push the deadline back: a terminal that keeps resending what we have while never
    sending what we miss must still run into the deadline).  A package of a series that
    completed in the last ``completed_memory_s`` seconds is recognised by a CRC-32 of each
    package and reported as a :class:`Duplicate` with ``after_completion`` set, so a late
    retransmission does not open a new series that would then ask for the whole message again.

Completion
    When the last missing package arrives, the bodies are joined in index order and decoded with
    :func:`~protocol.codec.decode_body` under the header of package 1 (encrypted bodies stay a
    :class:`~protocol.messages.base.RawMessage`, as in :func:`~protocol.codec.decode_frame`).
    The result is :class:`Reassembled` (a :class:`~protocol.codec.Packet` whose header is package
    1's header unchanged, so ``subpackage`` is still set and ``body_length`` is package 1's), or
    :class:`Undecodable` carrying the :class:`~protocol.errors.RemoteProtocolError`.  Both list
    the serials of all packages.  The server acknowledges each package with 0x8001 as it arrives
    (whatever the outcome) and replies to the whole message (0x8800 for 0x0801, ...) with
    ``key.first_serial``.

Deadlines and retransmission
    A series' deadline is the time of its last new package plus ``package_timeout_s``.
    :meth:`Reassembler.expire` reports each series past its deadline: as a
    :class:`RetransmitRequest` (missing indexes and their serials, for an 0x8003 with the
    original first serial) while it has retransmit rounds left, the deadline then moving to
    ``now + retransmit_timeout_s``; after ``max_retransmit_rounds`` rounds as :class:`Dropped`
    with a :class:`SeriesTimedOutError`.  Rounds are counted over the life of the series and
    never reset, so a series ends after a bounded number of requests.  Whether the "package ID"
    list of 0x8003 holds package indexes or serials is read both ways by implementations;
    requests carry both.

Caps
    Every cap in :class:`ReassemblyLimits` is checked before a package is stored.  A terminal
    that passes its own caps (series or bytes in flight) loses its least recently fed series
    (the one most likely abandoned), reported as :class:`Dropped` with a
    :class:`SeriesEvictedError`: only the terminal's own work is at stake.  When the process-wide
    caps (bytes or packages in flight) would be passed, the new package is :class:`Refused` with
    a :class:`ReassemblyOverloadError` instead, so that one terminal's flood cannot evict other
    terminals' series; stale series leave at their deadline and free the room.  A series whose
    bytes alone would exceed a terminal's budget can never complete and is dropped at once.

Memory
    Only package bytes are stored, never decoded objects (plus the header of one package per
    series, to address replies).  :attr:`Reassembler.bytes_in_flight` is the sum of the stored
    package bodies; :attr:`Reassembler.series_in_flight` the number of unfinished series.
"""

from __future__ import annotations

import logging
import zlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from protocol.codec import MAX_BODY, Packet, decode_body
from protocol.errors import (
    RESULT_FAILURE,
    LocalProtocolError,
    ReassemblyError,
    RemoteProtocolError,
)
from protocol.header import ENCRYPTION_NONE, Edition, Header
from protocol.messages.base import Fragment, Message, RawMessage

logger = logging.getLogger(__name__)

# Serial numbers are WORDs (clause 4.4.3, table 3) and wrap around.
SERIAL_MODULUS = 0x10000

# 0x8003 bodies: original serial WORD, count, then one WORD per package id.  The count is a BYTE
# in 2013, so at most 255 ids per request; 2019 widened it to a WORD, and the request must still
# fit one frame body of 1023 bytes: (1023 - 2 - 2) // 2 = 509 ids.
MAX_RETRANSMIT_IDS_2013 = 255
MAX_RETRANSMIT_IDS_2019 = (MAX_BODY - 2 - 2) // 2


def max_retransmit_ids(edition: Edition) -> int:
    """How many package ids one 0x8003 can carry in ``edition``."""
    return MAX_RETRANSMIT_IDS_2019 if edition is Edition.V2019 else MAX_RETRANSMIT_IDS_2013


# --------------------------------------------------------------------------------------------
# Errors


class BadPackageError(ReassemblyError):
    """The package fields are impossible: total 0, index 0 or index > total, oversized body."""

    kind = "bad_package"


class SeriesTooLargeError(ReassemblyError):
    """The series is larger than we are willing to hold (more packages or bytes than the caps)."""

    kind = "series_too_large"


class SeriesConflictError(ReassemblyError):
    """A package disagrees with the stored series of its key (different total or bytes)."""

    kind = "series_conflict"


class SeriesEvictedError(ReassemblyError):
    """The series was dropped to keep its terminal within its caps."""

    kind = "series_evicted"


class SeriesTimedOutError(ReassemblyError):
    """The series stayed incomplete after its last retransmit round."""

    kind = "series_timeout"


class SeriesDiscardedError(ReassemblyError):
    """The series was discarded on request (the terminal's connection went away)."""

    kind = "series_discarded"


class ReassemblyOverloadError(ReassemblyError):
    """The process-wide caps are reached; the package was not stored.

    Answered with 0x8001 result 1 (failure) rather than 2 (message error): the package was fine,
    and the terminal may send it again later.
    """

    kind = "reassembly_overload"
    result_code = RESULT_FAILURE


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class ReassemblyLimits:
    """Timeouts and caps of a :class:`Reassembler`; every default states its reason."""

    # Terminals send the packages of a message back to back, each within its own TCP response
    # timeout (terminal parameter 0x0002, commonly 10 s); 30 s of silence means packages were
    # lost rather than delayed.
    package_timeout_s: float = 30.0
    # After an 0x8003 the terminal must find the packages and send them again; the same 30 s.
    retransmit_timeout_s: float = 30.0
    # As many rounds as the terminal's own default retransmit count (parameter 0x0003, commonly
    # 3): a link that loses packages through three requests is not going to deliver the series.
    max_retransmit_rounds: int = 3
    # A 0x0801 multimedia upload is the largest series in practice: a JPEG of a few MB at the
    # ~1000 body bytes per package devices use needs thousands of packages.  8192 packages of up
    # to 1023 bytes hold 8 MiB; the WORD allows 65535, which no real message needs.
    max_packages_per_series: int = 8192
    # A terminal interleaves few sub-packaged messages (a multimedia upload, a parameter answer
    # 0x0104, a 0x1205 resource list, ...); 8 leaves room for a stale series of each beside them.
    max_series_per_terminal: int = 8
    # One series of the maximal size (8192 * 1023 bytes) fits, so any series we accept can
    # complete; anything more from one terminal evicts its stalest series.
    max_bytes_per_terminal: int = 8 * 1024 * 1024
    # The process' memory budget for reassembly: 32 worst-case uploads at once, or some 2500
    # typical 100 KB photos.  That suits a process that does little else; one that must keep
    # memory for thousands of connections passes a budget of its own (the ingest server sizes
    # it per worker, with max_packages_total scaled to match).
    max_bytes_total: int = 256 * 1024 * 1024
    # Bounds the bookkeeping (one dict entry and one bytes object per package) and so the
    # number of series: the byte budget in full 1 KiB packages, so that a flood of tiny packages
    # costs no more entries than the bytes budget would allow anyway.
    max_packages_total: int = 256 * 1024
    # A terminal whose 0x8001 for a package got lost resends it after its TCP response timeout
    # T1 (parameter 0x0002), backing off as T(n+1) = T(n) * (n + 1): with the common defaults of
    # 10 s and 3 retries (0x0003) the resends come 10, 30 and 90 s after the original; 120 s
    # covers the last of them.
    completed_memory_s: float = 120.0
    # Remembered completions cost 4 bytes (one CRC-32) per package: 64 Ki packages are 256 KiB,
    # enough for several completed maximal series per timeout window.
    max_remembered_packages: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("package_timeout_s", "retransmit_timeout_s", "completed_memory_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a non-negative number of seconds")
        if self.max_retransmit_rounds < 0:
            raise ValueError("max_retransmit_rounds must be >= 0")
        if not 1 <= self.max_packages_per_series <= 0xFFFF:
            raise ValueError("max_packages_per_series must be 1..65535 (the total is a WORD)")
        for name in (
            "max_series_per_terminal",
            "max_bytes_per_terminal",
            "max_bytes_total",
            "max_packages_total",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_remembered_packages < 0:
            raise ValueError("max_remembered_packages must be >= 0")


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """A series: terminal phone, message id, serial of package 1 and the package total."""

    phone: str
    msg_id: int
    first_serial: int
    total: int

    def serial_of(self, index: int) -> int:
        """The serial of package ``index`` (from 1): first serial + index - 1, wrapping."""
        return (self.first_serial + index - 1) % SERIAL_MODULUS

    @property
    def serials(self) -> tuple[int, ...]:
        """The serials of all packages, in index order."""
        return tuple(self.serial_of(i) for i in range(1, self.total + 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """The package was new and is kept; ``received`` packages of ``key.total`` are in."""

    key: SeriesKey
    header: Header
    index: int
    received: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate:
    """The package is one we already have (or had, for a series completed moments ago)."""

    key: SeriesKey
    header: Header
    index: int
    after_completion: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Reassembled:
    """The series is complete and its body decoded; ``packet.header`` is package 1's header."""

    key: SeriesKey
    packet: Packet

    @property
    def serials(self) -> tuple[int, ...]:
        return self.key.serials


@dataclass(frozen=True, slots=True, kw_only=True)
class Undecodable:
    """The series is complete but its whole body does not decode; ``error.header`` is package
    1's header, ``body`` the joined body."""

    key: SeriesKey
    header: Header
    body: bytes
    error: RemoteProtocolError

    @property
    def serials(self) -> tuple[int, ...]:
        return self.key.serials


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """The package was not stored; answer it with ``error.result_code``."""

    header: Header
    error: ReassemblyError


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped:
    """A series given up, with the packages it still missed.

    ``header`` is the header of package 1 if it arrived, else of the first package that did
    (it addresses the terminal); the kind of ``error`` says why.
    """

    key: SeriesKey
    header: Header
    missing: tuple[int, ...]
    error: ReassemblyError

    @property
    def reason(self) -> str:
        return self.error.kind


@dataclass(frozen=True, slots=True, kw_only=True)
class RetransmitRequest:
    """A series past its deadline with retransmit rounds left: send 0x8003.

    The 0x8003 carries ``key.first_serial`` and the missing packages (as indexes or serials,
    whichever the terminal expects); ``round`` counts from 1.  ``header`` addresses the reply
    (phone, layout, protocol version).  Use :meth:`batches` when more are missing than one 0x8003
    holds.
    """

    key: SeriesKey
    header: Header
    round: int
    missing: tuple[int, ...]

    @property
    def missing_serials(self) -> tuple[int, ...]:
        return tuple(self.key.serial_of(i) for i in self.missing)

    def batches(self, max_ids: int) -> list[tuple[int, ...]]:
        """The missing indexes in runs of at most ``max_ids`` (see :func:`max_retransmit_ids`)."""
        if max_ids < 1:
            raise LocalProtocolError("max_ids must be >= 1")
        return [self.missing[i : i + max_ids] for i in range(0, len(self.missing), max_ids)]


Outcome = Stored | Duplicate | Reassembled | Undecodable | Refused
Expiry = RetransmitRequest | Dropped


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedResult:
    """What feeding one package did: its own ``outcome`` and the series ``dropped`` on the way
    (superseded by a conflicting package, or evicted to make room)."""

    outcome: Outcome
    dropped: tuple[Dropped, ...] = ()


# --------------------------------------------------------------------------------------------
# State

_SeriesId = tuple[str, int, int]  # (phone, msg_id, first_serial)


@dataclass(slots=True, kw_only=True, eq=False)
class _Series:
    key: SeriesKey
    header: Header  # package 1's header once it arrived, else the first package's
    parts: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0
    quirks: frozenset[str] = frozenset()
    deadline: float = 0.0
    rounds: int = 0

    @property
    def ident(self) -> _SeriesId:
        return (self.key.phone, self.key.msg_id, self.key.first_serial)

    def missing(self) -> tuple[int, ...]:
        return tuple(i for i in range(1, self.key.total + 1) if i not in self.parts)


@dataclass(slots=True, kw_only=True)
class _Remembered:
    total: int
    crcs: array[int]
    until: float


class Reassembler:
    """Reassembles the sub-packaged messages of any number of terminals.

    One instance may serve one connection or the whole process; its caps are per terminal
    (phone) and in total.  Not thread-safe; it does no I/O and reads no clock.
    """

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits if limits is not None else ReassemblyLimits()
        self._series: dict[_SeriesId, _Series] = {}
        # Per terminal, its series from least to most recently fed (eviction order).
        self._terminals: dict[str, OrderedDict[_SeriesId, _Series]] = {}
        self._terminal_bytes: dict[str, int] = {}
        self._bytes = 0
        self._packages = 0
        # Completed series, oldest first; ``until`` grows with insertion as ``now`` is monotonic.
        self._remembered: OrderedDict[_SeriesId, _Remembered] = OrderedDict()
        self._remembered_packages = 0

    # ---------------------------------------------------------------------------- metrics

    @property
    def bytes_in_flight(self) -> int:
        """Bytes of package bodies stored for unfinished series."""
        return self._bytes

    @property
    def series_in_flight(self) -> int:
        """Unfinished series."""
        return len(self._series)

    @property
    def packages_in_flight(self) -> int:
        """Packages stored for unfinished series."""
        return self._packages

    def terminal_bytes(self, phone: str) -> int:
        """Bytes in flight for one terminal."""
        return self._terminal_bytes.get(phone, 0)

    def terminal_series(self, phone: str) -> int:
        """Unfinished series of one terminal."""
        return len(self._terminals.get(phone, ()))

    def next_deadline(self) -> float | None:
        """The earliest deadline of any series (when to call :meth:`expire` next), or None."""
        return min((s.deadline for s in self._series.values()), default=None)

    # ---------------------------------------------------------------------------- input

    def feed(self, packet: Packet, *, now: float) -> FeedResult:
        """Take one decoded sub-package (``packet.message`` is a Fragment).

        Raises :class:`LocalProtocolError` if ``packet`` is not a sub-package; peer faults are
        returned as :class:`Refused`, never raised.
        """
        if not isinstance(packet.message, Fragment):
            raise LocalProtocolError(f"0x{packet.msg_id:04x} packet is not a sub-package")
        return self.add(packet.header, packet.message.data, now=now, quirks=packet.quirks)

    def add(
        self, header: Header, data: bytes, *, now: float, quirks: frozenset[str] = frozenset()
    ) -> FeedResult:
        """Take one sub-package as its header and body bytes; see :meth:`feed`."""
        total, index = header.package_total, header.package_index
        if not header.subpackage or total is None or index is None:
            raise LocalProtocolError(f"0x{header.msg_id:04x} header is not a sub-package")
        if total == 0 or not 1 <= index <= total:
            return self._refuse(header, BadPackageError(f"package {index} of {total}"))
        if len(data) > MAX_BODY:
            return self._refuse(header, BadPackageError(f"{len(data)} body bytes in a package"))
        if total > self.limits.max_packages_per_series:
            return self._refuse(
                header,
                SeriesTooLargeError(
                    f"{total} packages, more than {self.limits.max_packages_per_series}"
                ),
            )
        first_serial = (header.serial - (index - 1)) % SERIAL_MODULUS
        key = SeriesKey(header.phone, header.msg_id, first_serial, total)
        ident: _SeriesId = (key.phone, key.msg_id, key.first_serial)
        dropped: list[Dropped] = []

        series = self._series.get(ident)
        if series is not None:
            conflict: str | None = None
            if series.key.total != total:
                conflict = f"total changed from {series.key.total} to {total}"
            else:
                stored = series.parts.get(index)
                if stored == data:
                    return FeedResult(outcome=Duplicate(key=key, header=header, index=index))
                if stored is not None:
                    conflict = f"package {index} differs from the one stored"
            if conflict is not None:
                dropped.append(self._drop(series, SeriesConflictError(conflict, header=header)))
                series = None
        if series is None:
            self._prune_remembered(now)
            remembered = self._remembered.get(ident)
            if remembered is not None:
                if remembered.total == total and remembered.crcs[index - 1] == zlib.crc32(data):
                    duplicate = Duplicate(
                        key=key, header=header, index=index, after_completion=True
                    )
                    return FeedResult(outcome=duplicate, dropped=tuple(dropped))
                # A new message reusing the serials of one completed moments ago.
                self._forget(ident)

        if series is None and total == 1:
            parts = {index: data}
            return FeedResult(
                outcome=self._complete(key, header, parts, quirks, now), dropped=tuple(dropped)
            )
        if series is not None and len(series.parts) == total - 1:
            self._remove(series)
            series.parts[index] = data
            first = header if index == 1 else series.header
            outcome = self._complete(key, first, series.parts, series.quirks | quirks, now)
            return FeedResult(outcome=outcome, dropped=tuple(dropped))
        return self._store(
            series,
            key=key,
            header=header,
            index=index,
            data=data,
            quirks=quirks,
            now=now,
            dropped=dropped,
        )

    # ---------------------------------------------------------------------------- time

    def expire(self, now: float) -> list[Expiry]:
        """Handle the series whose deadline is at or before ``now``, earliest first.

        Each gets a :class:`RetransmitRequest` while it has rounds left (its deadline moving to
        ``now + retransmit_timeout_s``), else is dropped (:class:`SeriesTimedOutError`).
        """
        self._prune_remembered(now)
        due = sorted(
            (s for s in self._series.values() if s.deadline <= now), key=lambda s: s.deadline
        )
        out: list[Expiry] = []
        for series in due:
            if series.rounds < self.limits.max_retransmit_rounds:
                series.rounds += 1
                series.deadline = now + self.limits.retransmit_timeout_s
                out.append(
                    RetransmitRequest(
                        key=series.key,
                        header=series.header,
                        round=series.rounds,
                        missing=series.missing(),
                    )
                )
            else:
                error = SeriesTimedOutError(
                    f"incomplete after {series.rounds} retransmit round(s)", header=series.header
                )
                out.append(self._drop(series, error))
        return out

    def discard_terminal(self, phone: str) -> list[Dropped]:
        """Drop every series of ``phone`` (its connection closed); returns what was dropped."""
        series = list(self._terminals.get(phone, {}).values())
        return [
            self._drop(s, SeriesDiscardedError("terminal discarded", header=s.header))
            for s in series
        ]

    # ---------------------------------------------------------------------------- internals

    def _refuse(
        self, header: Header, error: ReassemblyError, dropped: list[Dropped] | None = None
    ) -> FeedResult:
        error.header = header
        logger.info(
            "phone=%s refused package of 0x%04x serial %s: %s",
            header.phone,
            header.msg_id,
            header.serial,
            error.detail,
        )
        return FeedResult(outcome=Refused(header=header, error=error), dropped=tuple(dropped or ()))

    def _store(
        self,
        series: _Series | None,
        *,
        key: SeriesKey,
        header: Header,
        index: int,
        data: bytes,
        quirks: frozenset[str],
        now: float,
        dropped: list[Dropped],
    ) -> FeedResult:
        limits = self.limits
        size = len(data)
        own_bytes = (series.nbytes if series is not None else 0) + size
        if own_bytes > limits.max_bytes_per_terminal:
            error = f"{own_bytes} bytes, more than a terminal may hold"
            if series is not None:
                dropped.append(self._drop(series, SeriesTooLargeError(error)))
            return self._refuse(header, SeriesTooLargeError(error), dropped)

        # Plan evictions within the terminal, least recently fed first, sparing this series.
        victims: list[_Series] = []
        terminal = self._terminals.get(key.phone, OrderedDict())
        t_bytes = self.terminal_bytes(key.phone) + size
        t_series = len(terminal) + (1 if series is None else 0)
        for candidate in terminal.values():
            if t_bytes <= limits.max_bytes_per_terminal and (
                t_series <= limits.max_series_per_terminal
            ):
                break
            if candidate is series:
                continue
            victims.append(candidate)
            t_bytes -= candidate.nbytes
            t_series -= 1

        freed_bytes = sum(v.nbytes for v in victims)
        freed_packages = sum(len(v.parts) for v in victims)
        if self._bytes - freed_bytes + size > limits.max_bytes_total:
            return self._refuse(
                header, ReassemblyOverloadError("bytes in flight at the process cap"), dropped
            )
        if self._packages - freed_packages + 1 > limits.max_packages_total:
            return self._refuse(
                header, ReassemblyOverloadError("packages in flight at the process cap"), dropped
            )
        for victim in victims:
            evicted = SeriesEvictedError("evicted to keep the terminal within its caps")
            dropped.append(self._drop(victim, evicted))

        if series is None:
            series = _Series(key=key, header=header)
            self._series[series.ident] = series
            self._terminals.setdefault(key.phone, OrderedDict())[series.ident] = series
        else:
            self._terminals[key.phone].move_to_end(series.ident)
        if index == 1:
            series.header = header
        series.parts[index] = data
        series.nbytes += size
        series.quirks |= quirks
        series.deadline = now + limits.package_timeout_s
        self._bytes += size
        self._packages += 1
        self._terminal_bytes[key.phone] = self._terminal_bytes.get(key.phone, 0) + size
        stored = Stored(key=key, header=header, index=index, received=len(series.parts))
        return FeedResult(outcome=stored, dropped=tuple(dropped))

    def _complete(
        self,
        key: SeriesKey,
        first: Header,
        parts: dict[int, bytes],
        quirks: frozenset[str],
        now: float,
    ) -> Reassembled | Undecodable:
        body = b"".join(parts[i] for i in range(1, key.total + 1))
        self._remember(key, parts, now)
        message: Message
        if first.encryption != ENCRYPTION_NONE:
            message, edition = RawMessage.of(key.msg_id, body), first.layout
        else:
            try:
                message, edition = decode_body(key.msg_id, body, first.layout)
            except RemoteProtocolError as exc:
                exc.header = first
                logger.info(
                    "phone=%s reassembled 0x%04x from serial %s does not decode: %s",
                    key.phone,
                    key.msg_id,
                    key.first_serial,
                    exc,
                )
                return Undecodable(key=key, header=first, body=body, error=exc)
        packet = Packet(header=first, message=message, edition=edition, quirks=quirks, body=body)
        return Reassembled(key=key, packet=packet)

    def _remove(self, series: _Series) -> None:
        ident = series.ident
        del self._series[ident]
        phone = series.key.phone
        terminal = self._terminals[phone]
        del terminal[ident]
        # A terminal's byte count lives exactly as long as it has series: packages may be
        # empty (clause 4.4.3 sets no minimum body, and add() takes a 0-byte package), so a
        # count of zero does not mean that its last series is gone.
        if terminal:
            self._terminal_bytes[phone] -= series.nbytes
        else:
            del self._terminals[phone]
            del self._terminal_bytes[phone]
        self._bytes -= series.nbytes
        self._packages -= len(series.parts)

    def _drop(self, series: _Series, error: ReassemblyError) -> Dropped:
        self._remove(series)
        if error.header is None:
            error.header = series.header
        missing = series.missing()
        logger.info(
            "phone=%s dropped 0x%04x series from serial %s (%s of %s packages missing): %s",
            series.key.phone,
            series.key.msg_id,
            series.key.first_serial,
            len(missing),
            series.key.total,
            error.detail,
        )
        return Dropped(key=series.key, header=series.header, missing=missing, error=error)

    def _remember(self, key: SeriesKey, parts: dict[int, bytes], now: float) -> None:
        ident: _SeriesId = (key.phone, key.msg_id, key.first_serial)
        self._forget(ident)
        cap = self.limits.max_remembered_packages
        if key.total > cap:
            return
        while self._remembered_packages + key.total > cap:
            _, oldest = self._remembered.popitem(last=False)
            self._remembered_packages -= oldest.total
        crcs = array("I", (zlib.crc32(parts[i]) for i in range(1, key.total + 1)))
        until = now + self.limits.completed_memory_s
        self._remembered[ident] = _Remembered(total=key.total, crcs=crcs, until=until)
        self._remembered_packages += key.total

    def _forget(self, ident: _SeriesId) -> None:
        remembered = self._remembered.pop(ident, None)
        if remembered is not None:
            self._remembered_packages -= remembered.total

    def _prune_remembered(self, now: float) -> None:
        while self._remembered:
            ident, oldest = next(iter(self._remembered.items()))
            if oldest.until > now:
                break
            self._forget(ident)


__all__ = [
    "MAX_RETRANSMIT_IDS_2013",
    "MAX_RETRANSMIT_IDS_2019",
    "BadPackageError",
    "Dropped",
    "Duplicate",
    "Expiry",
    "FeedResult",
    "Outcome",
    "Reassembled",
    "Reassembler",
    "ReassemblyLimits",
    "ReassemblyOverloadError",
    "Refused",
    "RetransmitRequest",
    "SeriesConflictError",
    "SeriesDiscardedError",
    "SeriesEvictedError",
    "SeriesKey",
    "SeriesTimedOutError",
    "SeriesTooLargeError",
    "Stored",
    "Undecodable",
    "max_retransmit_ids",
]
