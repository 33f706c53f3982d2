"""The capture file format: one connection's bytes with their timing, for replay and debugging.

Sans-IO: the functions here turn values into bytes and bytes into values; :class:`CaptureReader`
and :class:`CaptureWriter` work on a binary file object the caller opened.  Nothing here reads
a clock: the connection's start (wall clock) and each record's offset (monotonic) are passed in.

One file holds one TCP connection, in one direction: the server (``jt808 serve --capture``)
records what it received, the simulator (``jt808 simulate --capture``) what it sent, so both
files of the same connection hold the same bytes.  All integers are big-endian.

File header::

    magic           8 bytes   b"JT808CAP"
    version         u16       1
    start_wall_ns   u64       wall-clock start of the connection, ns since the Unix epoch (UTC)
    peer_length     u16
    peer            bytes     the terminal's address as UTF-8 text, "host:port"

Then one record per chunk, as the socket delivered it (server) or as it was written (simulator)::

    offset_ns       u64       monotonic ns since the connection started
    length          u32
    data            bytes     exactly ``length`` bytes

A file ends after its last whole record; a truncated tail (the writer died mid-record) is not an
error, the reader stops before it and says so (:attr:`CaptureReader.truncated`).  A writer stops
recording once the file would pass its ``max_bytes``, so every file ends on a whole record.

File names (:func:`capture_name`):
``<UTC start %Y%m%dT%H%M%S.%fZ>-<process id>-<connection number>.jt808cap``; the process id keeps
the files of several server or simulator processes apart.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, Final, NoReturn

from protocol.errors import ProtocolError

MAGIC: Final = b"JT808CAP"
VERSION: Final = 1
SUFFIX: Final = ".jt808cap"

HEADER: Final = struct.Struct(">8sHQH")  # magic, version, start_wall_ns, peer_length
RECORD: Final = struct.Struct(">QI")  # offset_ns, length
# A u16 length prefix.
MAX_PEER_BYTES: Final = 0xFFFF
# A u32 length prefix.
MAX_LENGTH: Final = 0xFFFF_FFFF
# What a reader accepts as one record by default.  Writers record one socket read (the server
# reads at most 64 KiB) or one write (the simulator: a group of frames, a few KiB); 16 MiB is
# far above both, and keeps a corrupt length from making the reader allocate gigabytes.
MAX_RECORD_BYTES: Final = 16 * 1024 * 1024
# Reads of the streaming reader are this large (one record may take several).
READ_BYTES: Final = 64 * 1024

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class CaptureError(ProtocolError):
    """The bytes are not a capture file of a version we read, or a record is implausible."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CaptureHeader:
    """The file header.  ``start_wall_ns`` is exact; :attr:`start` is it as a datetime (UTC,
    microsecond resolution)."""

    version: int = VERSION
    start_wall_ns: int
    peer: str

    @property
    def start(self) -> datetime:
        return EPOCH + (self.start_wall_ns // 1000) * _MICROSECOND


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One chunk: ``data`` at ``offset_ns`` after the connection started."""

    offset_ns: int
    data: bytes


# ---------------------------------------------------------------------------------------------
# Values <-> bytes


def wall_ns(moment: datetime) -> int:
    """An aware datetime as ns since the Unix epoch (microsecond resolution, like datetime)."""
    if moment.tzinfo is None:
        raise ValueError("the capture start must be an aware datetime")
    return (moment - EPOCH) // _MICROSECOND * 1000


def offset_ns(now_s: float, start_s: float) -> int:
    """The record offset for monotonic time ``now_s`` of a connection started at ``start_s``."""
    return max(0, round((now_s - start_s) * 1e9))


def capture_name(start: datetime, *, pid: int, connection: int) -> str:
    """The file name for a connection (see the module docstring)."""
    return f"{start.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}-{pid}-{connection}{SUFFIX}"


def pack_header(header: CaptureHeader) -> bytes:
    """The file header; a peer longer than 65,535 bytes of UTF-8 is cut there."""
    peer = header.peer.encode("utf-8")[:MAX_PEER_BYTES]
    if not 0 <= header.start_wall_ns < 1 << 64:
        raise ValueError(f"start_wall_ns {header.start_wall_ns} does not fit a u64")
    return HEADER.pack(MAGIC, header.version, header.start_wall_ns, len(peer)) + peer


def parse_header(data: bytes | bytearray | memoryview) -> tuple[CaptureHeader, int] | None:
    """The header at the start of ``data`` and its size; None when ``data`` is too short to
    hold it.  Raises :class:`CaptureError` for anything that is not a version 1 capture."""
    if len(data) >= len(MAGIC) and bytes(data[: len(MAGIC)]) != MAGIC:
        raise CaptureError("not a capture file (bad magic)")
    if len(data) < HEADER.size:
        return None
    _, version, start_ns, peer_length = HEADER.unpack_from(data)
    if version != VERSION:
        raise CaptureError(f"capture version {version}; this reader knows version {VERSION}")
    size = HEADER.size + peer_length
    if len(data) < size:
        return None
    peer = bytes(data[HEADER.size : size]).decode("utf-8", errors="replace")
    return CaptureHeader(version=version, start_wall_ns=start_ns, peer=peer), size


def pack_record(offset: int, data: bytes | bytearray | memoryview) -> bytes:
    """One record."""
    if not 0 <= offset < 1 << 64:
        raise ValueError(f"offset_ns {offset} does not fit a u64")
    if len(data) > MAX_LENGTH:
        raise ValueError(f"a record holds at most {MAX_LENGTH} bytes")
    return RECORD.pack(offset, len(data)) + bytes(data)


def parse_records(
    data: bytes, start: int = 0, *, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[Record]:
    """The whole records of ``data[start:]`` (``start``: the header size); a truncated tail is
    skipped.  Raises :class:`CaptureError` for a record longer than ``max_record_bytes``."""
    at = start
    end = len(data)
    while at + RECORD.size <= end:
        offset, length = RECORD.unpack_from(data, at)
        if length > max_record_bytes:
            raise CaptureError(
                f"record of {length} bytes at byte {at} (at most {max_record_bytes})"
            )
        body = at + RECORD.size
        if body + length > end:
            return
        yield Record(offset, data[body : body + length])
        at = body + length


def parse_capture(
    data: bytes, *, max_record_bytes: int = MAX_RECORD_BYTES
) -> tuple[CaptureHeader, list[Record]]:
    """A whole file's header and records."""
    parsed = parse_header(data)
    if parsed is None:
        raise CaptureError("too short for a capture header")
    header, size = parsed
    return header, list(parse_records(data, size, max_record_bytes=max_record_bytes))


# ---------------------------------------------------------------------------------------------
# Streaming over a file object


class CaptureReader:
    """Reads a capture from a binary file object, one record at a time.

    The header is read on construction (:class:`CaptureError` if the file is not a capture);
    iterating yields :class:`Record` in file order.  Memory: one record plus one read of
    ``read_bytes``.  After
    the iteration :attr:`truncated` tells whether the file ended inside a record.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        max_record_bytes: int = MAX_RECORD_BYTES,
        read_bytes: int = READ_BYTES,
    ) -> None:
        if read_bytes < 1:
            raise ValueError("read_bytes must be positive")
        self._file = file
        self._max_record_bytes = max_record_bytes
        self._read_bytes = read_bytes
        self._buffer = bytearray()
        self._eof = False
        self.truncated = False
        self.bytes_read = 0
        while True:
            parsed = parse_header(self._buffer)
            if parsed is not None:
                break
            if not self._fill():
                raise CaptureError("file ends inside the capture header")
        self.header, size = parsed
        del self._buffer[:size]

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._file.read(self._read_bytes)
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        self.bytes_read += len(chunk)
        return True

    def __iter__(self) -> Iterator[Record]:
        return self

    def __next__(self) -> Record:
        buffer = self._buffer
        while len(buffer) < RECORD.size:
            if not self._fill():
                self._finish()
        offset, length = RECORD.unpack_from(buffer)
        if length > self._max_record_bytes:
            raise CaptureError(f"record of {length} bytes (at most {self._max_record_bytes})")
        end = RECORD.size + length
        while len(buffer) < end:
            if not self._fill():
                self._finish()
        record = Record(offset, bytes(buffer[RECORD.size : end]))
        del buffer[:end]
        return record

    def _finish(self) -> NoReturn:
        self.truncated = self.truncated or bool(self._buffer)
        self._buffer.clear()
        raise StopIteration


class CaptureEncoder:
    """The bytes of one capture, with the size cap, for writers that do their own I/O.

    :meth:`header` first, then :meth:`record` per chunk; ``record`` returns None once the file
    would pass ``max_bytes`` (and for every later chunk: :attr:`stopped`), so a capped file
    still ends on a whole record.
    """

    def __init__(self, *, start: datetime, peer: str, max_bytes: int) -> None:
        self.header_value = CaptureHeader(start_wall_ns=wall_ns(start), peer=peer)
        self.max_bytes = max_bytes
        self.written = 0
        self.stopped = False

    def header(self) -> bytes:
        data = pack_header(self.header_value)
        self.written += len(data)
        return data

    def record(self, data: bytes | bytearray | memoryview, *, offset: int) -> bytes | None:
        if self.stopped:
            return None
        size = RECORD.size + len(data)
        if self.written + size > self.max_bytes:
            self.stopped = True
            return None
        self.written += size
        return pack_record(offset, data)


class CaptureWriter:
    """Writes a capture to a binary file object (synchronously: call it from a worker thread
    in async code).  The header is written on construction."""

    def __init__(self, file: BinaryIO, *, start: datetime, peer: str, max_bytes: int) -> None:
        self._file = file
        self._encoder = CaptureEncoder(start=start, peer=peer, max_bytes=max_bytes)
        file.write(self._encoder.header())

    @property
    def written(self) -> int:
        return self._encoder.written

    @property
    def stopped(self) -> bool:
        return self._encoder.stopped

    def record(self, data: bytes | bytearray | memoryview, *, offset: int) -> int:
        """Append one record; the bytes written, 0 once the cap stopped recording."""
        packed = self._encoder.record(data, offset=offset)
        if packed is None:
            return 0
        self._file.write(packed)
        return len(packed)


__all__ = [
    "MAGIC",
    "SUFFIX",
    "VERSION",
    "CaptureEncoder",
    "CaptureError",
    "CaptureHeader",
    "CaptureReader",
    "CaptureWriter",
    "Record",
    "capture_name",
    "offset_ns",
    "pack_header",
    "pack_record",
    "parse_capture",
    "parse_header",
    "parse_records",
    "wall_ns",
]
