"""Reporting views, the daily aggregate and the CSV export, on a small known data set."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from protocol.fields import GMT8
from protocol.header import Header
from protocol.messages.location import Location, Mileage
from storage.pgstore import PgPositionStore
from storage.reports import (
    EXPORT_COLUMNS,
    export_positions_csv,
    positions_per_unit,
    refresh_daily_stats,
)
from storage.rows import PositionRow, position_row
from storage.schema import migrate
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tools.cli import main

DAY = datetime(2024, 5, 1, 8, 0, tzinfo=GMT8)
RECEIVED = datetime(2024, 5, 1, 0, 0, tzinfo=UTC)
PHONES = {
    "013800000001": ("粤B00001", "unit-a", "platform"),
    "013800000002": ("粤B00002", "unit-a", "rental"),
    "013800000003": ("粤B00003", "unit-b", "retained"),
}


def _row(phone: str, at: datetime, speed_kmh: float, odometer_km: float) -> PositionRow:
    location = Location(
        alarm=0,
        status=0b10,
        latitude=22_500_000,
        longitude=113_900_000,
        altitude_m=10,
        speed=round(speed_kmh * 10),
        direction=0,
        time=at,
        items=(Mileage(value=round(odometer_km * 10)),),
    )
    header = Header(msg_id=0x0200, body_length=0, phone=phone, serial=1)
    return position_row(header, location, RECEIVED)


@pytest.fixture
def reports_db(pg_schema_dsn: str) -> str:  # noqa: F811
    rows: list[PositionRow] = []
    # vehicle 1: drives 10:00-10:04 (5 moving minutes), parked at 10:05-10:09, odometer +12.5
    for minute in range(10):
        moving = minute < 5
        rows.append(
            _row(
                "013800000001",
                DAY + timedelta(hours=2, minutes=minute),
                40.0 if moving else 0.0,
                1000.0 + (2.5 * minute if moving else 12.5),
            )
        )
    # vehicle 2: two fixes in the same minute, moving: one minute of driving
    rows.append(_row("013800000002", DAY + timedelta(seconds=10), 30.0, 50.0))
    rows.append(_row("013800000002", DAY + timedelta(seconds=40), 30.0, 50.2))
    # next China day (16:30 UTC = 00:30 in Beijing) for vehicle 3
    rows.append(_row("013800000003", datetime(2024, 5, 1, 16, 30, tzinfo=UTC), 0.0, 7.0))
    # a terminal not fitted to any vehicle
    rows.append(_row("013899999999", DAY, 0.0, 1.0))
    with psycopg.connect(pg_schema_dsn) as conn:
        migrate(conn, now=RECEIVED, days_ahead=2)
        for phone, (plate, unit, category) in PHONES.items():
            conn.execute(
                "INSERT INTO vehicles (plate, phone, unit, category) VALUES (%s, %s, %s, %s)",
                (plate, phone, unit, category),
            )
        conn.commit()
    store = PgPositionStore(pg_schema_dsn)
    try:
        store.write_rows(rows, staging=True)  # the staging path fills vehicle ids
    finally:
        store.close()
    return pg_schema_dsn


def test_latest_position_per_vehicle(reports_db: str) -> None:
    with psycopg.connect(reports_db) as conn:
        rows = conn.execute(
            "SELECT plate, device_time, speed_kmh FROM vehicle_latest_position ORDER BY plate"
        ).fetchall()
    assert rows == [
        ("粤B00001", DAY + timedelta(hours=2, minutes=9), 0.0),
        ("粤B00002", DAY + timedelta(seconds=40), 30.0),
        ("粤B00003", datetime(2024, 5, 1, 16, 30, tzinfo=UTC), 0.0),
    ]


def test_daily_distance_and_driving_time(reports_db: str) -> None:
    with psycopg.connect(reports_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM vehicle_daily_stats").fetchone() == (0,)
        refresh_daily_stats(conn)
        refresh_daily_stats(conn)  # concurrently refreshable, repeatable
        rows = conn.execute(
            "SELECT plate, day, positions, round(distance_km::numeric, 1), driving_time_s "
            "FROM vehicle_daily_stats ORDER BY plate, day"
        ).fetchall()
        per_unit = conn.execute(
            "SELECT unit, category, day, vehicles, positions, driving_time_s "
            "FROM unit_category_daily ORDER BY unit, category, day"
        ).fetchall()
    may1, may2 = date(2024, 5, 1), date(2024, 5, 2)
    assert [(p, d, n, float(km), s) for p, d, n, km, s in rows] == [
        ("粤B00001", may1, 10, 12.5, 300),
        ("粤B00002", may1, 2, 0.2, 60),
        ("粤B00003", may2, 1, 0.0, 0),
    ]
    assert per_unit == [
        ("unit-a", "platform", may1, 1, 10, 300),
        ("unit-a", "rental", may1, 1, 2, 60),
        ("unit-b", "retained", may2, 1, 1, 0),
    ]


def test_positions_per_unit(reports_db: str) -> None:
    start, end = datetime(2024, 5, 1, tzinfo=GMT8), datetime(2024, 5, 3, tzinfo=GMT8)
    with psycopg.connect(reports_db) as conn:
        counts = positions_per_unit(conn, start, end)
    assert [(c.unit, c.category, c.vehicles, c.positions) for c in counts] == [
        ("unit-a", "platform", 1, 10),
        ("unit-a", "rental", 1, 2),
        ("unit-b", "retained", 1, 1),
        (None, None, 0, 1),
    ]


def test_export_csv_for_a_unit_and_range(reports_db: str) -> None:
    out = io.BytesIO()
    start = DAY
    end = DAY + timedelta(hours=2, minutes=3)  # excludes 10:03 onwards
    with psycopg.connect(reports_db) as conn:
        written = export_positions_csv(conn, out, start, end, unit="unit-a")
    text = out.getvalue().decode()
    assert written == len(out.getvalue())
    records = list(csv.reader(io.StringIO(text)))
    assert tuple(records[0]) == EXPORT_COLUMNS
    body = records[1:]
    assert [r[1] for r in body] == ["粤B00002", "粤B00002", "粤B00001", "粤B00001", "粤B00001"]
    assert body[0][0] == "2024-05-01 08:00:10+08"  # China time
    assert body[0][2:5] == ["unit-a", "rental", "013800000002"]
    everything = io.BytesIO()
    with psycopg.connect(reports_db) as conn:
        export_positions_csv(conn, everything, start, start + timedelta(days=2))
    assert len(everything.getvalue().decode().splitlines()) == 1 + 14


def test_export_needs_aware_times(reports_db: str) -> None:
    with psycopg.connect(reports_db) as conn, pytest.raises(ValueError, match="aware"):
        export_positions_csv(conn, io.BytesIO(), datetime(2024, 5, 1), DAY)


def test_export_command_reports_rows_not_bytes(
    reports_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "positions.csv"
    argv = ["export", "--from", "2024-05-01T08:00", "--to", "2024-05-03T08:00"]
    assert main([*argv, "--csv", str(target), "--dsn", reports_db, "--log-level", "ERROR"]) == 0
    assert capsys.readouterr().out == f"exported 14 rows to {target}\n"
    assert len(target.read_text(encoding="utf-8").splitlines()) == 1 + 14
    # The former spelling still works; to standard output, the result line goes to stderr.
    assert main([*argv, "-o", str(target), "--dsn", reports_db]) == 0
    assert capsys.readouterr().out == f"exported 14 rows to {target}\n"
    assert main([*argv, "--dsn", reports_db]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 + 14
    assert captured.err == "exported 14 rows to standard output\n"
    rows: list[tuple[int, int]] = []
    with psycopg.connect(reports_db) as conn:
        export_positions_csv(
            conn,
            io.BytesIO(),
            DAY,
            DAY + timedelta(days=2),
            progress=lambda r, b: rows.append((r, b)),
        )
    assert rows[-1][0] == 14
