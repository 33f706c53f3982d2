"""Reports over the stored positions: aggregate refresh, per-unit counts and CSV export.

The views themselves are created by migration 3 (storage/schema.py):

* ``vehicle_latest_position`` -- the newest position of each vehicle's terminal;
* ``vehicle_daily_stats`` -- per vehicle and China-time day: positions, distance_km
  (odometer), driving_time_s, with plate, unit and category;
* ``unit_category_daily`` -- the same summed per owning unit and category.

The daily figures come from ``daily_vehicle_stats_mv``, brought up to date by
:func:`refresh_daily_stats` (every few minutes by :class:`storage.daily_stats.DailyStatsRefresher`):
on both backends a table recomputed from ``positions`` a China-time day at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from storage.errors import StorageError
from storage.schema import (
    CHINA,
    DAILY_FIGURES,
    REPORT_TZ,
    TimescaleOptions,
    current_backend,
)

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# The daily aggregate

# The refresh's advisory lock, keyed like the migrations' (storage.schema) by the schema: any
# constant of our own, distinct from theirs.  Refreshers take turns under it, and one that
# dies releases it with its connection.
REFRESH_LOCK_CLASS = 808_0008

# A position is stamped ``received_at`` before it is committed: the writer gives a batch
# ``write_timeout_s`` (5 s) before it spools it instead, and NTP keeps the clocks of the nodes
# and the database within a second of each other.  So each refresh also looks this far behind
# its watermark, for rows received before it but committed after the previous refresh looked;
# ten minutes is a wide margin over both and costs a BRIN scan of ten minutes of arrivals.
# Rows committed later than that after their receipt (a spool replayed after an outage) are
# found only when their day is the current one.
RECEIVED_OVERLAP = timedelta(minutes=10)


# TimescaleDB: positions received since the watermark are searched for among the device times
# of the chunks not yet compressed (TimescaleOptions.compress_after): ``received_at`` is neither
# a segment-by nor an order-by column, so searching a compressed chunk would decompress it
# whole.  Back-fill older than that is recomputed only when its day is otherwise touched.
TIMESCALE_SEARCH = TimescaleOptions().compress_after

_LOCK_KEY = "%s, hashtext(coalesce(current_schema(), ''))"

# The watermark, the refresh time ("now": given, or the database's clock, one clock for every
# refreshing process) and the China-time day it falls in.
_STATE = f"""
SELECT r.received_to, r.refreshed_at, t.now,
       date_trunc('day', t.now AT TIME ZONE '{REPORT_TZ}') AT TIME ZONE '{REPORT_TZ}',
       (date_trunc('day', t.now AT TIME ZONE '{REPORT_TZ}') + INTERVAL '1 day')
           AT TIME ZONE '{REPORT_TZ}'
FROM daily_stats_refresh r
CROSS JOIN (SELECT coalesce(%s::timestamptz, clock_timestamp()) AS now) t
"""  # noqa: S608 - constants only

# [start, end) of each China-time day other than the current one with a position received
# after %(since)s.  Leaving the current day out keeps its partition out of the scan (it is
# recomputed anyway); the others are searched through positions_received_at_brin.
_TOUCHED = f"""
SELECT local_day AT TIME ZONE '{REPORT_TZ}',
       (local_day + INTERVAL '1 day') AT TIME ZONE '{REPORT_TZ}'
FROM (
    SELECT DISTINCT date_trunc('day', device_time AT TIME ZONE '{REPORT_TZ}') AS local_day
    FROM positions
    WHERE received_at > %(since)s AND vehicle_id IS NOT NULL
        AND (device_time < %(today_start)s OR device_time >= %(today_end)s)
        AND device_time >= coalesce(%(horizon)s::timestamptz, '-infinity')
) d
ORDER BY 1
"""  # noqa: S608 - constants only

# The days whose positions changed vehicle since the last refresh (migration 11), taken: the
# transaction that recomputes them removes them.
_TAKE_PENDING = f"""
DELETE FROM daily_stats_pending
RETURNING day_start,
          ((day_start AT TIME ZONE '{REPORT_TZ}') + INTERVAL '1 day') AT TIME ZONE '{REPORT_TZ}'
"""  # noqa: S608 - constants only
# Migration 3's definition of the daily figures, to the letter (the numbers must not change),
# restricted to the days recomputed.
_FRESH = f"""
{DAILY_FIGURES} AND ("""

# Upsert the recomputed rows (rewriting only those that changed), delete the rows of those days
# that no longer have positions; count both.  One statement, so both see the same positions.
_STORE = """
),
stored AS (
    INSERT INTO daily_vehicle_stats_mv AS s
        (vehicle_id, day_start, positions, distance_km, driving_time_s)
    SELECT vehicle_id, day_start, positions, distance_km, driving_time_s FROM fresh
    ON CONFLICT (vehicle_id, day_start) DO UPDATE
    SET positions = excluded.positions,
        distance_km = excluded.distance_km,
        driving_time_s = excluded.driving_time_s
    WHERE (s.positions, s.distance_km, s.driving_time_s)
        IS DISTINCT FROM (excluded.positions, excluded.distance_km, excluded.driving_time_s)
    RETURNING 1
),
gone AS (
    DELETE FROM daily_vehicle_stats_mv s
    WHERE ("""

_STORE_END = """)
        AND NOT EXISTS (
            SELECT FROM fresh f WHERE f.vehicle_id = s.vehicle_id AND f.day_start = s.day_start
        )
    RETURNING 1
)
SELECT (SELECT count(*) FROM stored), (SELECT count(*) FROM gone)
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DailyStatsRefresh:
    """What one :func:`refresh_daily_stats` did.

    ``days``: the China-time days recomputed (TimescaleDB: the days of the window refreshed),
    empty when ``full`` (every day recomputed: the first refresh) or ``skipped``.
    ``received_to``: the watermark after the refresh.  ``rows_written`` / ``rows_removed``:
    rows of ``daily_vehicle_stats_mv`` that changed (0 with TimescaleDB, which does not say).
    """

    days: tuple[date, ...] = ()
    full: bool = False
    skipped: bool = False
    received_to: datetime | None = None
    rows_written: int = 0
    rows_removed: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _State:
    received_to: datetime | None
    refreshed_at: datetime | None
    now: datetime
    today_start: datetime
    today_end: datetime

    def fresh_within(self, age: timedelta | None) -> bool:
        return (
            age is not None
            and self.received_to is not None
            and self.refreshed_at is not None
            and self.now - self.refreshed_at < age
        )


def refresh_daily_stats(
    conn: psycopg.Connection[Any],
    *,
    now: datetime | None = None,
    unless_refreshed_within: timedelta | None = None,
) -> DailyStatsRefresh:
    """Bring ``daily_vehicle_stats_mv`` up to date; readers are not blocked meanwhile.

    Recomputes the China-time days with positions received (``received_at``) since the
    previous refresh's watermark (less :data:`RECEIVED_OVERLAP`), the days whose positions
    changed vehicle (``daily_stats_pending``: terminal bindings changed, migration 11) and the
    day of ``now`` (default: the database's clock), then moves the watermark to ``now``.  The
    first refresh after migration 8 (11 on TimescaleDB) recomputes every day that has raw rows.
    A day whose raw rows were dropped (retention) is never recomputed: its figures stay.  The
    same on both backends; with TimescaleDB only the chunks not yet compressed are searched for
    rows received since the watermark (:data:`TIMESCALE_SEARCH`).

    Any number of processes may call this at once: they take turns under an advisory lock,
    and each recomputes from the positions as they are, so none counts a position twice.
    With ``unless_refreshed_within``, a call that finds the last refresh (by anyone) more
    recent than that returns at once (``skipped``).  ``conn`` must not be inside a
    transaction; it is left as it was.
    """
    _require_idle(conn, "refresh_daily_stats()")
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    autocommit = conn.autocommit
    conn.autocommit = True  # refresh_continuous_aggregate refuses to run in a transaction
    try:
        horizon = TIMESCALE_SEARCH if current_backend(conn) == "timescaledb" else None
        result = _refresh_table(conn, now, unless_refreshed_within, horizon)
    finally:
        conn.autocommit = autocommit
    if result.full:
        logger.info("daily statistics recomputed for every day (%d rows)", result.rows_written)
    elif not result.skipped:
        logger.debug(
            "daily statistics recomputed for %s: %d rows written, %d removed",
            ", ".join(map(str, result.days)),
            result.rows_written,
            result.rows_removed,
        )
    return result


def _read_state(conn: psycopg.Connection[Any], now: datetime | None) -> _State:
    row = conn.execute(_STATE, (now,)).fetchone()
    if row is None:
        raise StorageError("daily_stats_refresh has no row (see storage.schema, migration 8)")
    return _State(*row)


def _touched_days(
    conn: psycopg.Connection[Any], state: _State, horizon: datetime | None
) -> list[tuple[datetime, datetime]]:
    """[start, end) of the days other than today with positions received since the watermark."""
    assert state.received_to is not None
    params = {
        "since": state.received_to - RECEIVED_OVERLAP,
        "today_start": state.today_start,
        "today_end": state.today_end,
        "horizon": horizon,
    }
    return [(start, end) for start, end in conn.execute(_TOUCHED, params)]


def _save_watermark(conn: psycopg.Connection[Any], state: _State) -> None:
    conn.execute(
        "UPDATE daily_stats_refresh SET received_to = %s, refreshed_at = %s",
        (state.now, state.now),
    )


def _refresh_table(
    conn: psycopg.Connection[Any],
    now: datetime | None,
    within: timedelta | None,
    horizon: timedelta | None,
) -> DailyStatsRefresh:
    with conn.transaction():
        # Each statement below sees what the refresher before it committed (it released the
        # lock only then); a stricter isolation level would keep the view from before the wait.
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})", (REFRESH_LOCK_CLASS,))
        state = _read_state(conn, now)
        if state.fresh_within(within):
            return DailyStatsRefresh(skipped=True, received_to=state.received_to)
        pending = [(start, end) for start, end in conn.execute(_TAKE_PENDING)]
        if state.received_to is None:
            days: list[tuple[datetime, datetime]] = []
            where: sql.Composable = sql.SQL("TRUE")
            # Only the days that still have raw rows: the others' figures outlive retention.
            which: sql.Composable = sql.SQL("s.day_start IN (SELECT day_start FROM fresh)")
        else:
            since = None if horizon is None else state.today_start - horizon
            touched = _touched_days(conn, state, since)
            days = sorted({*touched, *pending, (state.today_start, state.today_end)})
            where = sql.SQL(" OR ").join(
                sql.SQL("(device_time >= {} AND device_time < {})").format(
                    sql.Literal(start), sql.Literal(end)
                )
                for start, end in days
            )
            which = sql.SQL("s.day_start IN ({})").format(
                sql.SQL(", ").join(sql.Literal(start) for start, _ in days)
            )
        statement = sql.Composed(
            [
                sql.SQL("WITH fresh AS MATERIALIZED ("),
                sql.SQL(_FRESH),
                where,
                sql.SQL(")\nGROUP BY 1, 2"),
                sql.SQL(_STORE),
                which,
                sql.SQL(_STORE_END),
            ]
        )
        counts = conn.execute(statement).fetchone()
        assert counts is not None
        _save_watermark(conn, state)
    return DailyStatsRefresh(
        days=tuple(_china_day(start) for start, _ in days),
        full=state.received_to is None,
        received_to=state.now,
        rows_written=counts[0],
        rows_removed=counts[1],
    )


def _china_day(day_start: datetime) -> date:
    return day_start.astimezone(CHINA).date()


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
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write positions in [start, end) (of ``unit``'s vehicles, if given) to ``out`` as CSV.

    One header line, then rows ordered by time; times in China Standard Time.  Streams with
    ``COPY ... TO STDOUT`` so memory stays flat however long the range.  Returns the number
    of bytes written.  ``progress(rows, bytes)`` is called after each chunk with the data rows
    (the header not counted) and bytes written so far, and once at the end.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    written = 0
    lines = CsvLineCounter()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT set_config('TimeZone', %s, true)", (REPORT_TZ,))
        query = f"COPY ({_EXPORT_SELECT}) TO STDOUT (FORMAT CSV, HEADER)"
        with cur.copy(query, {"start": start, "end": end, "unit": unit}) as copy:
            for chunk in copy:
                out.write(chunk)
                written += len(chunk)
                if progress is not None:
                    lines.feed(chunk)
                    progress(max(0, lines.lines - 1), written)
    if progress is not None:
        progress(max(0, lines.lines - 1), written)
    return written


class CsvLineCounter:
    """Counts the records of CSV text fed in chunks: line ends outside double quotes (a
    quoted field may hold a line end; an escaped quote is two quotes, which toggle twice)."""

    def __init__(self) -> None:
        self.lines = 0
        self._quoted = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        parts = bytes(chunk).split(b'"')
        for i, part in enumerate(parts):
            if not self._quoted:
                self.lines += part.count(b"\n")
            if i < len(parts) - 1:
                self._quoted = not self._quoted
