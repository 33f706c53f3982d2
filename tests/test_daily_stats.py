"""The daily statistics refreshed incrementally (migration 8, storage.reports.refresh_daily_stats)
and on a schedule (storage.daily_stats.DailyStatsRefresher).

Every check compares ``daily_vehicle_stats_mv`` with the figures computed from scratch over
``positions`` by migration 3's definition (:data:`FROM_SCRATCH`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
import trio

from storage import schema
from storage.daily_stats import DailyStatsRefresher
from storage.errors import StorageError
from storage.reports import (
    RECEIVED_OVERLAP,
    REFRESH_LOCK_CLASS,
    DailyStatsRefresh,
    refresh_daily_stats,
)
from storage.schema import CHINA, MIGRATIONS, SchemaContext, migrate
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401

# Migration 3's materialized view, the definition the incremental table must agree with.
FROM_SCRATCH = """
SELECT vehicle_id,
       date_trunc('day', device_time AT TIME ZONE 'Asia/Shanghai')
           AT TIME ZONE 'Asia/Shanghai' AS day_start,
       count(*) AS positions,
       max(mileage_km) - min(mileage_km) AS distance_km,
       (60 * count(DISTINCT date_trunc('minute', device_time AT TIME ZONE 'Asia/Shanghai'))
           FILTER (WHERE speed_kmh >= 5))::bigint AS driving_time_s
FROM positions
WHERE vehicle_id IS NOT NULL
GROUP BY 1, 2
ORDER BY 1, 2
"""
STORED = (
    "SELECT vehicle_id, day_start, positions, distance_km, driving_time_s "
    "FROM daily_vehicle_stats_mv ORDER BY 1, 2"
)

MAY1, MAY2, MAY3 = date(2024, 5, 1), date(2024, 5, 2), date(2024, 5, 3)
T1 = datetime(2024, 5, 3, 12, 0, tzinfo=CHINA)  # the first refresh: noon of 3 May
T2 = T1 + timedelta(minutes=5)  # the next one
VEHICLES = {"013800000001": "粤B00001", "013800000002": "粤B00002"}
UNFITTED = "013899999999"

_fix_keys = itertools.count(1)


def at(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=CHINA)


def _write(
    dsn: str,
    phone: str,
    times: Sequence[datetime],
    *,
    received_at: datetime,
    speed_kmh: float = 40.0,
    odometer_km: float | None = 100.0,
    step_km: float = 0.5,
) -> None:
    """One position at each of ``times``, the odometer advancing ``step_km`` each (None: the
    terminal sends none), the vehicle looked up as the writer's staging path does."""
    rows = [
        (
            t,
            phone,
            next(_fix_keys),
            received_at,
            speed_kmh,
            None if odometer_km is None else odometer_km + i * step_km,
        )
        for i, t in enumerate(times)
    ]
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO positions (device_time, phone, fix_key, received_at, msg_id, serial, "
            "alarm, status, lat, lon, altitude_m, speed_kmh, direction, mileage_km, vehicle_id) "
            "VALUES (%s, %s, %s, %s, 512, 1, 0, 2, 22.5, 113.9, 10, %s, 0, %s, "
            "(SELECT id FROM vehicles WHERE phone = %s))",
            [(*row, phone) for row in rows],
        )


def _minutes(start: datetime, count: int, every_s: int = 60) -> list[datetime]:
    return [start + timedelta(seconds=every_s * n) for n in range(count)]


def _stored(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(STORED).fetchall()


def _from_scratch(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(FROM_SCRATCH).fetchall()


def _assert_up_to_date(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        expected = _from_scratch(conn)
        assert _stored(conn) == expected
    return expected


def _vehicle_id(conn: psycopg.Connection[Any], phone: str) -> int:
    row = conn.execute("SELECT id FROM vehicles WHERE phone = %s", (phone,)).fetchone()
    assert row is not None
    return int(row[0])


def _refresh(dsn: str, now: datetime, **kwargs: Any) -> DailyStatsRefresh:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return refresh_daily_stats(conn, now=now, **kwargs)


def _add_vehicles(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for phone, plate in VEHICLES.items():
            conn.execute(
                "INSERT INTO vehicles (plate, phone, unit, category) "
                "VALUES (%s, %s, 'unit-a', 'platform')",
                (plate, phone),
            )


@pytest.fixture
def stats_db(pg_schema_dsn: str) -> str:  # noqa: F811
    """Partitions for 1-5 May 2024, two vehicles with two days of positions, refreshed once
    (the first refresh, in full) at :data:`T1`."""
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn, now=T1, days_ahead=2)
        schema.ensure_partitions(conn, T1, days_ahead=2, days_behind=2)  # 1 May too
    _add_vehicles(pg_schema_dsn)
    first, second = VEHICLES
    received = at(MAY2, 23, 30)
    # 1 May: the first drives 09:00-09:29 at 40 km/h; the second crawls below MOVING_KMH
    _write(pg_schema_dsn, first, _minutes(at(MAY1, 9), 30), received_at=received)
    _write(pg_schema_dsn, second, _minutes(at(MAY1, 9), 10), received_at=received, speed_kmh=4.9)
    # 2 May: the first at the very edges of the China-time day, the second without odometer
    _write(pg_schema_dsn, first, [at(MAY2, 0), at(MAY2, 23, 59, 59)], received_at=received)
    _write(
        pg_schema_dsn,
        second,
        _minutes(at(MAY2, 7), 20, every_s=20),
        received_at=received,
        speed_kmh=5.0,
        odometer_km=None,
    )
    _write(pg_schema_dsn, UNFITTED, _minutes(at(MAY2, 7), 5), received_at=received)
    result = _refresh(pg_schema_dsn, T1)
    assert result.full
    assert result.received_to == T1
    return pg_schema_dsn


def test_the_first_refresh_recomputes_every_day(stats_db: str) -> None:
    expected = _assert_up_to_date(stats_db)
    with psycopg.connect(stats_db) as conn:
        first = _vehicle_id(conn, "013800000001")
        second = _vehicle_id(conn, "013800000002")
        rows = conn.execute(
            "SELECT plate, day, positions, distance_km, driving_time_s "
            "FROM vehicle_daily_stats ORDER BY plate, day"
        ).fetchall()
    assert [(v, d.astimezone(CHINA).date()) for v, d, *_ in expected] == [
        (first, MAY1),
        (first, MAY2),
        (second, MAY1),
        (second, MAY2),
    ]
    assert rows == [
        ("粤B00001", MAY1, 30, 14.5, 1800),
        ("粤B00001", MAY2, 2, 0.5, 120),
        ("粤B00002", MAY1, 10, 4.5, 0),  # below 5 km/h: no driving time
        ("粤B00002", MAY2, 20, None, 420),  # 07:00-07:06, no odometer item
    ]


def test_late_data_for_a_past_day_shows_after_the_next_refresh(stats_db: str) -> None:
    first = "013800000001"
    # a blind-area back-fill (0x0704) for 1 May arriving after the refresh
    _write(
        stats_db,
        first,
        _minutes(at(MAY1, 18), 15),
        received_at=T1 + timedelta(minutes=1),
        odometer_km=200.0,
    )
    with psycopg.connect(stats_db) as conn:
        assert _stored(conn) != _from_scratch(conn)
    result = _refresh(stats_db, T2)
    assert not result.full
    assert result.days == (MAY1, MAY3)  # the day back-filled, and the current day
    assert result.received_to == T2
    expected = _assert_up_to_date(stats_db)
    with psycopg.connect(stats_db) as conn:
        day = conn.execute(
            "SELECT positions, distance_km, driving_time_s FROM vehicle_daily_stats "
            "WHERE plate = '粤B00001' AND day = %s",
            (MAY1,),
        ).fetchone()
    assert day == (45, 207.0 - 100.0, 45 * 60)
    assert len(expected) == 4
    # the next refresh looks back over the overlap once more; after that, nothing is new
    assert _refresh(stats_db, T2 + timedelta(minutes=15)).days == (MAY1, MAY3)
    assert _refresh(stats_db, T2 + timedelta(minutes=20)).days == (MAY3,)
    _assert_up_to_date(stats_db)


def test_only_the_days_that_received_positions_are_recomputed(stats_db: str) -> None:
    with psycopg.connect(stats_db) as conn:
        # mark every stored day: a day recomputed loses the mark
        conn.execute("UPDATE daily_vehicle_stats_mv SET positions = -1")
    _write(stats_db, "013800000002", [at(MAY2, 12)], received_at=T1 + timedelta(minutes=2))
    # a terminal fitted to no vehicle does not touch the statistics
    _write(stats_db, UNFITTED, [at(MAY1, 12)], received_at=T1 + timedelta(minutes=2))
    assert _refresh(stats_db, T2).days == (MAY2, MAY3)
    with psycopg.connect(stats_db) as conn:
        marked = conn.execute(
            "SELECT day, positions FROM vehicle_daily_stats ORDER BY plate, day"
        ).fetchall()
    assert marked == [(MAY1, -1), (MAY2, 2), (MAY1, -1), (MAY2, 21)]


def test_rows_committed_after_the_refresh_looked_are_found(stats_db: str) -> None:
    """A position stamped received before the watermark but committed after the refresh read
    (a batch in flight, a clock a little behind) is found by the overlap."""
    stamped = T1 - RECEIVED_OVERLAP + timedelta(seconds=30)
    _write(stats_db, "013800000001", [at(MAY1, 20)], received_at=stamped, odometer_km=300.0)
    assert _refresh(stats_db, T2).days == (MAY1, MAY3)
    _assert_up_to_date(stats_db)


def test_the_current_day_is_recomputed_at_every_refresh(stats_db: str) -> None:
    # positions of today stamped long before the watermark (a spool replayed after an outage)
    _write(
        stats_db,
        "013800000002",
        _minutes(at(MAY3, 8), 6),
        received_at=T1 - timedelta(hours=3),
    )
    # and today's last second, received just now
    _write(stats_db, "013800000001", [at(MAY3, 23, 59, 59)], received_at=T2)
    assert _refresh(stats_db, T2).days == (MAY3,)
    expected = _assert_up_to_date(stats_db)
    today = [row for row in expected if row[1].astimezone(CHINA).date() == MAY3]
    assert [(n, s) for _, _, n, _, s in today] == [(1, 60), (6, 360)]


def _advisory_waiters(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND classid = %s AND objid = hashtext(current_schema())::oid",
        (REFRESH_LOCK_CLASS,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_refreshes_at_once_take_turns(stats_db: str) -> None:
    results: list[DailyStatsRefresh] = []
    errors: list[BaseException] = []

    def refresh() -> None:
        try:
            results.append(_refresh(stats_db, T2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _write(stats_db, "013800000001", [at(MAY1, 21)], received_at=T1 + timedelta(seconds=1))
    with psycopg.connect(stats_db) as holder, psycopg.connect(stats_db, autocommit=True) as spy:
        holder.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (REFRESH_LOCK_CLASS,)
        )
        threads = [threading.Thread(target=refresh) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while _advisory_waiters(spy) < 2:
            assert datetime.now(UTC) < deadline, "the refreshes did not wait for the lock"
            time.sleep(0.01)
        # positions arriving while both wait: whoever goes second still counts them once
        _write(stats_db, "013800000002", [at(MAY2, 21)], received_at=T1 + timedelta(seconds=2))
        holder.commit()  # releases the lock
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert len(results) == 2
    assert all(r.days == (MAY1, MAY2, MAY3) and not r.skipped for r in results)
    _assert_up_to_date(stats_db)


def test_many_refreshers_and_writers_at_once(stats_db: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def refresher(n: int) -> None:
        try:
            start.wait()
            for k in range(4):
                _refresh(stats_db, T2 + timedelta(seconds=10 * k + n))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer() -> None:
        try:
            start.wait()
            for k in range(20):
                day = (MAY1, MAY2, MAY3)[k % 3]
                _write(
                    stats_db,
                    "013800000001",
                    [at(day, 15, k)],
                    received_at=T2 + timedelta(seconds=k),
                    odometer_km=500.0 + k,
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=refresher, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    _refresh(stats_db, T2 + timedelta(minutes=5))  # picks up what the last race left behind
    _assert_up_to_date(stats_db)


def test_a_recent_refresh_is_not_repeated(stats_db: str) -> None:
    within = timedelta(minutes=2)
    skipped = _refresh(stats_db, T1 + timedelta(minutes=1), unless_refreshed_within=within)
    assert skipped == DailyStatsRefresh(skipped=True, received_to=T1)
    done = _refresh(stats_db, T1 + timedelta(minutes=3), unless_refreshed_within=within)
    assert not done.skipped
    assert done.days == (MAY3,)


def test_refresh_needs_an_idle_connection_and_an_aware_time(stats_db: str) -> None:
    with psycopg.connect(stats_db) as conn:
        with pytest.raises(ValueError, match="aware"):
            refresh_daily_stats(conn, now=datetime(2024, 5, 3, 12))
        conn.execute("SELECT 1")
        with pytest.raises(StorageError, match="transaction"):
            refresh_daily_stats(conn)


def test_migration_8_keeps_what_the_view_showed(
    pg_schema_dsn: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before_8 = tuple(m for m in MIGRATIONS if m.version < 8)
    monkeypatch.setattr(schema, "MIGRATIONS", before_8)
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        # the materialized view of the partitioned backend (by name: wherever this runs)
        migrate(conn, backend="partitioned", now=T1, days_ahead=0)
    _add_vehicles(pg_schema_dsn)
    _write(pg_schema_dsn, "013800000001", _minutes(at(MAY2, 9), 5), received_at=T1)
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        conn.execute("REFRESH MATERIALIZED VIEW daily_vehicle_stats_mv")
        shown = conn.execute("SELECT * FROM vehicle_daily_stats").fetchall()
        per_unit = conn.execute("SELECT * FROM unit_category_daily").fetchall()
        assert len(shown) == 1
        monkeypatch.setattr(schema, "MIGRATIONS", tuple(m for m in MIGRATIONS if m.version <= 8))
        assert migrate(conn, now=T1, days_ahead=0) == [8]
        kind = conn.execute(
            "SELECT relkind FROM pg_class WHERE oid = 'daily_vehicle_stats_mv'::regclass"
        ).fetchone()
        assert kind == ("r",)
        assert conn.execute("SELECT * FROM vehicle_daily_stats").fetchall() == shown
        assert conn.execute("SELECT * FROM unit_category_daily").fetchall() == per_unit
        assert conn.execute("SELECT to_regclass('daily_vehicle_stats_mv_old')").fetchone() == (
            None,
        )
        monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS)
        assert migrate(conn, now=T1, days_ahead=0)[0] == 9  # and the rest
    _write(pg_schema_dsn, "013800000002", _minutes(at(MAY1, 9), 3), received_at=T1)
    assert _refresh(pg_schema_dsn, T2).full  # the watermark starts empty: every day
    assert len(_assert_up_to_date(pg_schema_dsn)) == 2


def test_migration_8_renders_for_both_backends() -> None:
    migration = next(m for m in MIGRATIONS if m.version == 8)
    plain = migration.render(SchemaContext(backend="partitioned"))
    ts = migration.render(SchemaContext(backend="timescaledb"))
    for sql in (plain, ts):
        assert "CREATE TABLE daily_stats_refresh" in sql
        assert "USING brin (received_at)" in sql
    assert "CREATE TABLE daily_vehicle_stats_mv" in plain
    assert "CREATE OR REPLACE VIEW vehicle_daily_stats" in plain
    assert "daily_vehicle_stats_mv" not in ts  # the continuous aggregates stay


def test_migration_11_replaces_the_continuous_aggregates_on_timescaledb() -> None:
    migration = next(m for m in MIGRATIONS if m.version == 11)
    plain = migration.render(SchemaContext(backend="partitioned"))
    ts = migration.render(SchemaContext(backend="timescaledb", timescale_schema='"ext"'))
    assert "daily_vehicle_stats_mv" not in plain  # migration 8 made it a table already
    for step in (
        "\"ext\".remove_continuous_aggregate_policy('daily_vehicle_stats_mv', if_exists => true)",
        "\"ext\".remove_continuous_aggregate_policy('positions_minute_mv', if_exists => true)",
        "CREATE TABLE daily_vehicle_stats_new",
        "FROM daily_vehicle_stats_mv WHERE vehicle_id IS NOT NULL",  # kept: retention-proof
        "DROP MATERIALIZED VIEW daily_vehicle_stats_mv",
        "DROP MATERIALIZED VIEW positions_minute_mv",
        "ALTER TABLE daily_vehicle_stats_new RENAME TO daily_vehicle_stats_mv",
        "UPDATE daily_stats_refresh SET received_to = NULL",
    ):
        assert step in ts, step
    assert ts.index("CREATE OR REPLACE VIEW vehicle_daily_stats") < ts.index(
        "DROP MATERIALIZED VIEW daily_vehicle_stats_mv"
    )


def test_a_day_whose_data_begin_at_china_midnight(stats_db: str) -> None:
    # TimescaleDB's hierarchical aggregate lost such a day (issue seen on 2.28.3): data
    # beginning exactly at 00:00 China time, received after the last refresh.
    first = "013800000001"
    _write(stats_db, first, _minutes(at(MAY3, 0), 30), received_at=T1 + timedelta(minutes=1))
    _refresh(stats_db, T2)
    expected = _assert_up_to_date(stats_db)
    may3 = [row for row in expected if row[1] == at(MAY3, 0)]
    assert [(r[2], r[4]) for r in may3] == [(30, 1800)]
    # and the day before, which ends where it begins, is untouched
    assert sum(1 for row in expected if row[1] == at(MAY2, 0)) == 2


def _drop_raw_rows_of_1_may(conn: psycopg.Connection[Any]) -> None:
    """What retention does: the partition of 1 May goes (partitioned), or the chunks that end
    by 2 May 00:00 UTC (TimescaleDB: chunks are aligned to UTC days, so the early hours of
    2 May China time go with them)."""
    if schema.current_backend(conn) == "timescaledb":
        ts = schema.timescale_schema(conn)
        conn.execute(
            f"SELECT {ts}.drop_chunks('positions', older_than => %s)",
            (datetime(2024, 5, 2, tzinfo=UTC),),
        )
        return
    (partition,) = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'positions'::regclass AND c.relname LIKE %s",
        ("%20240501",),
    ).fetchone() or (None,)
    assert partition is not None
    conn.execute(f'DROP TABLE "{partition}"')


def test_statistics_outlive_the_raw_rows_dropped_by_retention(stats_db: str) -> None:
    before = _assert_up_to_date(stats_db)
    may1 = [row for row in before if row[1] == at(MAY1, 0)]
    assert len(may1) == 2
    with psycopg.connect(stats_db, autocommit=True) as conn:
        _drop_raw_rows_of_1_may(conn)
        assert not [r for r in _from_scratch(conn) if r[1] == at(MAY1, 0)]
        # a later refresh, and even a full recompute, keep 1 May's figures
        _refresh(stats_db, T2)
        assert [r for r in _stored(conn) if r[1] == at(MAY1, 0)] == may1
        conn.execute("UPDATE daily_stats_refresh SET received_to = NULL")
        result = _refresh(stats_db, T2 + timedelta(minutes=5))
        assert result.full
        stored = _stored(conn)
        remaining = _from_scratch(conn)
    assert [r for r in stored if r[1] == at(MAY1, 0)] == may1
    # the days that still have raw rows are as those rows say
    assert [r for r in stored if r[1] != at(MAY1, 0)] == remaining


def test_days_whose_positions_change_vehicle_are_recomputed(stats_db: str) -> None:
    # The second terminal's vehicle is imported only now: its past positions (1 and 2 May,
    # received long before the watermark) become the new vehicle's and so do their figures.
    with psycopg.connect(stats_db) as conn:
        conn.execute(
            "INSERT INTO vehicles (plate, phone, unit, category) "
            "VALUES ('粤B00009', %s, 'unit-b', 'rental')",
            (UNFITTED,),
        )
    with psycopg.connect(stats_db) as conn:
        pending = conn.execute("SELECT day_start FROM daily_stats_pending").fetchall()
    assert pending == [(at(MAY2, 0),)]
    result = _refresh(stats_db, T2)
    assert MAY2 in result.days
    expected = _assert_up_to_date(stats_db)
    with psycopg.connect(stats_db) as conn:
        unfitted = _vehicle_id(conn, UNFITTED)
        assert conn.execute("SELECT count(*) FROM daily_stats_pending").fetchone() == (0,)
    assert [(r[1], r[2]) for r in expected if r[0] == unfitted] == [(at(MAY2, 0), 5)]


# ---------------------------------------------------------------------------------------------
# The scheduled service

INTERVAL_S = 0.05


async def _until(check: Callable[[], bool], *, timeout_s: float = 20) -> None:
    """Poll ``check`` (in a thread: it may query the database) until it holds."""
    with trio.fail_after(timeout_s):
        while True:
            if await trio.to_thread.run_sync(check):
                return
            await trio.sleep(INTERVAL_S)


async def test_the_service_refreshes_without_being_asked(db: str) -> None:
    _add_vehicles(db)
    now = datetime.now(UTC)
    refresher = DailyStatsRefresher(db, interval_s=INTERVAL_S)

    def up_to_date_with(rows: int) -> bool:
        with psycopg.connect(db) as conn:
            expected = _from_scratch(conn)
            return len(expected) == rows and _stored(conn) == expected

    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        # today's positions, as they come in
        await trio.to_thread.run_sync(
            lambda: _write(db, "013800000001", [now, now], received_at=now)
        )
        await _until(lambda: up_to_date_with(1))
        # a back-fill for a past day, received now
        await trio.to_thread.run_sync(
            lambda: _write(
                db,
                "013800000002",
                _minutes(now - timedelta(days=2), 3),
                received_at=datetime.now(UTC),
            )
        )
        await _until(lambda: up_to_date_with(2))
        nursery.cancel_scope.cancel()
    assert refresher.refreshes >= 2
    assert refresher.failures == 0
    assert refresher.last is not None


async def test_the_service_logs_failures_and_retries(
    pg_schema_dsn: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a schema not migrated yet: every refresh fails until it is
    refresher = DailyStatsRefresher(pg_schema_dsn, interval_s=INTERVAL_S)
    with caplog.at_level(logging.INFO, logger="storage.daily_stats"):
        async with trio.open_nursery() as nursery:
            await nursery.start(refresher.run)
            await _until(lambda: refresher.failures >= 2)
            assert refresher.last_error is not None
            assert refresher.refreshes == 0

            def migrate_now() -> None:
                with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
                    migrate(conn)

            await trio.to_thread.run_sync(migrate_now)
            await _until(lambda: refresher.refreshes >= 1 and refresher.last_error is None)
            nursery.cancel_scope.cancel()
    assert any("not refreshed" in r.getMessage() for r in caplog.records)
    assert any("refreshed again" in r.getMessage() for r in caplog.records)


async def test_the_service_survives_an_unreachable_database(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # port 1: nothing listens, the connection is refused at once
    refresher = DailyStatsRefresher("postgresql://postgres@127.0.0.1:1/none", interval_s=INTERVAL_S)
    with caplog.at_level(logging.INFO, logger="storage.daily_stats"):
        async with trio.open_nursery() as nursery:
            await nursery.start(refresher.run)
            await _until(lambda: refresher.failures >= 3)
            nursery.cancel_scope.cancel()
    levels = [r.levelno for r in caplog.records if "unreachable" in r.getMessage()]
    assert levels[0] == logging.ERROR  # the first failure stands out, the retries do not
    assert set(levels[1:]) == {logging.INFO}


async def test_the_service_waits_for_the_schema(db: str) -> None:
    ready = trio.Event()
    refresher = DailyStatsRefresher(db, interval_s=INTERVAL_S, ready=ready)
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        await trio.sleep(5 * INTERVAL_S)
        assert refresher.refreshes == refresher.failures == 0
        ready.set()
        await _until(lambda: refresher.refreshes >= 1)
        nursery.cancel_scope.cancel()


def test_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DailyStatsRefresher("postgresql://", interval_s=0)
