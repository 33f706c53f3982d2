"""Multimedia uploads (0x0801, JT/T 808-2019 8.51): a file under the media directory and a row
in the ``multimedia`` table.

Layout: ``<media_dir>/<phone>/<media id>.<extension>``, the extension from the format code of
8.50 (0 ``jpg``, 1 ``tif``, 2 ``mp3``, 3 ``wav``, 4 ``wmv``, anything else ``bin``).  The media
id is the terminal's name for the item, so an upload of the same id (a retransmission after a
lost 0x8800, or an 0x8805 request for stored media) replaces file and row instead of adding a
copy.

Durability: the file is written under a temporary name, fsynced, renamed into place and its
directory fsynced; only then is the row committed (so a row always names a complete file), and
only then does :meth:`MediaStore.save` return, after which the server sends the 0x8800.  A crash
in between leaves at most a file without a row, which the terminal's retransmission replaces.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import trio

from protocol.messages.location import Location
from storage.errors import StorageError
from storage.sessions import ThreadConnection

logger = logging.getLogger(__name__)

# Format codes of 8.50.
EXTENSIONS = {0: "jpg", 1: "tif", 2: "mp3", 3: "wav", 4: "wmv"}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MediaFile:
    """One upload to store; the fields are those of 0x0801 (8.51) plus the receipt time."""

    phone: str
    media_id: int
    media_type: int
    media_format: int
    event: int
    channel: int
    location: Location | None
    data: bytes
    received_at: datetime


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredMedia:
    row_id: int
    path: Path
    size_bytes: int


def media_path(media_dir: Path, media: MediaFile) -> Path:
    """Where ``media`` is kept (see the module docstring)."""
    if not media.phone.isdigit():  # header phones are BCD digits; never a path component else
        raise StorageError(f"phone {media.phone!r} is not all digits")
    extension = EXTENSIONS.get(media.media_format, "bin")
    return media_dir / media.phone / f"{media.media_id}.{extension}"


_DELETE = "DELETE FROM multimedia WHERE phone = %(phone)s AND media_id = %(media_id)s"
_INSERT = """
INSERT INTO multimedia (phone, media_id, media_type, media_format, event, channel, path,
                        size_bytes, received_at, vehicle_id, device_time, alarm, status, lat, lon,
                        altitude_m, speed_kmh, direction)
VALUES (%(phone)s, %(media_id)s, %(media_type)s, %(media_format)s, %(event)s, %(channel)s,
        %(path)s, %(size_bytes)s, %(received_at)s,
        (SELECT id FROM vehicles WHERE phone = %(phone)s),
        %(device_time)s, %(alarm)s, %(status)s, %(lat)s, %(lon)s, %(altitude_m)s,
        %(speed_kmh)s, %(direction)s)
RETURNING id
"""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temporary file, fsync, rename,
    fsync of the directory and of a directory created for it)."""
    directory = path.parent
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
    _fsync_dir(directory)
    if created:
        _fsync_dir(directory.parent)


class MediaStore:
    """Files under ``media_dir`` and rows in ``multimedia``; one upload at a time, in a worker
    thread (uploads are rare next to positions, and each is written and fsynced whole)."""

    def __init__(self, dsn: str, media_dir: Path) -> None:
        self.media_dir = media_dir
        self._link = ThreadConnection(dsn)

    def save_sync(self, media: MediaFile) -> StoredMedia:
        path = media_path(self.media_dir, media)
        try:
            write_durably(path, media.data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        location = media.location
        params: dict[str, Any] = {
            "phone": media.phone,
            "media_id": media.media_id,
            "media_type": media.media_type,
            "media_format": media.media_format,
            "event": media.event,
            "channel": media.channel,
            "path": str(path),
            "size_bytes": len(media.data),
            "received_at": media.received_at,
            "device_time": location.time if location else None,
            "alarm": location.alarm if location else None,
            "status": location.status if location else None,
            "lat": location.lat if location else None,
            "lon": location.lon if location else None,
            "altitude_m": location.altitude_m if location else None,
            "speed_kmh": location.speed_kmh if location else None,
            "direction": location.direction if location else None,
        }

        def insert(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute(_DELETE, params)
                row = conn.execute(_INSERT, params).fetchone()
            assert row is not None  # INSERT ... RETURNING gives one row
            return int(row[0])

        try:
            row_id = self._link.run(insert)
        except psycopg.Error as exc:
            raise StorageError(f"cannot record {path}: {exc}") from exc
        logger.info("phone=%s media %s stored as %s", media.phone, media.media_id, path)
        return StoredMedia(row_id=row_id, path=path, size_bytes=len(media.data))

    async def save(self, media: MediaFile) -> StoredMedia:
        """Store ``media`` durably; raises :class:`StorageError`."""
        return await trio.to_thread.run_sync(self.save_sync, media, limiter=self._link.limiter)

    def close(self) -> None:
        self._link.close()
