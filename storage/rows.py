"""Position rows: built purely from decoded location reports, encoded for binary COPY.

One :class:`PositionRow` is one position as stored in the ``positions`` table; its fields are
the table's columns in COPY order (:data:`COLUMNS`).  :func:`position_row` builds one from the
frame header and a :class:`~protocol.messages.location.Location`; it does no I/O and reads no
clock (``received_at`` is passed in).

Column choices (see also storage/schema.py):

* ``lat``/``lon`` are signed degrees as ``double precision``: the wire's unsigned 1e-6 degree
  DWORD with the sign from status bits 2/3.  A double holds every DWORD/1e6 exactly enough that
  ``round(abs(lat) * 1e6)`` gives the wire value back, and SQL reports need no conversion.
* Wire WORDs (altitude, direction, msg id, serial, IO status) are ``integer`` and DWORDs
  (alarm, status, analog, extended signal) ``bigint``, so that any value a device sends fits;
  a narrower column would turn one odd device into a rejected batch.
* Values the wire carries in tenths (speed, odometer, fuel, recorder speed) are stored in their
  natural unit as ``double precision``: ``speed_kmh`` = speed / 10.
* ``extras`` (jsonb) holds every additional item without a column of its own, keyed ``"0x04"``
  etc. as :meth:`Location.extras_json` renders them (vendor items as hex), plus
  ``"leftover"``/``"items_clean"`` when the item walk did not end cleanly and
  ``"time_invalid": true`` when the device sent an impossible time.  It is kept as JSON text in
  the row, serialised once here, so the writer never touches it.

The natural key is ``(phone, device_time, fix_key)``; see :func:`fix_key` for why it is not
``(phone, device_time, msg_id, serial)``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from protocol.header import Header
from protocol.messages.location import (
    STATUS_SOUTH,
    STATUS_WEST,
    AnalogInputs,
    ExtendedSignal,
    Fuel,
    GnssSatellites,
    IoStatus,
    Location,
    Mileage,
    RecorderSpeed,
    SignalStrength,
)
from protocol.phone import canonical_phone

# (column, PostgreSQL type) in COPY order; PositionRow's fields follow the same order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("device_time", "timestamptz"),
    ("phone", "text"),
    ("fix_key", "int8"),
    ("received_at", "timestamptz"),
    ("msg_id", "int4"),
    ("serial", "int4"),
    ("batch_type", "int2"),
    ("alarm", "int8"),
    ("status", "int8"),
    ("lat", "float8"),
    ("lon", "float8"),
    ("altitude_m", "int4"),
    ("speed_kmh", "float8"),
    ("direction", "int4"),
    ("mileage_km", "float8"),
    ("fuel_l", "float8"),
    ("recorder_speed_kmh", "float8"),
    ("signal_strength", "int2"),
    ("gnss_satellites", "int2"),
    ("io_status", "int4"),
    ("analog", "int8"),
    ("extended_signal", "int8"),
    ("extras", "jsonb"),
    ("vehicle_id", "int8"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in COLUMNS)
COLUMN_TYPES: tuple[str, ...] = tuple(pg_type for _, pg_type in COLUMNS)
# The natural key; the unique index is on exactly these columns (device_time is the partition
# key, which a unique index on a partitioned table must include).
NATURAL_KEY: tuple[str, ...] = ("phone", "device_time", "fix_key")


class PositionRow(NamedTuple):
    """One row of ``positions``, fields in COPY order.  Build it with :func:`position_row`.

    ``vehicle_id`` is last so the writer can fill it from its phone-to-vehicle map with one
    tuple concatenation; None means "resolve from ``vehicles.phone`` when stored".
    """

    device_time: datetime
    phone: str
    fix_key: int
    received_at: datetime
    msg_id: int
    serial: int
    batch_type: int | None
    alarm: int
    status: int
    lat: float
    lon: float
    altitude_m: int
    speed_kmh: float
    direction: int
    mileage_km: float | None
    fuel_l: float | None
    recorder_speed_kmh: float | None
    signal_strength: int | None
    gnss_satellites: int | None
    io_status: int | None
    analog: int | None
    extended_signal: int | None
    extras: str | None
    vehicle_id: int | None = None


assert PositionRow._fields == COLUMN_NAMES

_FIX = struct.Struct(">IIIIHHH")  # table 23: alarm, status, lat, lon, altitude, speed, direction


def fix_key(location: Location) -> int:
    """A signed 64-bit digest of the basic information except the time (table 23).

    Dedup key rationale: a terminal re-sends a position it got no answer for, and not always in
    the same message: it may retransmit the 0x0200 with a new serial, or keep it as a
    blind-area position and upload it later in a 0x0704 (8.43) with another message id and
    serial.  A crash between our commit and our acknowledgement produces exactly that.  So the
    key is what identifies the fix itself -- terminal, device time and this digest of alarm,
    status, position, altitude, speed and direction -- and never msg id/serial.  Two reports of
    the same second that differ in any of those fields are both kept; an exact repeat is one
    row.  BLAKE2b is used because its output is fixed by its specification (Python's ``hash``
    is not stable across versions, and the key must survive upgrades).
    """
    packed = _FIX.pack(
        location.alarm,
        location.status,
        location.latitude,
        location.longitude,
        location.altitude_m,
        location.speed,
        location.direction,
    )
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "big", signed=True)


# Items with a column of their own: item type -> PositionRow field index and scale.
_ITEM_COLUMNS: dict[type, tuple[int, float | None]] = {
    Mileage: (COLUMN_NAMES.index("mileage_km"), 10.0),
    Fuel: (COLUMN_NAMES.index("fuel_l"), 10.0),
    RecorderSpeed: (COLUMN_NAMES.index("recorder_speed_kmh"), 10.0),
    SignalStrength: (COLUMN_NAMES.index("signal_strength"), None),
    GnssSatellites: (COLUMN_NAMES.index("gnss_satellites"), None),
    IoStatus: (COLUMN_NAMES.index("io_status"), None),
    AnalogInputs: (COLUMN_NAMES.index("analog"), None),
    ExtendedSignal: (COLUMN_NAMES.index("extended_signal"), None),
}
_FIRST_ITEM_COLUMN = COLUMN_NAMES.index("mileage_km")
_ITEM_COLUMN_COUNT = COLUMN_NAMES.index("extras") - _FIRST_ITEM_COLUMN


def position_row(
    header: Header,
    location: Location,
    received_at: datetime,
    *,
    batch_type: int | None = None,
    vehicle_id: int | None = None,
) -> PositionRow:
    """The row for one position: pure, no I/O.

    ``header`` gives phone, message id and serial (for 0x0704 every position of the batch
    shares them); ``batch_type`` is the 0x0704 type (0 normal, 1 blind-area back-fill) and
    None for the other messages.  ``received_at`` must be timezone-aware.  When the device sent
    an impossible time (``location.time is None``) the row's ``device_time`` is
    ``received_at`` and ``extras`` says ``"time_invalid": true``; such a row is keyed by its
    arrival, so a retransmission of it is stored again.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    values: list[Any] = [None] * _ITEM_COLUMN_COUNT
    extras: dict[str, Any] = {}
    for item in location.items:
        column = _ITEM_COLUMNS.get(type(item))
        if column is not None:
            slot = column[0] - _FIRST_ITEM_COLUMN
            if values[slot] is None:
                raw: int = getattr(item, "value")  # noqa: B009 - every _ITEM_COLUMNS type has it
                values[slot] = raw if column[1] is None else raw / column[1]
                continue
        key = f"0x{item.item_id:02x}"
        value = item.to_json()
        previous = extras.get(key)
        if previous is None:
            extras[key] = value
        elif isinstance(previous, list):
            previous.append(value)
        else:
            extras[key] = [previous, value]
    if location.leftover:
        extras["leftover"] = location.leftover.hex()
    if not location.items_clean:
        extras["items_clean"] = False
    device_time = location.time
    if device_time is None:
        device_time = received_at
        extras["time_invalid"] = True
    (
        mileage_km,
        fuel_l,
        recorder_speed_kmh,
        signal_strength,
        gnss_satellites,
        io_status,
        analog,
        extended_signal,
    ) = values
    status = location.status
    lat = location.latitude / 1e6
    lon = location.longitude / 1e6
    return PositionRow(
        device_time,
        canonical_phone(header.phone),  # one identity for 2013 and 2019 headers
        fix_key(location),
        received_at,
        header.msg_id,
        header.serial,
        batch_type,
        location.alarm,
        status,
        -lat if status & STATUS_SOUTH else lat,
        -lon if status & STATUS_WEST else lon,
        location.altitude_m,
        location.speed / 10,
        location.direction,
        mileage_km,
        fuel_l,
        recorder_speed_kmh,
        signal_strength,
        gnss_satellites,
        io_status,
        analog,
        extended_signal,
        json.dumps(extras, separators=(",", ":"), ensure_ascii=False) if extras else None,
        vehicle_id,
    )


def position_rows(
    header: Header,
    locations: Iterable[Location],
    received_at: datetime,
    *,
    batch_type: int | None = None,
    vehicle_id: int | None = None,
) -> list[PositionRow]:
    """:func:`position_row` for each location of one message (0x0200: one, 0x0704: many)."""
    return [
        position_row(header, loc, received_at, batch_type=batch_type, vehicle_id=vehicle_id)
        for loc in locations
    ]


# ---------------------------------------------------------------------------------------------
# Binary COPY encoding without a connection (the spool's record format)

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # signature, flags, ext
COPY_TRAILER = struct.pack(">h", -1)
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NULL = struct.pack(">i", -1)
_INT2 = struct.Struct(">ih")
_INT4 = struct.Struct(">ii")
_INT8 = struct.Struct(">iq")
_FLOAT8 = struct.Struct(">id")
_FIELD_COUNT = struct.pack(">h", len(COLUMNS))


def _enc_timestamptz(value: datetime) -> bytes:
    if value.tzinfo is None:
        raise ValueError("timestamptz needs an aware datetime")
    return _INT8.pack(8, (value - _PG_EPOCH) // _MICROSECOND)


def _enc_text(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">i", len(data)) + data


def _enc_jsonb(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">ib", len(data) + 1, 1) + data  # jsonb binary: version byte 1, text


_ENCODERS: dict[str, Any] = {
    "timestamptz": _enc_timestamptz,
    "text": _enc_text,
    "jsonb": _enc_jsonb,
    "int2": lambda v: _INT2.pack(2, v),
    "int4": lambda v: _INT4.pack(4, v),
    "int8": lambda v: _INT8.pack(8, v),
    "float8": lambda v: _FLOAT8.pack(8, v),
}
_COLUMN_ENCODERS = tuple(_ENCODERS[pg_type] for pg_type in COLUMN_TYPES)


def encode_copy_binary(rows: Sequence[Sequence[Any]]) -> bytes:
    """The PostgreSQL binary COPY stream (signature, rows, trailer) for ``rows``.

    Pure Python and about 4 us a row: the writer's fast path lets psycopg's C formatter do this
    on the connection; this one serves the spool, which needs the bytes without a database.
    A test checks both produce the same bytes.
    """
    out = bytearray(COPY_SIGNATURE)
    encoders = _COLUMN_ENCODERS
    for row in rows:
        out += _FIELD_COUNT
        for enc, value in zip(encoders, row, strict=True):
            out += _NULL if value is None else enc(value)
    out += COPY_TRAILER
    return bytes(out)
