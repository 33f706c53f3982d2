"""Trips in PostgreSQL: the ``trips`` table of migration 5, one row per (vehicle, start).

Rows are plain dicts (``storage`` does not import ``alerts``; the wiring converts the engine's
``TripRecord``) with the table's column names::

    {"vehicle_id", "started_at", "seq", "phone", "start_lon", "start_lat", "ended_at",
     "end_lon", "end_lat", "distance_km", "distance_source", "filing_id"}

A trip is written when it starts (``ended_at`` None) and again when it ends.  The key is the
device time of the start, so a replayed or back-filled drive finds the same row.  An end once
stored is never taken back by a later start record of the same trip (a replay resending the
start), so the end columns keep their value when the new row has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Self

import psycopg
from psycopg.rows import TupleRow, dict_row

from storage.errors import StorageError

__all__ = ["TRIP_COLUMNS", "TripRepository"]

TRIP_COLUMNS = (
    "vehicle_id",
    "started_at",
    "seq",
    "phone",
    "start_lon",
    "start_lat",
    "ended_at",
    "end_lon",
    "end_lat",
    "distance_km",
    "distance_source",
    "filing_id",
)
_REQUIRED = ("vehicle_id", "started_at", "seq", "phone", "start_lon", "start_lat")
_KEEP_IF_NULL = ("ended_at", "end_lon", "end_lat", "distance_km", "distance_source", "filing_id")

_UPSERT = (
    f"INSERT INTO trips ({', '.join(TRIP_COLUMNS)}) "  # noqa: S608 - constants
    f"VALUES ({', '.join(f'%({c})s' for c in TRIP_COLUMNS)}) "
    "ON CONFLICT (vehicle_id, started_at) DO UPDATE SET "
    "seq = EXCLUDED.seq, phone = EXCLUDED.phone, start_lon = EXCLUDED.start_lon, "
    "start_lat = EXCLUDED.start_lat, "
    + ", ".join(f"{c} = COALESCE(EXCLUDED.{c}, trips.{c})" for c in _KEEP_IF_NULL)
    + ", updated_at = now()"
)


def _check(row: Mapping[str, Any]) -> dict[str, Any]:
    missing = [c for c in _REQUIRED if row.get(c) is None]
    unknown = sorted(set(row) - set(TRIP_COLUMNS))
    if missing or unknown:
        raise StorageError(f"trip row: missing {missing}, unknown {unknown}")
    for key in ("started_at", "ended_at"):
        value = row.get(key)
        if isinstance(value, datetime) and value.tzinfo is None:
            raise StorageError(f"trip row: {key} must be timezone-aware")
    return {c: row.get(c) for c in TRIP_COLUMNS}


class TripRepository:
    """Upserts and reads trips.  Blocking; one connection, for one worker thread at a time
    (the rule engine's), opened on first use and reopened when broken."""

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[TupleRow] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _connection(self) -> psycopg.Connection[TupleRow]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s
            )
        return self._conn

    def upsert(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Insert or update trips by (vehicle_id, started_at), in order, in one transaction;
        returns the number of rows."""
        params = [_check(row) for row in rows]
        if not params:
            return 0
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(_UPSERT, params)
        return len(params)

    def trips(
        self, vehicle_id: int | None = None, since: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Trips (of one vehicle, or all) started at or after ``since``, oldest first."""
        if since is not None and since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        with self._connection().cursor(row_factory=dict_row) as cur:
            return cur.execute(
                f"SELECT {', '.join(TRIP_COLUMNS)} FROM trips "  # noqa: S608 - constants
                "WHERE (%s::bigint IS NULL OR vehicle_id = %s) "
                "AND (%s::timestamptz IS NULL OR started_at >= %s) "
                "ORDER BY started_at, vehicle_id",
                (vehicle_id, vehicle_id, since, since),
            ).fetchall()
