"""Recording each connection's inbound bytes, for replay and debugging.

With ``capture_dir`` set, every connection writes one file
``<capture_dir>/<UTC start, %Y%m%dT%H%M%S.%fZ>-<process id>-<connection number>.jt808cap``
(the process id keeps the names of several worker processes apart).
All integers are big-endian.

File header::

    magic           8 bytes   b"JT808CAP"
    version         u16       1
    start_wall_ns   u64       wall-clock start of the connection, ns since the Unix epoch (UTC)
    peer_length     u16
    peer            bytes     the peer address as UTF-8 text, "host:port"

Then one record per received chunk, as the socket delivered it::

    offset_ns       u64       monotonic ns since the connection started
    length          u32
    data            bytes     exactly ``length`` bytes

A file ends after its last whole record (a truncated tail means the process died mid-write).
Recording stops for a connection once its file would pass ``capture_max_bytes``.
:func:`read_capture` reads the format back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import trio

logger = logging.getLogger(__name__)

MAGIC = b"JT808CAP"
VERSION = 1
_HEAD = struct.Struct(">8sHQH")
_RECORD = struct.Struct(">QI")
SUFFIX = ".jt808cap"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CaptureHeader:
    version: int
    start: datetime
    peer: str


class CaptureError(Exception):
    """The file is not a capture of a version we read."""


class CaptureWriter:
    """Appends one connection's records.  Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(self, file: BinaryIO, path: Path, *, start: float, cap: int) -> None:
        self._file = file
        self.path = path
        self._start = start
        self._cap = cap
        self.written = 0
        self.stopped = False

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        connection: int,
        peer: str,
        wall: datetime,
        start: float,
        max_bytes: int,
    ) -> CaptureWriter:
        """Create the file; ``start`` is the trio clock at connection start."""
        name = f"{wall.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}-{os.getpid()}-{connection}{SUFFIX}"
        path = directory / name
        file = await trio.to_thread.run_sync(_create, path)
        writer = cls(file, path, start=start, cap=max_bytes)
        peer_bytes = peer.encode("utf-8")[:0xFFFF]
        wall_ns = (wall - _EPOCH) // _MICROSECOND * 1000
        head = _HEAD.pack(MAGIC, VERSION, wall_ns, len(peer_bytes)) + peer_bytes
        await writer._write(head)
        return writer

    async def record(self, data: bytes, *, now: float) -> int:
        """Append a record for ``data`` received at trio time ``now``; returns bytes written."""
        if self.stopped:
            return 0
        size = _RECORD.size + len(data)
        if self.written + size > self._cap:
            self.stopped = True
            logger.warning("capture %s reached %s bytes; recording stopped", self.path, self._cap)
            return 0
        offset_ns = max(0, round((now - self._start) * 1e9))
        await self._write(_RECORD.pack(offset_ns, len(data)) + data)
        return size

    async def _write(self, data: bytes) -> None:
        await trio.to_thread.run_sync(self._file.write, data)
        self.written += len(data)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._file.close)


def _create(path: Path) -> BinaryIO:
    return path.open("xb")


def read_capture(path: Path) -> tuple[CaptureHeader, list[tuple[int, bytes]]]:
    """Read a capture file: its header and its (offset_ns, data) records."""
    data = path.read_bytes()
    header, records = parse_capture(data)
    return header, list(records)


def parse_capture(data: bytes) -> tuple[CaptureHeader, Iterator[tuple[int, bytes]]]:
    if len(data) < _HEAD.size:
        raise CaptureError("too short for a capture header")
    magic, version, wall_ns, peer_length = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise CaptureError(f"not a version {VERSION} capture file")
    pos = _HEAD.size + peer_length
    peer = data[_HEAD.size : pos].decode("utf-8", errors="replace")
    start = _EPOCH + (wall_ns // 1000) * _MICROSECOND
    header = CaptureHeader(version=version, start=start, peer=peer)

    def records() -> Iterator[tuple[int, bytes]]:
        at = pos
        while at + _RECORD.size <= len(data):
            offset_ns, length = _RECORD.unpack_from(data, at)
            chunk = data[at + _RECORD.size : at + _RECORD.size + length]
            if len(chunk) != length:
                return
            yield offset_ns, chunk
            at += _RECORD.size + length

    return header, records()
