"""``jt808 db status``: one screen (or one JSON object) on the database's state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from protocol.header import Header
from protocol.messages.location import Location
from storage import position_row
from storage.masterdata import upsert_vehicles, vehicle_rows_from_csv
from storage.pgstore import PgPositionStore
from storage.schema import MIGRATIONS, current_backend
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tools.cli import main

pytestmark = pytest.mark.db


def _row(phone: str, at: datetime) -> tuple[object, ...]:
    header = Header(msg_id=0x0200, body_length=0, phone=phone, serial=1)
    fix = Location(
        alarm=0,
        status=2,
        latitude=25_000_000,
        longitude=102_700_000,
        altitude_m=1,
        speed=0,
        direction=0,
        time=at,
    )
    return position_row(header, fix, datetime.now(UTC))


def test_status_shows_backend_partitions_default_rows_and_unlinked_positions(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        upsert_vehicles(
            conn,
            vehicle_rows_from_csv(
                "plate,phone,unit,category,exempt\n云A00001,13800000001,gov,retained,false\n"
            ),
        )
    now = datetime.now(UTC)
    store = PgPositionStore(db)
    try:
        store.write_rows(
            [
                _row("013800000001", now - timedelta(hours=1)),  # a vehicle's
                _row("013899999999", now - timedelta(hours=1)),  # a terminal with no vehicle
                _row("013800000001", now + timedelta(days=400)),  # no partition that far ahead
            ]
        )
    finally:
        store.close()
    assert main(["db", "status", "--json", "--dsn", db]) == 0
    status = json.loads(capsys.readouterr().out)
    with psycopg.connect(db) as conn:
        backend = current_backend(conn)
    assert status["backend"] == backend
    assert status["schema_version"] == max(m.version for m in MIGRATIONS)
    positions = status["positions"]
    if backend == "partitioned":
        assert positions["partitions"] >= 1
        assert positions["rows_in_default_partition"] == 1
    else:  # TimescaleDB: chunks (one far ahead too), and the jobs with their settings
        assert positions["chunks"] >= 2
        assert {job["job"] for job in positions["jobs"]} >= {"policy_retention"}
    assert status["unlinked_positions_recent"] == 1
    assert status["rules"]["partitions"] == 16
    assert status["terminal_bindings"] == {"open": 1, "closed": 0}
    assert status["daily_stats_days_pending"] == 0
    assert main(["db", "status", "--dsn", db]) == 0
    text = capsys.readouterr().out
    assert f"backend: {backend}" in text
    if backend == "partitioned":
        assert "positions rows in default partition: 1" in text
    assert "positions without a vehicle (last 7 days): 1" in text
    assert "terminal bindings: 1 open, 0 closed (history)" in text
