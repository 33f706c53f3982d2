"""Position rows: the pure builder and the connection-free binary COPY encoder."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.copy import Copy, FileWriter

from protocol.fields import GMT8
from protocol.header import Header
from protocol.messages.location import (
    STATUS_SOUTH,
    STATUS_WEST,
    AlarmEventId,
    ExtendedSignal,
    Fuel,
    GnssSatellites,
    Location,
    Mileage,
    RawItem,
    SignalStrength,
)
from storage.pgstore import JsonTextDumper
from storage.rows import (
    COLUMN_NAMES,
    COLUMN_TYPES,
    PositionRow,
    encode_copy_binary,
    fix_key,
    position_row,
    position_rows,
)
from tests.storage_fixtures import pg_dsn  # noqa: F401


def scalar(item_type: Any, value: int) -> Any:
    """An item of the factory-made scalar types (mypy cannot see their fields)."""
    return item_type(value=value)


HEADER = Header(msg_id=0x0200, body_length=0, phone="013800138000", serial=77)
RECEIVED = datetime(2024, 5, 1, 4, 0, 1, 250_000, tzinfo=UTC)


def _location(**overrides: object) -> Location:
    fields: dict[str, object] = {
        "alarm": 0,
        "status": 0b11,
        "latitude": 22_543_210,
        "longitude": 113_912_345,
        "altitude_m": 30,
        "speed": 605,
        "direction": 90,
        "time": datetime(2024, 5, 1, 12, 0, 0, tzinfo=GMT8),
    }
    fields.update(overrides)
    return Location(**fields)  # type: ignore[arg-type]


def test_basic_fields_and_units() -> None:
    row = position_row(HEADER, _location(), RECEIVED)
    assert row.device_time == datetime(2024, 5, 1, 12, tzinfo=GMT8)
    assert row.phone == "013800138000"
    assert (row.msg_id, row.serial, row.batch_type) == (0x0200, 77, None)
    assert row.received_at == RECEIVED
    assert (row.lat, row.lon) == (22.54321, 113.912345)
    assert row.speed_kmh == 60.5
    assert (row.altitude_m, row.direction, row.alarm, row.status) == (30, 90, 0, 3)
    assert row.extras is None
    assert row.vehicle_id is None
    assert row._fields == COLUMN_NAMES


def test_signs_follow_status_bits() -> None:
    row = position_row(HEADER, _location(status=STATUS_SOUTH | STATUS_WEST), RECEIVED)
    assert (row.lat, row.lon) == (-22.54321, -113.912345)
    assert round(abs(row.lat) * 1e6) == 22_543_210


def test_items_go_to_columns_and_the_rest_to_extras() -> None:
    items = (
        Mileage(value=123_456),
        Fuel(value=455),
        scalar(SignalStrength, 25),
        scalar(GnssSatellites, 11),
        scalar(ExtendedSignal, 0x80000001),
        AlarmEventId(value=7),
        RawItem(item_id=0xE1, data=b"\x01\x02"),
        RawItem(item_id=0xE1, data=b"\x03"),
        Mileage(value=1),  # a second odometer item: kept in extras, not lost
    )
    row = position_row(HEADER, _location(items=items, leftover=b"\xee"), RECEIVED)
    assert row.mileage_km == 12345.6
    assert row.fuel_l == 45.5
    assert (row.signal_strength, row.gnss_satellites) == (25, 11)
    assert row.extended_signal == 0x80000001
    assert row.recorder_speed_kmh is None
    assert row.io_status is None
    assert row.analog is None
    assert row.extras is not None
    assert json.loads(row.extras) == {
        "0x04": {"alarm_event_id": 7},
        "0xe1": [{"raw": "0102"}, {"raw": "03"}],
        "0x01": {"mileage_km": 0.1},
        "leftover": "ee",
        "items_clean": False,
    }


def test_impossible_device_time_uses_arrival_and_says_so() -> None:
    row = position_row(HEADER, _location(time=None), RECEIVED)
    assert row.device_time == RECEIVED
    assert row.extras is not None
    assert json.loads(row.extras) == {"time_invalid": True}


def test_naive_received_at_is_refused() -> None:
    try:
        position_row(HEADER, _location(), datetime(2024, 5, 1))
    except ValueError:
        return
    raise AssertionError("naive received_at accepted")


def test_fix_key_ignores_time_and_message_but_not_content() -> None:
    base = _location()
    assert fix_key(base) == fix_key(_location(time=datetime(2030, 1, 1, tzinfo=GMT8)))
    assert fix_key(base) != fix_key(_location(alarm=1))
    assert fix_key(base) != fix_key(_location(speed=606))
    assert fix_key(base) == fix_key(_location(items=(Mileage(value=5),)))  # items: not part
    assert isinstance(fix_key(base), int)
    assert -(2**63) <= fix_key(base) < 2**63


def test_fix_key_is_stable_across_releases() -> None:
    # If this value changes, retransmissions of already stored rows would be stored twice.
    assert fix_key(_location()) == FIX_KEY_OF_DEFAULT_LOCATION


FIX_KEY_OF_DEFAULT_LOCATION = 4887442953143611636


def test_batch_rows_share_header_and_type() -> None:
    header = Header(msg_id=0x0704, body_length=0, phone="013800138000", serial=9)
    locs = [_location(time=datetime(2024, 5, 1, 12, 0, s, tzinfo=GMT8)) for s in range(3)]
    rows = position_rows(header, locs, RECEIVED, batch_type=1, vehicle_id=5)
    assert [r.batch_type for r in rows] == [1, 1, 1]
    assert [r.msg_id for r in rows] == [0x0704] * 3
    assert [r.vehicle_id for r in rows] == [5, 5, 5]
    assert len({r.device_time for r in rows}) == 3


def _sample_rows() -> list[PositionRow]:
    items = (Mileage(value=99), RawItem(item_id=0xF3, data=b"\x00\xff"))
    rows = [
        position_row(
            HEADER,
            _location(
                latitude=4_294_967_295,  # a DWORD beyond any real latitude still fits
                direction=65535,
                altitude_m=65535,
                alarm=0xFFFFFFFF,
                status=0xFFFFFFFF,
                items=items,
                time=datetime(2024, 5, 1, 12, 0, i, tzinfo=GMT8),
            ),
            RECEIVED + timedelta(microseconds=i),
        )
        for i in range(3)
    ]
    rows.append(position_row(HEADER, _location(time=None), RECEIVED))
    return rows


def test_encoder_matches_psycopg_binary_copy(pg_dsn: str) -> None:  # noqa: F811
    rows = _sample_rows()
    with psycopg.connect(pg_dsn) as conn:
        conn.adapters.register_dumper(None, JsonTextDumper)
        buf = io.BytesIO()
        with conn.cursor() as cur:
            copy = Copy(cur, binary=True, writer=FileWriter(buf))
            copy.set_types(COLUMN_TYPES)
            with copy:
                for row in rows:
                    copy.write_row(row)
        conn.rollback()
    assert encode_copy_binary(rows) == buf.getvalue()
