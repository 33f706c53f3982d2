"""The storage backend is chosen, not guessed; migrations apply whole or not at all."""

from __future__ import annotations

import logging

import psycopg
import pytest

from storage import StorageError, current_backend, migrate
from storage.schema import (
    MIGRATIONS,
    Migration,
    SchemaContext,
    TimescaleOptions,
    timescale_aggregate_sql,
    timescale_positions_sql,
    timescale_usable,
)
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tools.cli import main

pytestmark = pytest.mark.db


def test_auto_says_why_it_chose_its_backend(
    pg_schema_dsn: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        usable, why = timescale_usable(conn)  # CI's server has no TimescaleDB; others may
        with caplog.at_level(logging.INFO, logger="storage.schema"):
            migrate(conn)
        chosen = "timescaledb" if usable else "partitioned"
        assert current_backend(conn) == chosen
    assert f"positions storage backend: {chosen} ({why})" in caplog.text


def _timescale_usable(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return timescale_usable(conn)[0]


def test_timescaledb_asked_for_but_not_usable_is_refused_and_changes_nothing(
    pg_schema_dsn: str,  # noqa: F811
) -> None:
    if _timescale_usable(pg_schema_dsn):
        pytest.skip("this server has TimescaleDB: nothing to refuse")
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        with pytest.raises(StorageError, match="timescaledb requested but not usable"):
            migrate(conn, backend="timescaledb")
        assert current_backend(conn) is None
        assert conn.execute("SELECT count(*) FROM jt808_schema_migrations").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('terminals')").fetchone() == (None,)
        assert migrate(conn, backend="partitioned")[0] == 1  # the cause fixed: it migrates


def test_db_migrate_takes_the_backend(pg_schema_dsn: str) -> None:  # noqa: F811
    if not _timescale_usable(pg_schema_dsn):
        assert main(["db", "migrate", "--backend", "timescaledb", "--dsn", pg_schema_dsn]) == 1
    assert main(["db", "migrate", "--backend", "partitioned", "--dsn", pg_schema_dsn]) == 0
    with psycopg.connect(pg_schema_dsn) as conn:
        assert current_backend(conn) == "partitioned"


def test_a_failed_first_migration_records_no_backend(
    pg_schema_dsn: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import storage.schema as schema  # noqa: PLC0415

    broken = (Migration(1, "broken", "CREATE TABLE t (x int); SELECT no_such_function();"),)
    monkeypatch.setattr(schema, "MIGRATIONS", broken)
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error):
            migrate(conn)
        assert current_backend(conn) is None  # the next attempt chooses again
        assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS)
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        assert migrate(conn)[0] == 1


def test_timescaledb_calls_are_qualified_with_the_extension_schema() -> None:
    statements = [
        *timescale_positions_sql(TimescaleOptions(), '"ext"'),
        *timescale_aggregate_sql('"ext"'),
    ]
    calls = (
        "create_hypertable",
        "add_compression_policy",
        "add_retention_policy",
        "time_bucket",
        "add_continuous_aggregate_policy",
    )
    text = "\n".join(statements)
    for call in calls:
        if call in text:
            assert text.count(call) == text.count(f'"ext".{call}'), call
    rendered = next(m for m in MIGRATIONS if m.version == 2).render(
        SchemaContext(backend="timescaledb", timescale_schema='"ext"')
    )
    assert '"ext".create_hypertable' in rendered
