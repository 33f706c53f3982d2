"""A durable local spool for batches the database could not take.

The spool is a directory of append-only segment files ``seg-<n>.spool``.  A record is

    magic "JTSP" | payload length (uint32 BE) | CRC-32 of the payload (uint32 BE) | payload

and :meth:`Spool.append` returns only after the record and the file are fsynced (and the
directory, when it created the segment), so a True return means the batch survives a crash or
power loss.  The total size of all segments is capped; an append that would exceed the cap is
refused (returns False) and the caller reports "not durable".

Appends go to one active segment.  :meth:`Spool.rotate` seals it; replay reads sealed segments
oldest first and deletes each once every record in it is stored.  A process that starts finds
the previous run's segments sealed.  A record cut short by a crash (short header or payload,
bad magic, CRC mismatch) ends its segment's replay: it was never reported durable, and nothing
after it in that segment was written by a healthy process.

All methods are thread-safe (appends run in worker threads).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from storage import metrics

logger = logging.getLogger(__name__)

MAGIC = b"JTSP"
_HEADER = struct.Struct(">4sII")
_SEGMENT_RE = re.compile(r"^seg-(\d{20})\.spool$")

# Segments are read whole at replay, so one is kept to 64 MiB (about 250,000 positions).
DEFAULT_SEGMENT_BYTES = 64 << 20

# Default cap on the whole spool: 1 GiB holds about 4 million positions (about 250 bytes each
# in binary COPY form), over ten minutes of a 5,000 positions/s fleet with the database down.
DEFAULT_MAX_BYTES = 1 << 30


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """See the module docstring.  ``max_bytes`` caps the sum of all segment sizes."""

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if max_bytes <= _HEADER.size:
            raise ValueError("max_bytes is too small to hold a record")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._active: Path | None = None
        self._active_fd: int | None = None
        self._sizes: dict[Path, int] = {}
        last = 0
        for path in self._segment_paths():
            self._sizes[path] = path.stat().st_size
            last = max(last, self._seq(path))
        self._next_seq = last + 1
        if self._sizes:
            logger.warning(
                "spool %s holds %d bytes from a previous run, to be replayed",
                self.directory,
                self.bytes_used,
            )
        metrics.SPOOL_BYTES.set(self.bytes_used)

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r}, max_bytes={self.max_bytes})"

    # -- inspection ---------------------------------------------------------------------------

    @staticmethod
    def _seq(path: Path) -> int:
        match = _SEGMENT_RE.match(path.name)
        assert match is not None
        return int(match.group(1))

    def _segment_paths(self) -> list[Path]:
        return sorted(
            (p for p in self.directory.iterdir() if _SEGMENT_RE.match(p.name)), key=self._seq
        )

    @property
    def bytes_used(self) -> int:
        return sum(self._sizes.values())

    def is_empty(self) -> bool:
        with self._lock:
            return not any(self._sizes.values())

    def sealed_segments(self) -> list[Path]:
        """Segments no longer appended to, oldest first."""
        with self._lock:
            return sorted((p for p in self._sizes if p != self._active), key=self._seq)

    # -- writing ------------------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """Append one record durably; False when the spool is full or the disk fails."""
        record = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self.bytes_used + len(record) > self.max_bytes:
                metrics.SPOOL_FULL.inc()
                logger.error(
                    "SPOOL FULL: %s holds %d of %d bytes; a batch of %d bytes is NOT durable",
                    self.directory,
                    self.bytes_used,
                    self.max_bytes,
                    len(record),
                )
                return False
            if (
                self._active is not None
                and self._sizes[self._active]
                and self._sizes[self._active] + len(record) > self.segment_bytes
            ):
                self._close_active()
            try:
                fd = self._active_fd if self._active_fd is not None else self._open_segment()
            except OSError:
                logger.exception("cannot create a spool segment in %s", self.directory)
                metrics.SPOOL_ERRORS.inc()
                return False
            assert self._active is not None
            offset = self._sizes[self._active]
            try:
                view = memoryview(record)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                logger.exception("spool write to %s failed; batch NOT durable", self._active)
                metrics.SPOOL_ERRORS.inc()
                try:  # do not leave a torn record before later good ones
                    os.ftruncate(fd, offset)
                except OSError:
                    self._close_active()
                return False
            self._sizes[self._active] = offset + len(record)
            metrics.SPOOL_BYTES.set(self.bytes_used)
            metrics.SPOOL_RECORDS_WRITTEN.inc()
            return True

    def _open_segment(self) -> int:
        path = self.directory / f"seg-{self._next_seq:020d}.spool"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._next_seq += 1
        _fsync_dir(self.directory)
        self._active, self._active_fd = path, fd
        self._sizes[path] = 0
        return fd

    def _close_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active = self._active_fd = None

    def rotate(self) -> None:
        """Seal the active segment (if any); the next append starts a new one."""
        with self._lock:
            if self._active is not None and self._sizes.get(self._active) == 0:
                return  # nothing in it: keep appending there
            self._close_active()

    def close(self) -> None:
        with self._lock:
            self._close_active()

    # -- replay -------------------------------------------------------------------------------

    def records(self, segment: Path) -> Iterator[bytes]:
        """The intact records of a sealed segment, in order, stopping at a torn one."""
        with segment.open("rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + _HEADER.size]
            if len(header) < _HEADER.size:
                self._torn(segment, pos, len(data), "short header")
                return
            magic, length, crc = _HEADER.unpack(header)
            payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if magic != MAGIC:
                self._torn(segment, pos, len(data), "bad magic")
                return
            if len(payload) < length:
                self._torn(segment, pos, len(data), "short payload")
                return
            if zlib.crc32(payload) != crc:
                self._torn(segment, pos, len(data), "CRC mismatch")
                return
            yield payload
            pos += _HEADER.size + length

    @staticmethod
    def _torn(segment: Path, pos: int, size: int, why: str) -> None:
        metrics.SPOOL_TORN_RECORDS.inc()
        logger.warning(
            "spool %s: %s at byte %d, ignoring the last %d bytes (a write cut short by a crash)",
            segment,
            why,
            pos,
            size - pos,
        )

    def quarantine(self, payload: bytes) -> Path:
        """Keep a record the database refused in its own file, outside the replay."""
        with self._lock:
            path = self.directory / f"rejected-{self._next_seq:020d}.copy"
            self._next_seq += 1
            with path.open("wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        metrics.SPOOL_QUARANTINED.inc()
        return path

    def remove(self, segment: Path) -> None:
        """Delete a sealed segment whose records are all stored."""
        with self._lock:
            if segment == self._active:
                raise ValueError("cannot remove the active segment")
            segment.unlink(missing_ok=True)
            self._sizes.pop(segment, None)
            metrics.SPOOL_BYTES.set(self.bytes_used)
        _fsync_dir(self.directory)
