"""Reports over the stored positions: aggregate refresh, per-unit counts and CSV export.

The views themselves are created by migration 3 (storage/schema.py):

* ``vehicle_latest_position`` -- the newest position of each vehicle's terminal;
* ``vehicle_daily_stats`` -- per vehicle and China-time day: positions, distance_km
  (odometer), driving_time_s, with plate, unit and category;
* ``unit_category_daily`` -- the same summed per owning unit and category.

The daily figures come from ``daily_vehicle_stats_mv``: a materialized view refreshed by
:func:`refresh_daily_stats` without TimescaleDB, a continuous aggregate kept up by its policy
with it.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import IO, Any

import psycopg
from psycopg.pq import TransactionStatus

from storage.errors import StorageError
from storage.schema import REPORT_TZ, current_backend

# Columns of the CSV export, in order.
EXPORT_COLUMNS = (
    "device_time",
    "plate",
    "unit",
    "category",
    "phone",
    "lat",
    "lon",
    "altitude_m",
    "speed_kmh",
    "direction",
    "alarm",
    "status",
    "mileage_km",
)

_EXPORT_SELECT = (
    "SELECT p.device_time, v.plate, v.unit, v.category, p.phone, p.lat, p.lon, p.altitude_m, "
    "p.speed_kmh, p.direction, p.alarm, p.status, p.mileage_km "
    "FROM positions p LEFT JOIN vehicles v ON v.id = p.vehicle_id "
    "WHERE p.device_time >= %(start)s AND p.device_time < %(end)s "
    "AND (%(unit)s::text IS NULL OR v.unit = %(unit)s::text) "
    "ORDER BY p.device_time, p.phone"
)


def _require_idle(conn: psycopg.Connection[Any], what: str) -> None:
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise StorageError(f"{what} needs a connection that is not inside a transaction")


def refresh_daily_stats(conn: psycopg.Connection[Any]) -> None:
    """Bring ``daily_vehicle_stats_mv`` up to date (readers are not blocked meanwhile)."""
    _require_idle(conn, "refresh_daily_stats()")
    autocommit = conn.autocommit
    conn.autocommit = True  # refresh_continuous_aggregate refuses to run in a transaction
    try:
        if current_backend(conn) == "timescaledb":
            conn.execute("CALL refresh_continuous_aggregate('positions_minute_mv', NULL, NULL)")
            conn.execute("CALL refresh_continuous_aggregate('daily_vehicle_stats_mv', NULL, NULL)")
        else:
            conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY daily_vehicle_stats_mv")
    finally:
        conn.autocommit = autocommit


@dataclasses.dataclass(frozen=True, slots=True)
class UnitCount:
    unit: str | None  # None: positions of terminals not fitted to any vehicle
    category: str | None
    vehicles: int
    positions: int


def positions_per_unit(
    conn: psycopg.Connection[Any], start: datetime, end: datetime
) -> list[UnitCount]:
    """Positions in [start, end) per owning unit and vehicle category, from the raw table."""
    rows = conn.execute(
        "SELECT v.unit, v.category, count(DISTINCT p.vehicle_id), count(*) "
        "FROM positions p LEFT JOIN vehicles v ON v.id = p.vehicle_id "
        "WHERE p.device_time >= %s AND p.device_time < %s "
        "GROUP BY v.unit, v.category ORDER BY v.unit NULLS LAST, v.category NULLS LAST",
        (start, end),
    ).fetchall()
    return [UnitCount(*row) for row in rows]


def export_positions_csv(
    conn: psycopg.Connection[Any],
    out: IO[bytes],
    start: datetime,
    end: datetime,
    *,
    unit: str | None = None,
) -> int:
    """Write positions in [start, end) (of ``unit``'s vehicles, if given) to ``out`` as CSV.

    One header line, then rows ordered by time; times in China Standard Time.  Streams with
    ``COPY ... TO STDOUT`` so memory stays flat however long the range.  Returns the number
    of bytes written.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    written = 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT set_config('TimeZone', %s, true)", (REPORT_TZ,))
        query = f"COPY ({_EXPORT_SELECT}) TO STDOUT (FORMAT CSV, HEADER)"
        with cur.copy(query, {"start": start, "end": end, "unit": unit}) as copy:
            for chunk in copy:
                out.write(chunk)
                written += len(chunk)
    return written
