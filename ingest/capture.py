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
:func:`read_capture` reads the format back.  The format itself (packing and parsing) lives in
:mod:`protocol.capture`, shared with the simulator and ``jt808 replay``; this module only does
the server's file I/O.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import trio

from protocol.capture import (
    SUFFIX,
    CaptureEncoder,
    CaptureError,
    CaptureHeader,
    capture_name,
    offset_ns,
    parse_capture,
)

logger = logging.getLogger(__name__)

__all__ = ["SUFFIX", "CaptureError", "CaptureHeader", "CaptureWriter", "read_capture"]


class CaptureWriter:
    """Appends one connection's records.  Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(
        self, file: BinaryIO, path: Path, encoder: CaptureEncoder, *, start: float
    ) -> None:
        self._file = file
        self.path = path
        self._encoder = encoder
        self._start = start

    @property
    def written(self) -> int:
        return self._encoder.written

    @property
    def stopped(self) -> bool:
        return self._encoder.stopped

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
        path = directory / capture_name(wall, pid=os.getpid(), connection=connection)
        file = await trio.to_thread.run_sync(_create, path)
        encoder = CaptureEncoder(start=wall, peer=peer, max_bytes=max_bytes)
        writer = cls(file, path, encoder, start=start)
        await trio.to_thread.run_sync(file.write, encoder.header())
        return writer

    async def record(self, data: bytes, *, now: float) -> int:
        """Append a record for ``data`` received at trio time ``now``; returns bytes written."""
        if self._encoder.stopped:
            return 0
        packed = self._encoder.record(data, offset=offset_ns(now, self._start))
        if packed is None:
            logger.warning(
                "capture %s reached %s bytes; recording stopped",
                self.path,
                self._encoder.max_bytes,
            )
            return 0
        await trio.to_thread.run_sync(self._file.write, packed)
        return len(packed)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._file.close)


def _create(path: Path) -> BinaryIO:
    return path.open("xb")


def read_capture(path: Path) -> tuple[CaptureHeader, list[tuple[int, bytes]]]:
    """Read a capture file: its header and its (offset_ns, data) records."""
    header, records = parse_capture(path.read_bytes())
    return header, [(record.offset_ns, record.data) for record in records]
