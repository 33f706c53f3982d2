"""Migrations, the backend choice, partitions, and the TimescaleDB SQL generators."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from storage.errors import StorageError
from storage.schema import (
    CHINA,
    MIGRATIONS,
    SchemaContext,
    TimescaleOptions,
    current_backend,
    drop_partitions_before,
    ensure_partitions,
    existing_partitions,
    migrate,
    partition_name,
    timescale_aggregate_sql,
    timescale_positions_sql,
)
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401

NOW = datetime(2024, 5, 1, 3, 0, tzinfo=UTC)  # 11:00 China time, 1 May


def _tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
        "AND relkind IN ('r', 'p', 'm', 'v')"
    ).fetchall()
    return {name for (name,) in rows}


def test_migrate_from_empty_then_rerun(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn) as conn:
        assert current_backend(conn) is None
        conn.commit()
        # (the partitioned backend by name: on a server with TimescaleDB too)
        expected_versions = sorted(m.version for m in MIGRATIONS)
        assert migrate(conn, backend="partitioned", now=NOW, days_ahead=2) == expected_versions
        assert not conn.autocommit  # left as it was
        assert current_backend(conn) == "partitioned"
        tables = _tables(conn)
        conn.commit()
        for expected in (
            "terminals",
            "vehicles",
            "positions",
            "positions_default",
            "multimedia",
            "sessions",
            "fences",
            "filings",
            "alerts",
            "trips",
            "daily_vehicle_stats_mv",
            "vehicle_latest_position",
            "vehicle_daily_stats",
            "unit_category_daily",
            "jt808_schema_migrations",
        ):
            assert expected in tables
        assert migrate(conn, now=NOW, days_ahead=2) == []
        versions = conn.execute("SELECT version FROM jt808_schema_migrations ORDER BY 1").fetchall()
        assert [v for (v,) in versions] == expected_versions
        # the natural key and BRIN are there, the key includes the partition key
        indexes: dict[str, str] = dict(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'positions'"
            ).fetchall()
        )
        assert "(phone, device_time, fix_key)" in indexes["positions_natural_key"]
        assert "UNIQUE" in indexes["positions_natural_key"]
        assert "brin" in indexes["positions_device_time_brin"]


def test_migrate_needs_an_idle_connection(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn) as conn:
        conn.execute("SELECT 1")  # opens a transaction
        with pytest.raises(StorageError, match="transaction"):
            migrate(conn, now=NOW)


def test_backend_choice_is_checked(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn) as conn:
        available = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        conn.commit()
        if available is None:
            with pytest.raises(StorageError, match="timescaledb"):
                migrate(conn, backend="timescaledb", now=NOW)
        migrate(conn, backend="partitioned", now=NOW, days_ahead=0)
        with pytest.raises(StorageError, match="cannot switch"):
            migrate(conn, backend="timescaledb", now=NOW)


def test_partitions_are_created_ahead(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn, backend="partitioned", now=NOW, days_ahead=3)
        today = NOW.astimezone(CHINA).date()
        expected = {partition_name(today + timedelta(days=d)) for d in range(-1, 4)}
        assert expected | {"positions_default"} == existing_partitions(conn)
        later = NOW + timedelta(days=2)
        created = ensure_partitions(conn, later, days_ahead=3)
        assert created == [partition_name(today + timedelta(days=d)) for d in (4, 5)]
        assert ensure_partitions(conn, later, days_ahead=3) == []
        # a China-time day boundary: 16:00 UTC is midnight in Beijing
        bounds = conn.execute(
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE relname = %s",
            (partition_name(date(2024, 5, 2)),),
        ).fetchone()
        assert bounds is not None
        conn.execute("SET TimeZone = 'UTC'")
        lo = conn.execute(
            "SELECT %s::timestamptz = '2024-05-01 16:00:00+00'",
            (datetime(2024, 5, 2, tzinfo=CHINA),),
        ).fetchone()
        assert lo == (True,)
        assert drop_partitions_before(conn, today) == [partition_name(today - timedelta(days=1))]


def test_rows_in_default_move_into_a_new_partition(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn, backend="partitioned", now=NOW, days_ahead=0)
        far = datetime(2024, 6, 15, 8, tzinfo=CHINA)
        conn.execute(
            "INSERT INTO positions (device_time, phone, fix_key, received_at, msg_id, serial, "
            "alarm, status, lat, lon, altitude_m, speed_kmh, direction) "
            "VALUES (%s, '1', 1, %s, 512, 1, 0, 0, 0, 0, 0, 0, 0)",
            (far, NOW),
        )
        assert conn.execute("SELECT count(*) FROM positions_default").fetchone() == (1,)
        created = ensure_partitions(conn, far, days_ahead=0, days_behind=0)
        assert created == ["positions_p20240615"]
        assert conn.execute("SELECT count(*) FROM positions_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM positions_p20240615").fetchone() == (1,)
        # the moved partition got the natural key index too
        idx = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'positions_p20240615' "
            "AND indexdef LIKE 'CREATE UNIQUE INDEX%%'"
        ).fetchone()
        assert idx == (1,)


def test_timescale_positions_sql() -> None:
    opts = TimescaleOptions(
        chunk_interval=timedelta(hours=12),
        compress_after=timedelta(days=3),
        retain_for=timedelta(days=180),
    )
    statements = timescale_positions_sql(opts)
    assert statements[0].startswith("CREATE TABLE positions (")
    assert "device_time timestamptz NOT NULL" in statements[0]
    assert "PARTITION BY" not in statements[0]
    assert statements[1] == (
        "SELECT public.create_hypertable('positions', 'device_time', "
        "chunk_time_interval => INTERVAL '43200 seconds', if_not_exists => TRUE)"
    )
    assert statements[2] == (
        "CREATE UNIQUE INDEX positions_natural_key ON positions (phone, device_time, fix_key)"
    )
    assert "timescaledb.compress_segmentby = 'phone'" in statements[3]
    assert "compress_orderby = 'device_time DESC, fix_key'" in statements[3]
    assert statements[4] == (
        "SELECT public.add_compression_policy('positions', "
        "compress_after => INTERVAL '259200 seconds', if_not_exists => TRUE)"
    )
    assert statements[5] == (
        "SELECT public.add_retention_policy('positions', "
        "drop_after => INTERVAL '15552000 seconds', if_not_exists => TRUE)"
    )
    forever = timescale_positions_sql(TimescaleOptions(retain_for=None))
    assert not any("retention" in s for s in forever)
    with pytest.raises(ValueError, match="positive"):
        timescale_positions_sql(TimescaleOptions(chunk_interval=timedelta(0)))


def test_timescale_aggregate_sql() -> None:
    minute, daily, minute_policy, daily_policy = timescale_aggregate_sql()
    assert "WITH (timescaledb.continuous)" in minute
    assert "public.time_bucket(INTERVAL '1 minute', device_time)" in minute
    assert minute.endswith("WITH NO DATA")  # allowed inside the migration's transaction
    assert "FROM positions_minute_mv" in daily  # hierarchical: daily over minutes
    assert "public.time_bucket(INTERVAL '1 day', minute, 'Asia/Shanghai') AS day_start" in daily
    for column in ("positions", "distance_km", "driving_time_s"):
        assert f"AS {column}" in daily
    assert minute_policy.startswith(
        "SELECT public.add_continuous_aggregate_policy('positions_minute_mv'"
    )
    assert daily_policy.startswith(
        "SELECT public.add_continuous_aggregate_policy('daily_vehicle_stats"
    )


def test_migrations_render_for_both_backends() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(set(versions))
    ts = SchemaContext(backend="timescaledb")
    plain = SchemaContext(backend="partitioned")
    positions = next(m for m in MIGRATIONS if m.name == "positions")
    assert "create_hypertable" in positions.render(ts)
    assert "PARTITION BY RANGE (device_time)" in positions.render(plain)
    assert "DEFAULT" in positions.render(plain)
    aggregates = next(m for m in MIGRATIONS if m.version == 3)
    assert "timescaledb.continuous" in aggregates.render(ts)
    assert "timescaledb" not in aggregates.render(plain)
    for ctx in (ts, plain):  # the reporting views are shared
        assert "CREATE VIEW vehicle_latest_position" in aggregates.render(ctx)


def test_processes_creating_partitions_at_once_take_turns(pg_schema_dsn: str) -> None:  # noqa: F811
    """The workers of a node start together, each migrating and keeping partitions ahead:
    none of them may fail on a partition another one just made."""
    import threading  # noqa: PLC0415

    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn, backend="partitioned", now=NOW, days_ahead=0)
    later = NOW + timedelta(days=10)
    errors: list[BaseException] = []
    created: list[list[str]] = []
    start = threading.Barrier(4)

    def keep_ahead() -> None:
        try:
            with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
                start.wait()
                created.append(ensure_partitions(conn, later, days_ahead=7))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=keep_ahead) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    names = [name for made in created for name in made]
    assert len(names) == len(set(names)) == 9  # each of the 9 days made exactly once
